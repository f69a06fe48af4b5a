"""Ray Tune sweeps on a real local Ray instance and a real `ray start` head (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import child_env, free_port, listeners, overrides

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def sweep_args(store, out, name, extra=()):
    return overrides(
        store,
        out,
        name,
        8,
        [
            "train.eval_every=2",
            "train.checkpoint_every=1000",
            "train.warmup_steps=1",
            f"tracking.uri=sqlite:///{out}/mlruns.db",
            "tracking.experiment=sweep",
            # lr 1e-7 learns nothing: ASHA must stop such a trial at its first rung
            "tune.space={model.kernel: {grid: [matern32, none]}, train.lr: {grid: [0.03, 1.0e-7]}}",
            "tune.num_samples=1",
            "tune.max_concurrent_trials=1",
            "tune.grace_period=1",
            "tune.reduction_factor=2",
            "tune.num_cpus=2",
            *extra,
        ],
    )


def run_tune(args, cwd_=ROOT, **kw):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "tune.py"), *args],
        cwd=cwd_,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
        **kw,
    )


def test_space_is_validated_before_any_trial():
    cfg = load_config(None, ["tune.space={model.kernal: {choice: [matern32]}}"])
    from pipeline.track.tune import check_space

    with pytest.raises(ConfigError, match="model.kernal.*did you mean 'model.kernel'"):
        check_space(cfg)
    cfg = load_config(None, ["tune.space={model.kernel: {choice: [matern32, matern99]}}"])
    with pytest.raises(ConfigError, match="'matern99'"):
        check_space(cfg)
    cfg = load_config(None, ["tune.space={train.lr: {loguniform: [0, 0.1]}}"])
    with pytest.raises(ConfigError, match="low > 0"):
        check_space(cfg)
    cfg = load_config(None, ["tune.space={model.heads: {randint: [1, 9]}}"])  # d_model 64
    with pytest.raises(ConfigError, match="divisible"):
        check_space(cfg)


@pytest.fixture(scope="module")
def local_sweep(synthetic_store, tmp_path_factory):
    """A local sweep as a user runs it (Ray's token authentication on, its token in a home of
    its own); what it printed, the addresses its processes listened on and its home."""
    out = tmp_path_factory.mktemp("sweep")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in child_env().items() if k != "RAY_AUTH_MODE"}
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache/torch_extensions"))
    env.update(HOME=str(home), TORCH_EXTENSIONS_DIR=str(cache))  # DeepSpeed's built op
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "tune.py"), *sweep_args(synthetic_store, out, "s1")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, output = listeners(proc, every=0.5)
    assert proc.returncode == 0, output[-8000:]
    return out, output, seen, home


def test_a_local_sweep_listens_on_loopback_only(local_sweep):
    """Ray's GCS, raylet, workers and runtime-env agent, and every trial's process group, on
    127.0.0.1 only; Ray's token readable by its owner only."""
    seen, home = local_sweep[2], local_sweep[3]
    assert seen, "no listening socket of the sweep was seen (is `ss -ltnp` working?)"
    loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
    assert all(addr.startswith(loopback) for addr in seen), seen
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_size == 64
    assert token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)


def test_sweep_with_asha_mlflow_and_best_yaml(local_sweep, synthetic_store):
    out, stdout, _, _ = local_sweep
    assert "| family |" in stdout
    trials = json.loads((out / "s1" / "trials.json").read_text())
    assert len(trials) == 4 and all(t["status"] == "ok" for t in trials)
    evaluations = [t["evaluations"] for t in trials]
    assert max(evaluations) == 4 and min(evaluations) < 4, evaluations  # ASHA stopped some
    # a trial that ran to the end was tested on the synthetic store: its distance to the Bayes
    # limit is in the table; one that ASHA stopped has no test metrics
    assert "test CRPS / Bayes limit |" in stdout
    for t in trials:
        if t["evaluations"] == 4:
            assert 1 < t["ratio_to_oracle"] < 3, t
        else:
            assert t["ratio_to_oracle"] is None, t
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlruns.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    kernels = {c.data.params["model.kernel"] for c in children}
    assert kernels == {"matern32", "none"}
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    val_counts = [len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children]
    assert sorted(val_counts) == sorted(evaluations)
    best = out / "s1" / "best.yaml"
    cfg = load_config(
        best, ["train.steps=2", "tracking.enabled=false", f"train.out_dir={out / 'best'}"]
    )
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(best),
            "train.steps=2",
            "tracking.enabled=false",
            f"train.out_dir={out / 'best'}",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best" / cfg.name / "metrics.json").exists()


def test_a_crashing_trial_is_reported_and_the_sweep_goes_on(synthetic_store, tmp_path):
    # model.knn=64 exceeds the 8 neighbours of the store: that trial fails at start-up
    args = sweep_args(synthetic_store, tmp_path, "crash")
    args = [a for a in args if not a.startswith("tune.space")] + [
        "tune.space={model.knn: {grid: [8, 64]}}",
        "train.steps=2",
        "train.eval_every=1",
    ]
    proc = run_tune(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed" in proc.stdout and "model.knn" in proc.stdout
    assert (tmp_path / "crash" / "best.yaml").exists()


def test_a_trial_spans_two_workers_and_logs_to_the_default_store(synthetic_store, tmp_path):
    """tune.workers_per_trial=2: the trial is a Ray Train worker group of two training
    processes (one process group); run from another directory with the default tracking URI,
    the sweep's parent run and the trial's child run land in that directory's mlruns.db (each
    trial runs in its own working directory)."""
    args = sweep_args(synthetic_store, tmp_path, "pair")
    args = [a for a in args if not a.startswith(("tune.space", "tracking.uri"))] + [
        "tune.space={model.kernel: {grid: [matern32]}}",
        "tune.workers_per_trial=2",
        "tune.cpus_per_trial=2",
    ]
    proc = run_tune(args, cwd_=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (trial,) = json.loads((tmp_path / "pair" / "trials.json").read_text())
    assert trial["status"] == "ok" and trial["evaluations"] == 4
    (metrics,) = (tmp_path / "pair" / "trials").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["world_size"] == 2
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 4


def test_sweep_against_a_ray_head_started_by_the_test(synthetic_store, tmp_path):
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        args = sweep_args(synthetic_store, tmp_path, "remote", [f"tune.address=127.0.0.1:{port}"])
        args = [a for a in args if not a.startswith("tune.space")] + [
            "tune.space={model.kernel: {grid: [matern32, none]}}"
        ]
        proc = run_tune(args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        trials = json.loads((tmp_path / "remote" / "trials.json").read_text())
        assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this head only: its own process group
        head.wait(timeout=90)


def test_killed_driver_resumes_with_completed_trials_kept(synthetic_store, tmp_path):
    args = sweep_args(synthetic_store, tmp_path, "resume")
    proc = subprocess.Popen(
        [sys.executable, "launch/tune.py", *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trials = tmp_path / "resume" / "trials"
    deadline = time.time() + 600
    while time.time() < deadline:
        done = list(trials.glob("*/metrics.json")) if trials.exists() else []
        if done:
            break
        assert proc.poll() is None, "the sweep ended before a trial finished"
        time.sleep(0.5)
    assert done, "no trial finished before the deadline"
    # killed at once: Tune saves its state every 10 s, so the finished trial is usually not
    # recorded there yet, and resume must keep it all the same
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.stat().st_mtime for p in done}
    result = run_tune(args + ["tune.resume=true"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for p, mtime in first.items():
        assert p.stat().st_mtime == mtime, f"{p.parent.name} was run again"
    summary = json.loads((tmp_path / "resume" / "trials.json").read_text())
    assert len(summary) == 4 and all(t["status"] == "ok" for t in summary)


def test_an_existing_ray_token_readable_by_others_is_made_private(tmp_path, monkeypatch, capsys):
    from pipeline.track.ray_env import prepare

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)
    prepare("ray://head.example.org:10001")  # a running cluster: its own business
    prepare("127.0.0.1:6379")  # a head on this machine too: it listens where ray start says
    assert token.stat().st_mode & 0o777 == 0o644 and "RAY_ENABLE" not in str(os.environ)
    prepare(None)  # a local instance
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == "a" * 64
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert "readable by other users" in capsys.readouterr().out
