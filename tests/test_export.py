"""The exported model's predictor: tiled inference (targets + receptive-field halo) equals
whole-network inference with the knn backend."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.store import open_store
from pipeline.model.export import Predictor, export_model
from pipeline.model.forecaster import Forecaster


def _exported(store_path, tmp_path, layers):
    cfg = load_config(
        None,
        [
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
    model = Forecaster(cfg.model, 6, 3, store.shape[2])
    return export_model(model, cfg, store, tmp_path / "model"), store


def test_tiled_prediction_equals_whole_network(synthetic_store, tmp_path):
    path, store = _exported(synthetic_store, tmp_path, layers=3)
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
    path, store = _exported(synthetic_store, tmp_path, layers=1)
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


def test_pyfunc_input_without_its_keys_is_a_clear_error():
    from pipeline.track.tracking import ForecastPyfunc

    with pytest.raises(ValueError, match="lacks origin_time"):
        ForecastPyfunc().predict(None, {"x": np.zeros((1, 6, 3, 1))})
