"""The registered model: it loads in a fresh process and forecasts exactly what the trained
model forecasts (also at query points); it is code and plain files, no pickle; a changed
artifact is refused before any of it runs; it is served over HTTP on loopback and mapped."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tiny import ROOT, child_env, free_port, run_launch


def test_registered_model_forecasts_what_the_trained_model_forecasts(tracked, synthetic_store):
    out, uri = tracked
    metrics = json.loads((out / "tracked" / "metrics.json").read_text())
    assert metrics["model_uri"] == "models:/sit-test@candidate"
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2, 6, 300, 1)).astype(np.float32)
    x[0, 2, 5] = np.nan  # missing values are allowed
    origin = np.array([1_700_000_000_000_000_000, 1_700_000_300_000_000_000])
    np.save(out / "x.npy", x)
    np.save(out / "origin.npy", origin)
    code = f"""
import numpy as np, mlflow
from pipeline.track.tracking import load_model
mlflow.set_tracking_uri({uri!r})
model = load_model("models:/sit-test@candidate")
x, origin = np.load("x.npy"), np.load("origin.npy")
res = model.predict({{"x": x, "origin_time": origin, "query": np.array([[3.0, 4.0]])}})
np.save("pyfunc_mean.npy", res["mean"])
np.save("pyfunc_std.npy", res["std"])
np.save("pyfunc_query.npy", res["query_mean"])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=out,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the trained model: the final DeepSpeed checkpoint's module weights, loaded here
    import torch

    from pipeline.model.export import Predictor

    ckpt = sorted((out / "tracked" / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))[-1]
    trained = torch.load(ckpt, weights_only=True)["module"]
    predictor = Predictor(out / "tracked" / "model")
    predictor.model.load_state_dict({k: v.float() for k, v in trained.items()})
    ref = predictor.predict(x, origin, query=np.array([[3.0, 4.0]]))
    np.testing.assert_array_equal(np.load(out / "pyfunc_query.npy"), ref["query_mean"])
    np.testing.assert_array_equal(np.load(out / "pyfunc_mean.npy"), ref["mean"])
    np.testing.assert_array_equal(np.load(out / "pyfunc_std.npy"), ref["std"])
    assert np.isfinite(ref["mean"]).all()


def test_the_registered_model_is_code_and_plain_files_beside_the_database(tracked):
    """Models from code: the artifact holds our module and the exported files (no pickle),
    under the embedded store's own folder (not the working directory's ./mlruns)."""
    out, uri = tracked
    files = {p.name for p in (out / "mlruns").rglob("*") if p.is_file()}
    assert {"pyfunc_model.py", "weights.pt", "model.json", "network.npz", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files


def serving(uri: str) -> list[str]:
    """launch/serve.py's overrides for the tracked model at alias candidate."""
    return [f"tracking.uri={uri}", "tracking.model_name=sit-test", "tracking.serve_alias=candidate"]


PLANTED = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("how", ["code", "pickle", "weights"])
def test_a_changed_artifact_is_refused_before_any_of_it_runs(tracked, tmp_path, how):
    """The checksums recorded in the tracking store at registration are checked before MLflow
    loads anything: a planted line in the model's code, an added pickle or changed weights are
    refused with one line, and the planted code never runs."""

    marker = tmp_path / "planted-code-ran"

    def change(model: Path) -> None:
        if how == "code":
            (code,) = model.rglob("pyfunc_model.py")
            code.write_text(PLANTED.format(marker=str(marker)) + code.read_text())
        elif how == "pickle":
            (model / "python_model.pkl").write_bytes(b"\x80\x04N.")
        else:
            (weights,) = model.rglob("weights.pt")
            data = bytearray(weights.read_bytes())
            data[-100] ^= 0xFF
            weights.write_bytes(bytes(data))

    out, uri = tracked
    (code,) = (out / "mlruns").rglob("pyfunc_model.py")
    model = code.parent.parent if code.parent.name == "code" else code.parent
    saved = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    try:
        change(model)
        refused(uri, how, marker)
    finally:  # the module's other tests use the same registered model
        (model / "python_model.pkl").unlink(missing_ok=True)
        for p, data in saved.items():
            p.write_bytes(data)


def refused(uri, how, marker) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.track.checksums import ArtifactChanged
    from pipeline.track.tracking import load_model

    mlflow.set_tracking_uri(uri)
    assert MlflowClient().get_model_version_by_alias("sit-test", "candidate").version
    expect = {
        "code": "pyfunc_model.py was changed",
        "pickle": "python_model.pkl was added",
        "weights": "weights.pt was changed",
    }[how]
    with pytest.raises(ArtifactChanged, match=expect):
        load_model("models:/sit-test@candidate")
    assert not marker.exists()
    proc = run_launch("serve.py", [*serving(uri), f"tracking.serve_port={free_port()}"], 120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_the_served_model_forecasts_over_http_on_loopback(tracked, synthetic_store):
    """launch/serve.py: MLflow's scoring server of the verified model on 127.0.0.1 answers
    /invocations with the forecast the exported model makes."""
    out, uri = tracked
    port, log = free_port(), out / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "launch/serve.py", *serving(uri), f"tracking.serve_port={port}"],
        cwd=ROOT,
        env=child_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/ping", timeout=2) as resp,
            ):
                if resp.status == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError("the server did not answer /ping in 180 s")
        x = np.random.default_rng(1).normal(0, 1, (1, 6, 300, 1)).astype(np.float32)
        origin = np.array([1_700_000_000_000_000_000])
        body = json.dumps({"inputs": {"x": x.tolist(), "origin_time": origin.tolist()}})
        request = urllib.request.Request(
            url + "/invocations", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    from pipeline.model.export import Predictor

    ref = Predictor(out / "tracked" / "model").predict(x, origin)
    np.testing.assert_allclose(np.asarray(served["mean"]), ref["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(served["std"]), ref["std"], rtol=1e-5, atol=1e-5)


def test_a_map_of_the_registered_model(tracked, synthetic_store, tmp_path):
    """launch/map.py on a models:/ URI: the files fetched and checked, the map written."""
    _, uri = tracked
    model = ["--model", "models:/sit-test@candidate", "--tracking-uri", uri]
    proc = run_launch(
        "map.py", [*model, "--store", str(synthetic_store), "--grid", "8", "--out", str(tmp_path)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("map-*.nc"))) == 1 and len(list(tmp_path.glob("map-*.png"))) == 1
