"""The real data sets of ../shared/data through the real preprocessing."""

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.data.preprocess import preprocess
from pipeline.data.store import open_store


def build(scheduler, tmp_path, name):
    cfg = load_config(
        f"configs/{name}.yaml",
        [f"dask.scheduler={scheduler}", f"data.store={tmp_path / name}.zarr"],
    )
    return open_store(preprocess(cfg, progress=False))


def test_los_loop(scheduler, tmp_path, shared_data):
    store = build(scheduler, tmp_path, "los_loop")
    assert store.shape == (2016, 207, 1)
    raw = pd.read_csv(shared_data / "los_loop" / "los_speed.csv")
    loc = pd.read_csv(
        shared_data / "los_loop" / "graph_sensor_locations.csv", dtype={"sensor_id": str}
    )
    ids, order = store["sensor_id"][:], store["order"][:]
    np.testing.assert_array_equal(ids, raw.columns.to_numpy()[order])  # order recovers the source
    by_id = loc.set_index("sensor_id")
    np.testing.assert_allclose(
        store["coords"][:], by_id.loc[ids, ["latitude", "longitude"]].to_numpy()
    )
    np.testing.assert_allclose(store["values"][:, :, 0], raw.to_numpy()[:, order], rtol=1e-6)
    assert pd.Timestamp(int(store["time"][0]), tz="UTC") == pd.Timestamp(
        "2012-03-01 00:00", tz="UTC"
    )
    a, b = store.split("train")
    np.testing.assert_allclose(store["mean"][:, 0], raw.to_numpy()[a:b, order].mean(0), rtol=1e-5)
    assert not np.allclose(store["mean"][:, 0], raw.to_numpy()[:, order].mean(0), rtol=1e-5)


def test_aqi36_missing_values_arrive_as_mask(scheduler, tmp_path, shared_data):
    store = build(scheduler, tmp_path, "aqi36")
    assert store.shape == (8759, 36, 1)
    raw = pd.read_csv(shared_data / "aqi36" / "pm25_ground.txt")
    missing = 1 - store["mask"][:].mean()
    assert missing == pytest.approx(raw.iloc[:, 1:].isna().to_numpy().mean(), abs=1e-9)
    assert missing == pytest.approx(0.133, abs=0.001)
    ids, order = store["sensor_id"][:], store["order"][:]
    vals = raw.iloc[:, 1:].to_numpy()[:, order]
    a, b = store.split("train")
    np.testing.assert_allclose(store["mean"][:, 0], np.nanmean(vals[a:b], axis=0), rtol=1e-4)
    np.testing.assert_allclose(store["std"][:, 0], np.nanstd(vals[a:b], axis=0), rtol=1e-3)
    loc = pd.read_csv(
        shared_data / "aqi36" / "pm25_latlng.txt", dtype={"sensor_id": str}
    ).set_index("sensor_id")
    np.testing.assert_allclose(store["coords"][:], loc.loc[ids].to_numpy())
