"""The exported model's predictor: tiled inference (targets + receptive-field halo) equals
whole-network inference with the knn backend."""

import numpy as np
import pytest
import torch
from tiny import export_untrained

from pipeline.model.export import Predictor


def test_tiled_prediction_equals_whole_network(synthetic_store, tmp_path):
    path, _, store = export_untrained(synthetic_store, tmp_path / "model", 3)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    x[0, 2, ::7] = np.nan  # missing values travel through the tiles too
    origin = store["time"][106:107]
    predictor = Predictor(path)
    whole = predictor.predict(x, origin)
    assert predictor.tile_size is None
    for tile_size in (50, 64, 299):
        tiled = predictor.predict(x, origin, tile_size=tile_size)
        for key in ("mean", "std"):
            assert np.isfinite(tiled[key]).all()
            np.testing.assert_allclose(tiled[key], whole[key], rtol=1e-5, atol=1e-5)
    # the halo must cover the receptive field: one hop for a three-layer model is not enough
    predictor.model.cfg.layers = 1
    short = predictor.predict(x, origin, tile_size=50)
    assert np.abs(short["mean"] - whole["mean"]).max() > 1e-3


def test_origin_time_must_be_nanoseconds_and_the_batch_not_empty(synthetic_store, tmp_path):
    path, _, store = export_untrained(synthetic_store, tmp_path / "model", 1)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    origin = store["time"][106:107]  # int64 ns
    predictor = Predictor(path)
    ref = predictor.predict(x, origin)["mean"]
    as_datetime = predictor.predict(x, origin.astype("datetime64[ns]"))["mean"]
    np.testing.assert_array_equal(as_datetime, ref)
    with pytest.raises(ValueError, match="not in nanoseconds.*seconds x 1e9"):
        predictor.predict(x, origin // 10**9)  # seconds: a wrong calendar, silently, before
    with pytest.raises(ValueError, match="batch 0"):
        predictor.predict(x[:0], origin[:0])
    with pytest.raises(ValueError, match="2 times for a batch of 1"):
        predictor.predict(x, np.concatenate([origin, origin]))


def test_error_codes_in_the_window_and_non_finite_forecasts_are_errors(synthetic_store, tmp_path):
    """A window scaled by 1e30 (a unit mistake) used to return all-NaN forecasts silently."""

    path, _, store = export_untrained(synthetic_store, tmp_path / "model", 1)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    origin = store["time"][106:107]
    predictor = Predictor(path)
    assert np.isfinite(predictor.predict(x, origin)["mean"]).all()
    with pytest.raises(
        ValueError, match=r"x\[0, 0, 0, 0\] = -?[0-9.]+e\+30 \(sensor s\d+, 1800 such"
    ):
        predictor.predict(x * np.float32(1e30), origin)
    # damaged weights: every forecast NaN, said so rather than returned
    with torch.no_grad():
        next(predictor.model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="forecast of window 0 is not finite at sensor"):
        predictor.predict(x, origin)


def test_pyfunc_input_without_its_keys_is_a_clear_error():
    from pipeline.track.tracking import ForecastPyfunc

    with pytest.raises(ValueError, match="lacks origin_time"):
        ForecastPyfunc().predict(None, {"x": np.zeros((1, 6, 3, 1))})


@pytest.mark.parametrize("profile", [False, True])
def test_query_points_forecast_tile_by_tile_as_in_one_piece(synthetic_store, tmp_path, profile):
    """Points without a sensor: each forecast from its nearest sensors' windows (their
    receptive field), so tiled and whole forecasts agree; a point moves with its neighbours'
    data and not with the data of sensors beyond its receptive field."""
    extra = ["model.daily_profile=true"] if profile else []
    path, _, store = export_untrained(synthetic_store, tmp_path / "model", 2, extra)
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    origin = store["time"][106:107]
    coords = store["coords"][:]
    lo, hi = coords.min(0), coords.max(0)
    query = lo + (hi - lo) * np.random.default_rng(0).random((23, 2))  # [23, 2] inside
    predictor = Predictor(path)
    whole = predictor.predict(x, origin, query=query)
    assert whole["query_mean"].shape == (1, 3, 23, 1) and whole["query_std"].shape == (1, 3, 23, 1)
    assert np.isfinite(whole["query_mean"]).all() and (whole["query_std"] > 0).all()
    np.testing.assert_array_equal(whole["mean"], predictor.predict(x, origin)["mean"])
    for tile_size in (5, 64):
        tiled = predictor.predict(x, origin, tile_size=tile_size, query=query)
        for key in ("query_mean", "query_std", "mean"):
            np.testing.assert_allclose(tiled[key], whole[key], rtol=1e-5, atol=1e-5)
    # the nearest sensor's window moves the first point's forecast; a far sensor's does not
    pos = predictor.pos.numpy()
    qpos = predictor._query_positions(query[:1])
    order = np.argsort(((pos - qpos) ** 2).sum(1))
    near, far = order[0], order[-1]
    for sensor, moves in ((near, True), (far, False)):
        changed = x.copy()
        changed[0, :, sensor] += 5 * predictor.std[sensor]
        after = predictor.predict(changed, origin, query=query[:1])["query_mean"]
        assert (np.abs(after - whole["query_mean"][:, :, :1]).max() > 1e-4) == moves


def test_the_forecast_std_grows_away_from_the_network(reference, synthetic_store):
    """Uncertainty behaves geostatistically: with the trained model's kriging variance, a
    point 5 estimated ranges outside the network has a larger forecast std than a sensor and
    than a point at that sensor's coordinates, at every horizon step."""
    from pipeline.data.store import open_store

    store = open_store(synthetic_store)
    predictor = Predictor(reference / "ref" / "model")
    reach = 5 * predictor.model.kernel_estimate()["range_km"]
    coords = store["coords"][:]  # x/y km
    sensor = int(np.argmin(coords[:, 0]))
    far = coords[sensor] - np.array([reach, 0.0])  # 5 ranges west of the westernmost sensor
    x = store["values"][100:106][None].astype(np.float32)  # [1, 6, 300, 1]
    out = predictor.predict(x, store["time"][106:107], query=np.stack([coords[sensor], far]))
    at_sensor, at_point, outside = (
        out["std"][0, :, sensor, 0],
        out["query_std"][0, :, 0, 0],
        out["query_std"][0, :, 1, 0],
    )  # [horizon] each
    assert (outside > at_sensor).all() and (outside > at_point).all(), (outside, at_sensor)


def test_query_points_that_cannot_be_forecast_are_clear_errors(synthetic_store, tmp_path):
    path, _, store = export_untrained(synthetic_store, tmp_path / "model", 1)
    x = store["values"][100:106][None].astype(np.float32)
    origin = store["time"][106:107]
    predictor = Predictor(path)
    with pytest.raises(ValueError, match=r"finite coordinates \[points, 2\].*got shape \[3\]"):
        predictor.predict(x, origin, query=np.zeros(3))
    with pytest.raises(ValueError, match="finite coordinates"):
        predictor.predict(x, origin, query=np.array([[np.nan, 1.0]]))
