import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scheduler():
    """A real local Dask cluster shared by the tests (passed as dask.scheduler)."""
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def synthetic_store(scheduler, tmp_path_factory):
    """A small synthetic store (300 sensors x 400 steps, small chunks)."""
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess

    path = tmp_path_factory.mktemp("stores") / "syn.zarr"
    cfg = load_config(
        None,
        [
            f"dask.scheduler={scheduler}",
            f"data.store={path}",
            "data.synthetic.num_sensors=300",
            "data.synthetic.num_steps=400",
            "data.time_chunk=32",
            "data.node_chunk=64",
            "data.time_in=6",
            "data.horizon=3",
            "data.neighbours=8",
        ],
    )
    return preprocess(cfg, progress=False)


@pytest.fixture(scope="session")
def tracked(synthetic_store, tmp_path_factory):
    """A tiny tracked run whose model is registered (test_tracking.py, test_registry.py)."""
    from tiny import train_tracked

    out = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{out / 'mlruns.db'}"
    proc = train_tracked(synthetic_store, out, "tracked", uri)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, uri


@pytest.fixture(scope="session")
def reference(synthetic_store, tmp_path_factory):
    """An uninterrupted 2-process run of 12 steps (test_train.py, test_resume.py)."""
    from tiny import checkpointed, finish, launch

    out = tmp_path_factory.mktemp("runs")
    finish(launch(checkpointed(synthetic_store, out, "ref", 12)))
    return out
