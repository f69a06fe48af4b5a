import numpy as np
import pytest
import scoringrules
import torch
from scipy import stats

from pipeline.metrics import MetricAccumulator


def _data(seed=0, shape=(3, 4, 50, 2)):
    rng = np.random.default_rng(seed)
    mean = rng.normal(10, 3, shape)
    std = rng.uniform(0.5, 4, shape)
    y = mean + rng.normal(0, 1, shape) * std * rng.uniform(0.5, 2)
    y[rng.random(shape) < 0.02] = 0.0  # zero targets: excluded from MAPE only
    mask = rng.random(shape) > 0.25
    return mean, std, y, mask


def test_metrics_match_reference_implementations():
    mean, std, y, mask = _data()
    acc = MetricAccumulator(horizon=4, bins=10)
    t = lambda a: torch.tensor(a)  # noqa: E731
    for b in range(3):  # several batches, merged
        acc.update(t(mean[b : b + 1]), t(std[b : b + 1]), t(y[b : b + 1]), t(mask[b : b + 1]))
    res = acc.result()
    crps = scoringrules.crps_normal(y, mean, std)
    z = (y - mean) / std
    lo50, hi50 = stats.norm.interval(0.5)
    lo90, hi90 = stats.norm.interval(0.9)
    for h in range(4):
        m = mask[:, h]
        e = (y - mean)[:, h][m]
        assert res["mae"][h] == pytest.approx(np.abs(e).mean(), rel=1e-12)
        assert res["rmse"][h] == pytest.approx(np.sqrt((e**2).mean()), rel=1e-12)
        nz = m & (np.abs(y[:, h]) > 1e-6)
        assert res["mape"][h] == pytest.approx(
            (np.abs(y - mean)[:, h][nz] / np.abs(y[:, h][nz])).mean(), rel=1e-12
        )
        assert res["crps"][h] == pytest.approx(crps[:, h][m].mean(), rel=1e-10)
        zh = z[:, h][m]
        assert res["coverage_50"][h] == pytest.approx(
            ((zh >= lo50) & (zh <= hi50)).mean(), rel=1e-12
        )
        assert res["coverage_90"][h] == pytest.approx(
            ((zh >= lo90) & (zh <= hi90)).mean(), rel=1e-12
        )
    u = stats.norm.cdf(z[mask])
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / mask.sum()
    np.testing.assert_allclose(res["pit_histogram"], hist, atol=1e-12)
    assert res["mean"]["mae"] == pytest.approx(np.abs(y - mean)[mask].mean(), rel=1e-12)
    assert res["count"] == mask.sum()


def test_calibrated_forecasts_have_flat_pit_and_nominal_coverage():
    rng = np.random.default_rng(1)
    shape = (64, 2, 200, 1)
    mean, std = rng.normal(size=shape), rng.uniform(0.5, 2, shape)
    y = mean + std * rng.normal(size=shape)
    acc = MetricAccumulator(2)
    acc.update(
        torch.tensor(mean), torch.tensor(std), torch.tensor(y), torch.ones(shape, dtype=torch.bool)
    )
    res = acc.result()
    assert res["pit_uniform_distance"] < 0.02
    assert abs(res["mean"]["coverage_90"] - 0.9) < 0.01
    overconfident = MetricAccumulator(2)
    overconfident.update(
        torch.tensor(mean),
        torch.tensor(std / 3),
        torch.tensor(y),
        torch.ones(shape, dtype=torch.bool),
    )
    assert overconfident.result()["pit_uniform_distance"] > 0.2
