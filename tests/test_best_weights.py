"""The protocol's training job (docs/peers.md): early stopping on the validation MAE, the best
validation weights tested and exported (2 DeepSpeed CPU processes), and the historical average
baseline in every run's test metrics, checked against the store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import child_env, overrides

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def train(store, out, name, steps, extra=(), procs=2):
    args = overrides(
        store,
        out,
        name,
        steps,
        ["train.eval_every=2", "train.warmup_steps=1", "tracking.enabled=false", *extra],
    )
    cmd = [sys.executable, "launch/train.py", *args]
    if procs > 1:
        port = str(29700 + os.getpid() % 1000)
        cmd = [DEEPSPEED, "--num_gpus", str(procs), "--master_port", port, *cmd[1:]]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / name / "metrics.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def best_run(synthetic_store, tmp_path_factory):
    """Two processes, a validation every 2 steps, early stopping after 3 without improvement."""
    out = tmp_path_factory.mktemp("best")
    extra = ["train.patience=3", "train.lr=0.05", "train.oracle=false"]
    metrics, stdout = train(synthetic_store, out, "best", 24, extra)
    return out / "best", metrics, stdout


def test_the_best_validation_weights_are_tested_and_exported(best_run):
    run, m, stdout = best_run
    history = m["validation"]
    best = min(history, key=lambda row: row["val_mae"])  # the first of equals
    assert m["tested_step"] == best["step"]
    assert m["monitor"] == {"metric": "mae", "best": pytest.approx(best["val_mae"], abs=1e-6)}
    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    exported = torch.load(run / "model" / "weights.pt", weights_only=True)
    assert saved["step"] == best["step"]
    assert exported.keys() == saved["weights"].keys()
    for key, value in exported.items():
        if key.startswith("variogram."):  # the field's variogram keeps its last values
            continue
        assert torch.equal(value, saved["weights"][key].float()), key
    if best["step"] != m["steps"]:
        assert f"testing the weights of step {best['step']}" in stdout
    if m["stopped_early"]:  # three validations (2 steps apart) without improvement
        assert m["steps"] == history[-1]["step"] == best["step"] + 3 * 2
    else:
        assert m["steps"] == 24


def test_without_restore_best_the_last_weights_are_tested(synthetic_store, tmp_path):
    extra = ["train.restore_best=false", "train.oracle=false", "train.monitor=crps"]
    m, _ = train(synthetic_store, tmp_path, "last", 6, extra, procs=1)
    assert m["tested_step"] == m["steps"] == 6
    assert m["monitor"]["metric"] == "crps"
    assert m["monitor"]["best"] == pytest.approx(min(r["val_crps"] for r in m["validation"]))
    assert not (tmp_path / "last" / "checkpoints" / "best.pt").exists()


def test_the_historical_average_is_scored_against_the_store(best_run, synthetic_store):
    """Each sensor's train mean at the target's time of day (its train mean where the train
    split never saw that time of day), over every test window's observed targets, with its
    spread and Diebold-Mariano tests like the other baselines."""
    from pipeline.data.store import open_store

    _, m, _ = best_run
    store = open_store(synthetic_store)
    values, mask = store["values"][:].astype(np.float64), store["mask"][:]
    time_ns = store["time"][:]
    slot = (time_ns % (24 * 3600 * 10**9)) // (5 * 60 * 10**9)  # 5-minute steps
    a, b = store.split("train")
    levels = np.zeros((288, *values.shape[1:]))
    count = np.zeros_like(levels)
    np.add.at(levels, slot[a:b], np.where(mask[a:b], values[a:b], 0))
    np.add.at(count, slot[a:b], mask[a:b])
    profile = np.where(count > 0, levels / np.maximum(count, 1), store["mean"][:])
    c, d = store.split("test")
    origins = np.arange(c + 6, d - 3 + 1)  # time_in 6, horizon 3
    targets = origins[:, None] + np.arange(3)  # [W, horizon]
    y, y_mask = values[targets], mask[targets]
    expected = np.abs(y - profile[slot[targets]])[y_mask].mean()

    base = m["test"]["baselines"]
    ha = base["historical_average"]
    assert ha.keys() == base["last_value"].keys()
    assert ha["mae"] == pytest.approx(expected, rel=1e-5)
    assert ha["probabilistic"] and ha["crps"] < ha["mae"]
    assert ha["dm_mae"]["T"] == len(origins)
    # another baseline: not the train mean, which the profile equals only where unseen
    assert ha["mae"] != pytest.approx(base["train_mean"]["mae"], rel=1e-3)
