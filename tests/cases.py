"""Small raw-data cases for the preprocessing and source tests: a wide CSV with a locations
file, and running preprocessing on the session's Dask cluster."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.preprocess import preprocess
from pipeline.data.sources import SourceError
from pipeline.data.store import StoreError

ROOT = Path(__file__).resolve().parents[1]
IDS = ["a1", "b2", "c3", "d4"]


def write_case(tmp_path, rows=None, header=None, locations=None):
    """A wide CSV with a time column (hourly) and a locations file; returns overrides."""
    header = header or ["time", *IDS]
    if rows is None:
        t = pd.date_range("2024-01-01", periods=60, freq="1h")
        rows = [
            [str(s)] + [f"{v:.2f}" for v in np.random.default_rng(i).normal(50, 5, 4)]
            for i, s in enumerate(t)
        ]
    data = tmp_path / "data.csv"
    data.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    loc = tmp_path / "loc.csv"
    locations = locations or [(s, 34.0 + 0.01 * i, -118.0 - 0.01 * i) for i, s in enumerate(IDS)]
    loc.write_text(
        "sensor_id,latitude,longitude\n" + "\n".join(f"{a},{b},{c}" for a, b, c in locations) + "\n"
    )
    return [
        "data.source.kind=wide_csv",
        f"data.source.path={data}",
        f"data.source.locations={loc}",
        "data.source.time_column=time",
        f"data.store={tmp_path / 'out.zarr'}",
        "data.time_in=4",
        "data.horizon=2",
        "data.neighbours=3",
    ]


def run(scheduler, overrides):
    return preprocess(
        load_config(None, [f"dask.scheduler={scheduler}", *overrides]), progress=False
    )


def expect_error(scheduler, tmp_path, overrides, *patterns):
    with pytest.raises((SourceError, StoreError, ConfigError)) as err:
        run(scheduler, overrides)
    for p in patterns:
        assert p in str(err.value), (p, str(err.value))
    leftovers = [p for p in tmp_path.iterdir() if "zarr" in p.name]
    assert leftovers == [], leftovers
    return str(err.value)


def hourly_rows(n=60, start="2024-01-01"):
    t = pd.date_range(start, periods=n, freq="1h")
    return [[str(s), "1", "2", "3", "4"] for s in t]
