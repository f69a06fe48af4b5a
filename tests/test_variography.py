"""Deep variography: the learned range moves from a wrong initial value towards the truth.

Setting (docs/variography.md): one head, kernel prior alone, one-step input window, nugget 10x
the sill. In that noise-dominated regime the best linear predictor's weights are proportional
to the covariance, so the forecasting loss identifies the range.
"""

import math

import pytest
import torch

from benchmarks.quickfit import fit_synthetic
from pipeline.config import load_config

TRUE_KM = 10.0


@pytest.mark.parametrize("init_km", [40.0, 2.5])
def test_learned_range_moves_towards_truth(init_km):
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            "data.synthetic.family=matern32",
            f"data.synthetic.range_km={TRUE_KM}",
            "data.synthetic.nugget=10",
            "data.synthetic.num_sensors=400",
            "data.synthetic.num_steps=800",
            "data.time_in=1",
            "data.horizon=1",
            "model.kernel=matern32",
            f"model.init_range_km={init_km}",
            "model.heads=1",
            "model.layers=1",
            "model.qk_residual=false",
            "model.knn=64",
            "train.steps=200",
            "train.kernel_lr=0.1",
        ],
    )
    result = fit_synthetic(cfg, progress=False)
    learned = result.learned()[0]["range_km"][0]
    before, after = abs(math.log(init_km / TRUE_KM)), abs(math.log(learned / TRUE_KM))
    assert after < 0.5 * before, (init_km, learned)
