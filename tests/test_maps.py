"""Forecast maps: the exported model's forecast on a grid over the network (query points),
as a Dataset, a NetCDF file and a PNG from launch/map.py."""

import numpy as np
import pytest
import xarray as xr
from tiny import export_untrained, run_launch

from pipeline.evaluate.maps import forecast_grid, window_ending_at
from pipeline.model.export import Predictor


@pytest.fixture(scope="module")
def exported(synthetic_store, tmp_path_factory):
    path, _, store = export_untrained(synthetic_store, tmp_path_factory.mktemp("map") / "m", 2)
    return path, store


def test_the_grid_is_the_query_forecast_of_each_cell(exported):
    path, store = exported
    predictor = Predictor(path)
    origin = 200
    ds = forecast_grid(predictor, store, origin, size=12)
    assert ds["mean"].shape == (3, 1, 12, 12) and ds["interval90"].shape == (3, 1, 12, 12)
    assert np.isfinite(ds["mean"]).all() and (ds["interval90"] > 0).all()
    # cell (row 4, column 7) is the query point (x[7], y[4])
    point = np.array([[ds["x_km"].values[7], ds["y_km"].values[4]]])
    x = window_ending_at(store, origin, 6)
    alone = predictor.predict(x, store["time"][origin : origin + 1], query=point)
    np.testing.assert_allclose(
        ds["mean"].values[:, 0, 4, 7], alone["query_mean"][0, :, 0, 0], rtol=1e-5
    )
    width = 2 * 1.6448536 * alone["query_std"][0, :, 0, 0]
    np.testing.assert_allclose(ds["interval90"].values[:, 0, 4, 7], width, rtol=1e-5)
    coords = store["coords"][:]  # the grid covers every sensor
    assert ds["x_km"].min() < coords[:, 0].min() and ds["x_km"].max() > coords[:, 0].max()


def test_the_map_command_writes_netcdf_and_png(exported, tmp_path):
    path, store = exported
    when = str(store["time"][200].astype("datetime64[ns]"))[:16]
    command = ["--model", str(path), "--store", str(store.path)]
    proc = run_launch(
        "map.py", [*command, "--origin", when, "--grid", "16", "--out", str(tmp_path)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (nc,) = tmp_path.glob("map-*.nc")
    assert nc.with_suffix(".png").is_file() and not list(tmp_path.glob("*.tmp"))
    ds = xr.open_dataset(nc, engine="h5netcdf")
    expect = forecast_grid(Predictor(path), store, 200, size=16)
    np.testing.assert_allclose(ds["mean"].values, expect["mean"].values, rtol=1e-6)
    bad = run_launch("map.py", [*command, "--origin", "1999-01-01T00:00", "--out", str(tmp_path)])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "is not a time step of" in bad.stderr.strip().splitlines()[-1]
