"""DeepSpeed training end to end on CPU: 2 processes, the test split's baselines and the Bayes
limit, configuration checks, several features, process groups and loopback-only listeners
(resuming: test_resume.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import checkpointed, child_env, finish, launch, listeners, metrics

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_train_and_the_loss_goes_down(reference):
    m = metrics(reference, "ref")
    assert m["world_size"] == 2 and m["steps"] == 12
    losses = [loss for _, loss in m["train_loss"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert (
        m["validation"][-1]["val_loss"] < m["validation"][0]["val_loss"] + 1e-9
        or m["validation"][-1]["val_loss"] < losses[0]
    )
    assert len(m["test"]["mae"]) == 3 and m["test"]["count"] > 0
    estimate = m["kernel_estimate"]  # the field's variogram, fitted beside the forecast
    assert 0 < estimate["range_km"] < 1e3 and 0 <= estimate["nugget"] <= 1, estimate


def test_test_split_baselines_and_diagnostics_cover_every_window(reference, synthetic_store):
    """The baselines' MAE, summed over both ranks' shares, equals the MAE computed directly
    from the store over every test window; the tests count every window and sensor."""
    from pipeline.data.store import open_store

    store = open_store(synthetic_store)
    c, d = store.split("test")
    values, mask = store["values"][:].astype(np.float64), store["mask"][:]
    train_mean = store["mean"][:]
    time_in, horizon = 6, 3
    origins = np.arange(c + time_in, d - horizon + 1)
    y_idx = origins[:, None] + np.arange(horizon)  # [W, horizon]
    y, y_mask = values[y_idx], mask[y_idx]  # [W, horizon, N, F]
    x_mask = mask[origins[:, None] + np.arange(-time_in, 0)]  # [W, time_in, N, F]
    last_step = np.where(x_mask, np.arange(time_in)[None, :, None, None], -1).max(axis=1)
    _, n, f = values.shape
    rows = origins[:, None, None] - time_in + last_step.clip(0)  # [W, N, F]
    last = values[rows, np.arange(n)[:, None], np.arange(f)]
    last = np.where(last_step >= 0, last, train_mean)  # [W, N, F]

    test = metrics(reference, "ref")["test"]
    base = test["baselines"]
    expect_last = np.abs(y - last[:, None])[y_mask].mean()
    expect_mean = np.abs(y - train_mean)[y_mask].mean()
    assert base["last_value"]["mae"] == pytest.approx(expect_last, rel=1e-5)
    assert base["train_mean"]["mae"] == pytest.approx(expect_mean, rel=1e-5)
    assert base["train_mean"]["dm_mae"]["T"] == len(origins)
    assert np.isfinite(base["last_value"]["dm_crps"]["statistic"])
    assert test["morans_i"]["n"] == int(y_mask.any(axis=(0, 1, 3)).sum())


def test_synthetic_runs_report_their_distance_to_the_bayes_limit(reference, synthetic_store):
    """The exact oracle of the synthetic store is in metrics.json: calibrated, never worse
    given the whole past than given the window, and a 12-step model is above it."""
    from pipeline.data.store import open_store

    m = metrics(reference, "ref")
    window, full = m["oracle"]["window"], m["oracle"]["full_past"]
    assert abs(window["mean"]["coverage_90"] - 0.9) < 0.03, window["mean"]
    assert full["mean"]["crps"] <= window["mean"]["crps"] + 1e-12
    ratio = m["test"]["ratio_to_oracle"]
    assert ratio["mean"] == pytest.approx(m["test"]["mean"]["crps"] / window["mean"]["crps"])
    assert ratio["mean"] > 1 and len(ratio["crps"]) == 3
    assert m["test"]["dm_vs_oracle"]["statistic"] > 0  # the oracle's loss is lower
    assert open_store(synthetic_store).attrs["synthetic"]["num_sensors"] == 300


def test_two_runs_of_one_name_do_not_share_the_run_directory(synthetic_store, tmp_path):
    from pipeline.train.guards import run_lock

    with run_lock(tmp_path / "busy", hold=True):  # a run of that name is training
        proc = launch(checkpointed(synthetic_store, tmp_path, "busy", 4), procs=1)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and f"is in use by pid {os.getpid()}" in out, out[-3000:]
    assert "Traceback" not in out
    assert not (tmp_path / "busy" / "checkpoints").exists()
    finish(launch(checkpointed(synthetic_store, tmp_path, "busy", 2), procs=1))  # free once it ends


@pytest.mark.parametrize("procs", [1, 2])
def test_a_run_on_one_machine_listens_on_loopback_only(synthetic_store, tmp_path, procs):
    """No port of a one-machine run (rendezvous, gloo) is open beyond 127.0.0.1 (torch's
    TCPStore alone would listen on every interface: `*:PORT`)."""
    proc = launch(checkpointed(synthetic_store, tmp_path, "local", 12), procs=procs)
    seen, out = listeners(proc)
    assert proc.returncode == 0, out[-4000:]
    assert seen, "no listening socket of the run was seen (is `ss -ltnp` working?)"
    assert all(addr.startswith(("127.0.0.1:", "[::1]:")) for addr in seen), seen


def test_constraints_between_config_and_store_are_checked_before_any_work(
    synthetic_store, tmp_path
):
    """The validation split (40 steps) holds no window of 6 + 35; the store keeps 8 neighbours
    per sensor, which the knn backend cannot stretch to 16 but the dense one never reads."""
    for extra, message in [
        (["data.horizon=35"], "data.horizon = 35 with data.time_in = 6: the val split"),
        (["model.knn=16"], "model.knn = 16 exceeds the 8 neighbours"),
    ]:
        proc = launch(checkpointed(synthetic_store, tmp_path, "bad", 4, extra), procs=1)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in out, out[-3000:]
        assert "Traceback" not in out and not (tmp_path / "bad" / "checkpoints").exists()
    dense = ["model.backend=dense", "model.knn=16", "train.eval_batches=null"]  # every batch
    finish(launch(checkpointed(synthetic_store, tmp_path, "dense", 2, dense), procs=1))


def test_a_model_with_sensor_embeddings_trains_and_forecasts(synthetic_store, tmp_path):
    """model.node_embedding: each sensor's embedding is looked up by its store index, in the
    training job and in the exported model. (With train.oracle=false: no Bayes limit.)"""
    from pipeline.data.store import open_store
    from pipeline.model.export import Predictor

    overrides = ["model.node_embedding=true", "train.oracle=false"]
    finish(launch(checkpointed(synthetic_store, tmp_path, "emb", 2, overrides), procs=1))
    m = metrics(tmp_path, "emb")
    assert m["oracle"] is None and "ratio_to_oracle" not in m["test"]
    store = open_store(synthetic_store)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    out = Predictor(tmp_path / "emb" / "model").predict(x, store["time"][106:107])
    assert np.isfinite(out["mean"]).all()


def test_a_model_with_daily_profiles_trains_and_forecasts(synthetic_store, tmp_path):
    """model.daily_profile in the training job and the exported model: the forecast at one
    input window depends on the time of day it is made for."""
    from pipeline.data.store import open_store
    from pipeline.model.export import Predictor

    args = checkpointed(synthetic_store, tmp_path, "profile", 2, ["model.daily_profile=true"])
    finish(launch(args, procs=1))
    store = open_store(synthetic_store)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    predictor = Predictor(tmp_path / "profile" / "model")
    morning = predictor.predict(x, store["time"][106:107])["mean"]
    evening = predictor.predict(x, store["time"][106:107] + 12 * 3600 * 10**9)["mean"]
    assert np.isfinite(morning).all() and not np.allclose(morning, evening)


def test_zero_stage_checkpoint_refuses_another_world_size(synthetic_store, tmp_path):
    args = checkpointed(synthetic_store, tmp_path, "z1", 4, ["train.zero_stage=1"])
    finish(launch(args))
    proc = launch(checkpointed(synthetic_store, tmp_path, "z1", 8, ["train.zero_stage=1"]), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "resume with 2 processes" in out


def test_a_non_finite_loss_stops_training_with_a_clear_error(synthetic_store, tmp_path):
    extra = ["train.lr=1e30", "train.kernel_lr=1e30", "train.warmup_steps=1"]
    proc = launch(checkpointed(synthetic_store, tmp_path, "nan", 6, extra), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "step 2: the training loss is not finite" in out and "--verify" in out
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_an_empty_validation_split_is_an_error_not_a_perfect_score(scheduler, tmp_path):
    """A store whose validation windows hold no observed target (here: blank rows) would
    score 0.0, which a sweep would rank best: the run stops with a clear error instead."""
    from cases import run, write_case

    t = pd.date_range("2024-01-01", periods=80, freq="1h")
    rng = np.random.default_rng(0)
    rows = [
        [str(s)]
        + (["", "", "", ""] if 56 <= i < 64 else [f"{v:.2f}" for v in rng.normal(50, 5, 4)])
        for i, s in enumerate(t)
    ]  # train 0-55, validation 56-63 (blank), test 64-79
    store = run(scheduler, write_case(tmp_path, rows))
    args = checkpointed(
        store, tmp_path, "empty", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"]
    )
    proc = launch(args, procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "the val split of" in out and "has no observed target" in out
    assert "Traceback" not in out, out[-2000:]


def test_several_features_are_scored_each_on_its_own_and_pooled(scheduler, tmp_path):
    """Two features in different units (speed 60 +- 5, flow 1000 +- 500): metrics.json and the
    summary give each its own metrics, whose observed cells add up to the pooled ones."""
    from cases import IDS, run, write_case

    t = pd.date_range("2024-01-01", periods=120, freq="1h")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        [(s, ts, rng.normal(60, 5), rng.normal(1000, 500)) for ts in t for s in IDS],
        columns=["sensor_id", "time", "speed", "flow"],
    ).drop(index=[7, 30, 31])  # a few missing observations
    frame.to_csv(tmp_path / "long.csv", index=False)
    case = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    store = run(
        scheduler,
        case
        + [
            "data.source.kind=long_csv",
            f"data.source.path={tmp_path / 'long.csv'}",
            "data.source.value_columns=[speed, flow]",
        ],
    )
    args = checkpointed(
        store, tmp_path, "two", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"]
    )
    proc = launch(args, procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    test = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]
    speed, flow = test["per_feature"]["speed"], test["per_feature"]["flow"]
    assert speed["count"] + flow["count"] == test["count"] and speed["count"] > 0
    assert speed["mean"]["mae"] < 20 < 200 < flow["mean"]["mae"]  # each in its own units
    pooled = (speed["mean"]["mae"] * speed["count"] + flow["mean"]["mae"] * flow["count"]) / (
        test["count"]
    )
    assert pooled == pytest.approx(test["mean"]["mae"], rel=1e-9)
    assert "feature speed: MAE" in out and "feature flow: MAE" in out
    # data.target: speed is an input only; flow is forecast and scored, on the same cells
    args = checkpointed(
        store, tmp_path, "flow", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"]
    )
    proc = launch([*args, "data.target=[flow]"], procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    only = json.loads((tmp_path / "flow" / "metrics.json").read_text())["test"]
    assert "per_feature" not in only and only["count"] == flow["count"]
    assert only["mean"]["mae"] > 200 and only["baselines"]["last_value"]["mae"] > 200
    from pipeline.model.export import Predictor

    x = np.full((1, 4, len(IDS), 2), 50.0, dtype=np.float32)
    when = np.array([pd.Timestamp("2024-01-05").value])
    got = Predictor(tmp_path / "flow" / "model").predict(x, when)
    assert got["mean"].shape == (1, 2, len(IDS), 1)
    args = checkpointed(
        store, tmp_path, "bad", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"]
    )
    proc = launch([*args, "data.target=[speed, pressure]"], procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "data.target" in out and "['speed', 'flow']" in out
    assert "Traceback" not in out, out[-2000:]


def test_runs_in_one_process_each_own_their_process_group(synthetic_store, tmp_path):
    """Two runs in one process (as in a reused Ray Tune actor): each creates its group of one
    and destroys it on the way out (a gloo group left to the interpreter's exit aborts the
    process), and leaves the environment as it found it."""
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.train.loop import train

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for name in ("first", "second"):
        metrics = train(load_config(None, checkpointed(synthetic_store, tmp_path, name, 2)))
        assert metrics["steps"] == 2 and metrics["world_size"] == 1
        assert not dist.is_initialized()
        assert {k: os.environ.get(k) for k in before} == before


def test_compare_two_runs_with_diebold_mariano(reference, synthetic_store, tmp_path):
    """launch/compare.py tests the 2-process run against a kernel-`none` run on their common
    test windows; its pooled MAE equals the run's own test MAE (two code paths), and runs of
    different stores, or a directory without results, are refused with a clear error."""
    finish(
        launch(checkpointed(synthetic_store, tmp_path, "none", 12, ["model.kernel=none"]), procs=1)
    )
    assert metrics(tmp_path, "none")["kernel"] == []  # kernel none learns no range or nugget
    a, b = reference / "ref", tmp_path / "none"

    def compare(*args):
        return subprocess.run(
            [sys.executable, "launch/compare.py", *map(str, args)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = compare(a, b, "--json", tmp_path / "dm.json")
    assert proc.returncode == 0, proc.stderr
    assert "Diebold-Mariano" in proc.stdout
    result = json.loads((tmp_path / "dm.json").read_text())
    wa, wb = np.load(a / "test_windows.npz"), np.load(b / "test_windows.npz")
    assert result["windows"] == len(wa["origin"]) == len(wb["origin"])
    assert result["mae"]["a"] == pytest.approx(metrics(reference, "ref")["test"]["mean"]["mae"])
    assert result["crps"]["b"] == pytest.approx(metrics(tmp_path, "none")["test"]["mean"]["crps"])
    dm = result["crps"]["dm"]
    assert np.isfinite(dm["statistic"]) and 0 <= dm["p_value"] <= 1

    other = tmp_path / "other"
    shutil.copytree(b, other, ignore=shutil.ignore_patterns("checkpoints", "model"))
    m = json.loads((other / "metrics.json").read_text())
    m["store"]["fingerprint"] = "0" * 16
    (other / "metrics.json").write_text(json.dumps(m))
    proc = compare(a, other)
    assert proc.returncode == 2 and "same store" in proc.stderr, proc.stderr
    proc = compare(a, tmp_path / "missing")
    assert proc.returncode == 2 and "metrics.json does not exist" in proc.stderr
