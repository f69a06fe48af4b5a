"""MLflow: a tracked run's parameters, metrics and figures; promotion; a real server over HTTP
and its outages; a clear error when the server is unreachable. (The registered model itself:
test_registry.py.)"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import ROOT, child_env, free_port, overrides, run_train, train_tracked


def test_run_holds_params_metrics_and_figures(tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, uri = tracked
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    version = client.get_model_version_by_alias("sit-test", "candidate")
    run = client.get_run(version.run_id)
    assert run.data.params["model.kernel"] == "matern32"
    assert "test_crps" in run.data.metrics and "range_km_l0_h0" in run.data.metrics
    assert run.data.metrics["kernel.range_estimate_km"] > 0  # the field's range, estimated
    assert 0 <= run.data.metrics["kernel.nugget_estimate"] <= 1
    assert run.data.tags["store_fingerprint"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2
    names = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {
        "figures/correlation.png",
        "figures/pit.png",
        "figures/fan_chart.png",
        "figures/loss.png",
        "figures/map.png",
    } <= names


def test_promote_moves_champion_only_when_better(tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.track.tracking import TrackingError, promote

    _, uri = tracked
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.model_name=sit-test"])
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    first = promote(cfg)
    assert first["promoted"] and first["champion"] is None
    v1 = client.get_model_version_by_alias("sit-test", "champion").version
    base = client.get_model_version_by_alias("sit-test", "candidate")
    score = client.get_run(base.run_id).data.metrics["test_crps"]

    def new_candidate(crps):  # a real run and model version with a given test score
        exp = client.get_experiment_by_name("test").experiment_id
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "test_crps", crps)
        client.set_terminated(run.info.run_id)
        v = client.create_model_version("sit-test", base.source, run.info.run_id)
        client.set_registered_model_alias("sit-test", "candidate", v.version)
        return v.version

    new_candidate(score * 1.5)  # worse
    assert not promote(cfg)["promoted"]
    assert client.get_model_version_by_alias("sit-test", "champion").version == v1
    better = new_candidate(score * 0.5)
    assert promote(cfg)["promoted"]
    assert client.get_model_version_by_alias("sit-test", "champion").version == better
    nan = new_candidate(float("nan"))  # a model trained on a damaged store
    with pytest.raises(TrackingError, match="never promoted"):
        promote(cfg)
    assert client.get_model_version_by_alias("sit-test", "champion").version == better
    client.set_registered_model_alias("sit-test", "champion", nan)  # a NaN champion of old
    worse = new_candidate(score * 3)
    assert promote(cfg)["promoted"]  # anything finite replaces it
    assert client.get_model_version_by_alias("sit-test", "champion").version == worse


@contextlib.contextmanager
def mlflow_server(root: Path, port: int):
    """A real MLflow server on 127.0.0.1:``port`` storing under ``root``; its URL once healthy."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers go with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_server_receives_a_run_over_http(synthetic_store, tmp_path):
    with mlflow_server(tmp_path, free_port()) as url:
        proc = train_tracked(synthetic_store, tmp_path, "http", url, steps=3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("test")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and "test_mae" in runs[0].data.metrics
        assert client.get_model_version_by_alias("sit-test", "candidate").version == "1"


def test_server_outage_neither_stalls_nor_loses_the_run(synthetic_store, tmp_path):
    """The server goes down once the run is open: training ends normally, keeps its metrics in
    the run directory, and the same command, once the server is back, continues the MLflow run
    with every step and registers the model."""
    from mlflow.tracking import MlflowClient

    port, steps = free_port(), 12
    args = overrides(
        synthetic_store,
        tmp_path,
        "outage",
        steps,
        [
            "train.eval_every=6",
            "train.checkpoint_every=6",
            "train.log_every=1",
            f"tracking.uri=http://127.0.0.1:{port}",
            "tracking.experiment=test",
            "tracking.model_name=sit-outage",
        ],
    )
    run_dir = tmp_path / "outage"
    with mlflow_server(tmp_path, port):
        job = subprocess.Popen(
            [sys.executable, "launch/train.py", *args],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not (run_dir / "mlflow_run").exists() and job.poll() is None:
            assert time.time() < deadline, "the run never opened"
            time.sleep(0.1)
    # the server is down from before the first step to the end of training
    began = time.time()
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert time.time() - began < 240  # MLflow's own retries alone took 8 min
    assert "does not answer" in err and "were not logged" in err, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["model_uri"] is None
    assert (run_dir / "checkpoints" / f"step{steps:08d}").is_dir()
    unsent = (run_dir / "mlflow_unsent.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in unsent if "train_loss" in line] == list(
        range(1, steps + 1)
    )
    run_id = (run_dir / "mlflow_run").read_text()

    with mlflow_server(tmp_path, port) as url:
        proc = run_train(args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"continuing run {run_id}" in proc.stdout
        client = MlflowClient(tracking_uri=url)
        runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "test_mae" in run.data.metrics
        history = client.get_metric_history(run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
        assert client.get_model_version_by_alias("sit-outage", "candidate").run_id == run_id
    assert not (run_dir / "mlflow_unsent.jsonl").exists()


def test_crashed_run_is_recorded_as_failed(synthetic_store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # a diverging loss stops training with a clear error, after the run is open
    proc = train_tracked(synthetic_store, tmp_path, "crash", uri, steps=20, extra=["train.lr=1e30"])
    assert proc.returncode == 2 and "not finite" in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_server_is_a_clear_error_before_training(synthetic_store, tmp_path):
    port = free_port()
    proc = train_tracked(synthetic_store, tmp_path, "nope", f"http://127.0.0.1:{port}")
    assert proc.returncode == 2
    assert "unreachable" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "nope" / "checkpoints").exists()


def test_a_validation_is_in_mlflow_before_it_is_reported(synthetic_store, tmp_path):
    """A sweep's scheduler may stop a trial as soon as it hears of a validation, and the
    trial's process may end before a background send: log_validation returns once the
    validation is in MLflow, not only queued (the loop reports to Tune after it)."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.data.store import open_store
    from pipeline.track.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(
        None, [f"tracking.uri={uri}", "tracking.experiment=val", f"train.out_dir={tmp_path}"]
    )
    tracker = Tracker(cfg)
    tracker.start(open_store(synthetic_store))
    try:
        for step in (3, 6):
            tracker.log_validation(step, {"loss": 0.5 / step, "mean": {"mae": 1.0 / step}})
            assert tracker.sender.pending == []
        history = MlflowClient(uri).get_metric_history(tracker.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(3, 0.5 / 3), (6, 0.5 / 6)]
    finally:
        tracker.sender.close()
