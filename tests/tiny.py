"""Tiny training runs for the end-to-end tests: config overrides, launching and finishing a run,
its metrics, and the child environment."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def overrides(store, out, name, steps, extra=()) -> list[str]:
    """A one-layer, 16-wide model on 6-step windows of the session's synthetic store."""
    return [
        f"data.store={store}",
        f"train.out_dir={out}",
        f"name={name}",
        f"train.steps={steps}",
        "data.time_in=6",
        "data.horizon=3",
        "model.d_model=16",
        "model.heads=2",
        "model.layers=1",
        "model.knn=8",
        "train.batch_size=4",
        "train.eval_batches=2",
        *extra,
    ]


def checkpointed(store, out, name, steps, extra=()) -> list[str]:
    """:func:`overrides` with a checkpoint and a validation every 4 steps, tracking off."""
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


def launch(args, procs=2, **kw) -> subprocess.Popen:
    """launch/train.py in one process, or under the deepspeed launcher with ``procs``."""
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


def finish(proc, timeout=600) -> str:
    """The output of a launched run, which must succeed."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(out, name) -> dict:
    """metrics.json of run ``name`` under ``out``."""
    return json.loads((Path(out) / name / "metrics.json").read_text())


def child_env() -> dict[str, str]:
    """Environment of launched processes: CPU DeepSpeed, no telemetry, one thread each; a
    Ray head a test starts needs no auth token (it is reachable from this machine only; the
    local sweep of test_tune.py runs with token auth, as a user's does). MLFLOW_TRACKING_URI is
    dropped: mlflow.set_tracking_uri in this process exports it, and each launched job names
    its own store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {
        **env,
        "DS_ACCELERATOR": "cpu",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
    }


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launch(script: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``launch/<script>`` in one process with :func:`child_env`; output captured."""
    return subprocess.run(
        [sys.executable, f"launch/{script}", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``launch/train.py`` in one process with :func:`child_env`; output captured."""
    return run_launch("train.py", args, timeout)


def train_tracked(store, out, name, uri, steps=6, extra=()) -> subprocess.CompletedProcess:
    """A tiny run tracked in MLflow at ``uri`` (experiment ``test``), registered as
    ``sit-test``."""
    tracking = [f"tracking.uri={uri}", "tracking.experiment=test", "tracking.model_name=sit-test"]
    common = ["train.eval_every=3", "train.checkpoint_every=100", "train.log_every=2"]
    return run_train(overrides(store, out, name, steps, [*common, *tracking, *extra]))


def export_untrained(store_path, path, layers: int, extra=()):
    """A seeded, untrained 16-wide model on 6-step windows of ``store_path``, exported to
    ``path``; returns the folder, the model and the store."""
    import torch

    from pipeline.config import load_config
    from pipeline.data.store import open_store
    from pipeline.model.export import export_model
    from pipeline.model.forecaster import Forecaster

    cfg = load_config(
        None,
        [
            *extra,
            f"data.store={store_path}",
            "data.time_in=6",
            "data.horizon=3",
            "model.d_model=16",
            "model.heads=2",
            f"model.layers={layers}",
            "model.knn=8",
        ],
    )
    store = open_store(store_path)
    torch.manual_seed(0)
    model = Forecaster(cfg.model, 6, 3, store.shape[2], num_nodes=store.shape[1]).eval()
    return export_model(model, cfg, store, Path(path)), model, store


def listeners(proc: subprocess.Popen, every: float = 0.2) -> tuple[set[str], str]:
    """The local addresses (``ip:port``) on which ``proc`` or any process below it listened
    for TCP while it ran, sampled with ``ss -ltnp`` until it ends; and its output (its pipes
    are drained meanwhile, so that a talkative process never blocks on a full pipe)."""
    import psutil

    chunks: list[str] = []
    pipes = [p for p in (proc.stdout, proc.stderr) if p is not None]
    readers = [threading.Thread(target=lambda p=p: chunks.append(p.read())) for p in pipes]
    for reader in readers:
        reader.start()
    seen: set[str] = set()
    while proc.poll() is None:
        try:
            tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        table = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in table.splitlines():
            fields = line.split()
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if pids & tree:
                seen.add(fields[3])
        time.sleep(every)
    proc.wait()
    for reader in readers:
        reader.join()
    return seen, "".join(chunks)
