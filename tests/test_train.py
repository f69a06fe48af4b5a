"""DeepSpeed training end to end on CPU: 2 processes, resume after SIGKILL, another world size,
checkpoints that load with weights_only=True."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import child_env, listeners, overrides

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def tiny(store, out, name, steps, extra=()):
    return overrides(
        store,
        out,
        name,
        steps,
        [
            "train.log_every=1",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.warmup_steps=2",
            "train.lr=0.01",
            "tracking.enabled=false",
            *extra,
        ],
    )


def launch(args, procs=2, **kw):
    if procs == 1:
        cmd = [sys.executable, "launch/train.py", *args]
    else:
        port = str(29500 + os.getpid() % 1000)
        cmd = [DEEPSPEED, "--num_gpus", str(procs), "--master_port", port, "launch/train.py", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(out, name):
    return json.loads((Path(out) / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(synthetic_store, tmp_path_factory):
    """An uninterrupted 2-process run of 12 steps."""
    out = tmp_path_factory.mktemp("runs")
    finish(launch(tiny(synthetic_store, out, "ref", 12)))
    return out


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


def test_checkpoints_load_with_weights_only(reference):
    files = list((reference / "ref" / "checkpoints").rglob("*.pt"))
    assert len(files) >= 3
    for f in files:
        torch.load(f, weights_only=True)
    torch.load(reference / "ref" / "model" / "weights.pt", weights_only=True)


def test_killed_at_any_point_resume_loses_at_most_one_interval(
    reference, synthetic_store, tmp_path
):
    """Both processes SIGKILLed again and again: while a checkpoint's files are being written
    (before its marker), just after a marker, and mid-write again; each time the same command
    resumes. Never more than one checkpoint interval is lost, and the finished run equals the
    uninterrupted one."""
    every, steps = 2, 12
    args = tiny(synthetic_store, tmp_path, "ref", steps, [f"train.checkpoint_every={every}"])
    ckpt = tmp_path / "ref" / "checkpoints"

    def writing(step):  # files of the checkpoint are there, its completion marker is not
        tag = ckpt / f"step{step:08d}"
        return lambda: any(tag.glob("*.pt")) and not (tag / "COMPLETE").exists()

    def completed(step):
        return lambda: (ckpt / f"step{step:08d}" / "COMPLETE").exists()

    out, reached, inside = "", [], []
    for trigger, step in [(writing, 4), (completed, 6), (writing, 10)]:
        proc = launch(args)  # resumes from the previous kill, after the first
        deadline, fired = time.time() + 300, trigger(step)
        while not fired() and not completed(step)():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("the run ended before the kill: " + proc.stdout.read()[-2000:])
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        out += proc.communicate()[0]
        inside.append(not completed(step)())
        reached.append(max(int(d.name[4:]) for d in ckpt.glob("step*")))
        assert not (tmp_path / "ref" / "metrics.json").exists()
    out += finish(launch(args))
    resumes = [int(m) for m in re.findall(r"resumed from step (\d+)", out)]
    assert len(resumes) == 3, resumes
    for got, seen in zip(resumes, reached, strict=True):
        assert seen - every <= got <= seen, (resumes, reached)
    print(f"kills inside a checkpoint write: {sum(inside)} of 2 attempted")
    want = torch.load(reference / "ref" / "model" / "weights.pt", weights_only=True)
    got = torch.load(tmp_path / "ref" / "model" / "weights.pt", weights_only=True)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    ref_loss = dict(map(tuple, metrics(reference, "ref")["train_loss"]))
    new_loss = dict(map(tuple, metrics(tmp_path, "ref")["train_loss"]))
    for step in range(resumes[-1] + 1, steps + 1):
        assert new_loss[step] == pytest.approx(ref_loss[step], abs=1e-6), step


class _Trap:
    """Pickles as a call of os.system: what a tampered checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_before_any_code_runs(
    reference, synthetic_store, tmp_path
):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    ckpt = tmp_path / "ref" / "checkpoints"
    tag = ckpt / (ckpt / "latest").read_text().strip()
    target = tag / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Trap(marker)}, target)
    complete = json.loads((tag / "COMPLETE").read_text())  # the tamperer fixes the sizes too
    complete["files"][target.name] = target.stat().st_size
    (tag / "COMPLETE").write_text(json.dumps(complete))
    proc = launch(tiny(synthetic_store, tmp_path, "ref", 16), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "refused" in out and ("posix.system" in out or "os.system" in out), out[-2000:]
    assert not marker.exists(), "the pickled code ran"


def test_resume_never_moves_earlier_checkpoints_aside(reference, synthetic_store, tmp_path):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    before = sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir())
    args = tiny(synthetic_store, tmp_path, "ref", 4, ["train.resume=never"])
    out = finish(launch(args, procs=1))
    assert "resumed" not in out and "moved to" in out
    kept = list((tmp_path / "ref").glob("checkpoints.replaced-*"))
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == before
    assert metrics(tmp_path, "ref")["steps"] == 4


def test_resume_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(
    reference, synthetic_store, tmp_path
):
    """A kill while saving leaves a checkpoint without its completion marker (and DeepSpeed's
    `latest` may already name it); a truncated file breaks another. Resume passes over both,
    says why, and continues from the newest complete one."""
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    ckpt = tmp_path / "ref" / "checkpoints"
    assert (ckpt / "step00000012" / "COMPLETE").is_file()
    partial = ckpt / "step00000016"
    shutil.copytree(ckpt / "step00000012", partial)
    (partial / "COMPLETE").unlink()
    (ckpt / "latest").write_text("step00000016")
    broken = ckpt / "step00000012" / "mp_rank_00_model_states.pt"
    broken.write_bytes(broken.read_bytes()[:100])
    out = finish(launch(tiny(synthetic_store, tmp_path, "ref", 12), procs=2))
    assert "skipped checkpoint step00000016: no completion marker" in out
    assert "skipped checkpoint step00000012: mp_rank_00_model_states.pt has 100 bytes" in out
    assert "resumed from step 8" in out
    assert metrics(tmp_path, "ref")["steps"] == 12


def test_resume_with_another_world_size(reference, synthetic_store, tmp_path):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    out = finish(launch(tiny(synthetic_store, tmp_path, "ref", 16), procs=1))
    assert "resumed from step 12" in out and "re-sharded" in out
    m = metrics(tmp_path, "ref")
    assert m["steps"] == 16 and m["world_size"] == 1


@pytest.fixture(scope="module")
def other_store(scheduler, tmp_path_factory):
    """A store of the same shape as the session's synthetic store, of another field (seed)."""
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess

    path = tmp_path_factory.mktemp("other") / "syn.zarr"
    keys = ["data.synthetic.num_sensors=300", "data.synthetic.num_steps=400"]
    keys += ["data.synthetic.seed=1", "data.time_chunk=32", "data.node_chunk=64"]
    keys += ["data.time_in=6", "data.horizon=3", "data.neighbours=8"]
    cfg = load_config(None, [f"dask.scheduler={scheduler}", f"data.store={path}", *keys])
    return preprocess(cfg, progress=False)


def test_resume_refuses_another_model_shape_or_store_naming_the_key(
    reference, other_store, synthetic_store, tmp_path
):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    wider = tiny(synthetic_store, tmp_path, "ref", 16, ["model.d_model=32"])
    proc = launch(wider, procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "model.d_model: 16 then, 32 now" in out, out[-3000:]
    assert "Traceback" not in out
    proc = launch(tiny(other_store, tmp_path, "ref", 16), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "data.store (content fingerprint)" in out, out[-3000:]
    assert "Traceback" not in out


def test_a_store_replaced_mid_run_stops_it_before_the_next_checkpoint(
    other_store, synthetic_store, tmp_path
):
    from pipeline.config import ConfigError, load_config
    from pipeline.train.loop import train

    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store, store)

    def replace(step, val):  # another preprocess with data.overwrite=true, after step 4
        shutil.rmtree(store)
        shutil.copytree(other_store, store)

    cfg = load_config(None, tiny(store, tmp_path, "mixed", 12))
    with pytest.raises(ConfigError, match="replaced while this run read it.*at step 4"):
        train(cfg, report=replace)
    assert not (tmp_path / "mixed" / "checkpoints" / "step00000004").exists()


def test_two_runs_of_one_name_do_not_share_the_run_directory(synthetic_store, tmp_path):
    from pipeline.train.guards import run_lock

    with run_lock(tmp_path / "busy", hold=True):  # a run of that name is training
        proc = launch(tiny(synthetic_store, tmp_path, "busy", 4), procs=1)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and f"is in use by pid {os.getpid()}" in out, out[-3000:]
    assert "Traceback" not in out
    assert not (tmp_path / "busy" / "checkpoints").exists()
    finish(launch(tiny(synthetic_store, tmp_path, "busy", 2), procs=1))  # free once it ends


@pytest.mark.parametrize("procs", [1, 2])
def test_a_run_on_one_machine_listens_on_loopback_only(synthetic_store, tmp_path, procs):
    """No port of a one-machine run (rendezvous, gloo) is open beyond 127.0.0.1 (torch's
    TCPStore alone would listen on every interface: `*:PORT`)."""
    proc = launch(tiny(synthetic_store, tmp_path, "local", 12), procs=procs)
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
        proc = launch(tiny(synthetic_store, tmp_path, "bad", 4, extra), procs=1)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in out, out[-3000:]
        assert "Traceback" not in out and not (tmp_path / "bad" / "checkpoints").exists()
    dense = ["model.backend=dense", "model.knn=16", "train.eval_batches=null"]  # every batch
    finish(launch(tiny(synthetic_store, tmp_path, "dense", 2, dense), procs=1))


def test_a_model_with_sensor_embeddings_trains_and_forecasts(synthetic_store, tmp_path):
    """model.node_embedding: each sensor's embedding is looked up by its store index, in the
    training job and in the exported model. (With train.oracle=false: no Bayes limit.)"""
    from pipeline.data.store import open_store
    from pipeline.model.export import Predictor

    overrides = ["model.node_embedding=true", "train.oracle=false"]
    finish(launch(tiny(synthetic_store, tmp_path, "emb", 2, overrides), procs=1))
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

    args = tiny(synthetic_store, tmp_path, "profile", 2, ["model.daily_profile=true"])
    finish(launch(args, procs=1))
    store = open_store(synthetic_store)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    predictor = Predictor(tmp_path / "profile" / "model")
    morning = predictor.predict(x, store["time"][106:107])["mean"]
    evening = predictor.predict(x, store["time"][106:107] + 12 * 3600 * 10**9)["mean"]
    assert np.isfinite(morning).all() and not np.allclose(morning, evening)


def test_zero_stage_checkpoint_refuses_another_world_size(synthetic_store, tmp_path):
    args = tiny(synthetic_store, tmp_path, "z1", 4, ["train.zero_stage=1"])
    finish(launch(args))
    proc = launch(tiny(synthetic_store, tmp_path, "z1", 8, ["train.zero_stage=1"]), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "resume with 2 processes" in out


def test_a_non_finite_loss_stops_training_with_a_clear_error(synthetic_store, tmp_path):
    extra = ["train.lr=1e30", "train.kernel_lr=1e30", "train.warmup_steps=1"]
    proc = launch(tiny(synthetic_store, tmp_path, "nan", 6, extra), procs=1)
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
    args = tiny(store, tmp_path, "empty", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"])
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
    args = tiny(store, tmp_path, "two", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"])
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
    args = tiny(store, tmp_path, "flow", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"])
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
    args = tiny(store, tmp_path, "bad", 4, ["data.time_in=4", "data.horizon=2", "model.knn=3"])
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
        metrics = train(load_config(None, tiny(synthetic_store, tmp_path, name, 2)))
        assert metrics["steps"] == 2 and metrics["world_size"] == 1
        assert not dist.is_initialized()
        assert {k: os.environ.get(k) for k in before} == before


def test_compare_two_runs_with_diebold_mariano(reference, synthetic_store, tmp_path):
    """launch/compare.py tests the 2-process run against a kernel-`none` run on their common
    test windows; its pooled MAE equals the run's own test MAE (two code paths), and runs of
    different stores, or a directory without results, are refused with a clear error."""
    finish(launch(tiny(synthetic_store, tmp_path, "none", 12, ["model.kernel=none"]), procs=1))
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
