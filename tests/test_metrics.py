import json

import numpy as np
import pytest
import scoringrules
import torch
from dieboldmariano import dm_test
from scipy import stats

from pipeline.data.neighbours import k_nearest
from pipeline.evaluate.metrics import (
    BASELINES,
    HISTORICAL,
    BaselineSpread,
    ComparisonAccumulator,
    MetricAccumulator,
    diebold_mariano,
    last_observed,
    morans_i,
)
from pipeline.evaluate.report import dm_text
from pipeline.model.losses import gaussian_crps


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


@pytest.mark.parametrize("h", [1, 3, 12])
def test_diebold_mariano_matches_the_reference_package(h):
    """Statistic and p-value against the `dieboldmariano` package (HLN correction, t on T - 1
    degrees of freedom) on autocorrelated losses."""
    rng = np.random.default_rng(h)
    t = 300
    v = np.cumsum(rng.normal(size=t))
    p1 = v + np.convolve(rng.normal(size=t + 4), np.ones(5) / 5, "valid")
    p2 = v + 1.05 * np.convolve(rng.normal(size=t + 4), np.ones(5) / 5, "valid")
    d = np.abs(v - p1) - np.abs(v - p2)
    ours = diebold_mariano(d, h)
    stat, p = dm_test(list(v), list(p1), list(p2), loss=lambda a, b: abs(a - b), h=h)
    assert ours["statistic"] == pytest.approx(stat, rel=1e-10)
    assert ours["p_value"] == pytest.approx(p, rel=1e-8)
    assert ours["T"] == t


def test_diebold_mariano_detects_a_better_forecast_and_not_an_equal_one():
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(2000, 400))
    equal = [diebold_mariano(row, 1)["p_value"] for row in noise]
    # under the null the p-values are uniform: 5 % of them below 0.05 (binomial sd 0.5 %)
    assert abs(np.mean(np.array(equal) < 0.05) - 0.05) < 0.02
    better = diebold_mariano(noise[0] - 0.5, 1)  # the first forecast's loss is lower
    assert better["statistic"] < 0 and better["p_value"] < 1e-6


def test_diebold_mariano_says_why_it_is_not_testable_in_valid_json():
    """Too few windows for the horizon (a short test split at 1M sensors gave 7 windows at
    horizon 12) and a constant differential: no statistic, a reason, and JSON without NaN."""
    few = diebold_mariano(np.linspace(-1, 1, 7), 12)
    assert few["testable"] is False and few["statistic"] is None and few["p_value"] is None
    assert "7 test windows" in few["reason"] and "25" in few["reason"]
    same = diebold_mariano(np.full(40, 0.3), 1)
    assert same["testable"] is False and same["mean_difference"] == pytest.approx(0.3)
    json.loads(json.dumps([few, same], allow_nan=False))
    assert dm_text(few) == f"not testable ({few['reason']})"
    ok = diebold_mariano(np.random.default_rng(0).normal(size=50), 1)
    assert ok["testable"] is True and dm_text(ok).startswith(f"{ok['statistic']:+.2f} (p ")


def _graph(n, k, seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    idx, _ = k_nearest(np.c_[xy, np.zeros(n)], k)
    return xy, idx


def test_morans_i_matches_the_dense_formula_and_the_permutation_moments():
    """I from the dense weight matrix; its expectation and variance under randomisation equal
    the mean and variance of I over random permutations of the values."""
    n, k = 40, 5
    xy, idx = _graph(n, k, 0)
    rng = np.random.default_rng(1)
    values = np.sin(xy[:, 0] / 15) + rng.normal(0, 0.3, n)  # smooth field + noise
    res = morans_i(values, idx)

    w = np.zeros((n, n))
    for i in range(n):
        w[i, idx[i, 1:]] = 1 / (k - 1)
    z = values - values.mean()
    assert res["I"] == pytest.approx(n / w.sum() * z @ w @ z / (z @ z), rel=1e-12)
    assert res["I"] > 0.3 and res["p_value"] < 1e-4  # a smooth field is autocorrelated

    perms = 40_000
    zp = z[np.argsort(rng.random((perms, n)), axis=1)]  # [perm, n]
    i_perm = n / w.sum() * np.einsum("pi,ij,pj->p", zp, w, zp) / (z @ z)
    se_mean = np.sqrt(res["variance"] / perms)
    assert abs(i_perm.mean() - res["expected"]) < 4 * se_mean
    # the sample variance of 40k draws is within ~1 % of the truth; 4 % is 4 standard errors
    assert i_perm.var() == pytest.approx(res["variance"], rel=0.04)


def test_morans_i_leaves_out_sensors_without_a_value():
    xy, idx = _graph(60, 6, 2)
    values = np.sin(xy[:, 1] / 20)
    values[[3, 17, 40]] = np.nan
    res = morans_i(values, idx)
    assert res["n"] == 57 and np.isfinite(res["I"]) and res["p_value"] < 1e-3


@pytest.mark.parametrize("case", ["complete", "constant", "too-few"])
def test_morans_i_says_when_it_cannot_be_tested(case):
    """A complete graph (N <= k), equal residuals or under 4 sensors: "not testable" with the
    reason, never p = 1 or NaN (metrics.json stays valid JSON)."""
    n = {"complete": 8, "constant": 30, "too-few": 3}[case]
    xy, idx = _graph(n, min(n, 9), 2)
    values = np.ones(n) if case == "constant" else np.sin(xy[:, 0] / 20)
    res = morans_i(values, idx)
    assert res["testable"] is False and res["p_value"] is None and res["reason"]
    json.dumps(res, allow_nan=False)


def test_last_observed_takes_the_latest_observed_input():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).T[None, :, :, None]  # [1, 3, 2, 1]
    mask = torch.tensor([[True, True, False], [False, False, False]]).T[None, :, :, None]
    fallback = torch.tensor([[-1.0], [-2.0]])
    out = last_observed(x, mask, fallback)
    assert out[0, :, 0].tolist() == [2.0, -2.0]


def test_comparison_sums_merge_across_batches_tiles_and_ranks():
    """Windows split over batches, node tiles and two accumulators (as two ranks merged by
    an all-reduce) give the same per-window losses and per-sensor residuals as one pass."""
    rng = np.random.default_rng(5)
    b, h, n, f = 12, 3, 30, 2
    origins = np.arange(100, 100 + b)
    mean, std = rng.normal(5, 1, (b, h, n, f)), rng.uniform(0.5, 2, (b, h, n, f))
    y = mean + rng.normal(0, 1, (b, h, n, f))
    mask = rng.random((b, h, n, f)) > 0.2
    last = rng.normal(5, 1, (b, n, f))
    tm, ts = rng.normal(5, 1, (n, f)), rng.uniform(1, 2, (n, f))
    t = torch.tensor

    hist = rng.normal(5, 1, (b, h, n, f))  # a historical average per target
    names = (*BASELINES, HISTORICAL)

    def points(rows, nodes):
        return {
            "last_value": t(last[rows][:, nodes])[:, None],
            "train_mean": t(tm[nodes]),
            HISTORICAL: t(hist[rows][:, :, nodes]),
        }

    whole = ComparisonAccumulator(origins, n, h, "cpu", names=names)
    everything = points(slice(None), np.arange(n))
    whole.update(t(origins), torch.arange(n), t(mean), t(std), t(y), t(mask), everything, t(ts))
    ranks = [ComparisonAccumulator(origins, n, h, "cpu", names=names) for _ in range(2)]
    for r, rows in enumerate([slice(0, 5), slice(5, b)]):
        for nodes in (np.arange(0, 18), np.arange(18, n)):
            sel = (rows, slice(None), nodes)
            ranks[r].update(
                t(origins[rows]), t(nodes), t(mean[sel]), t(std[sel]), t(y[sel]),
                t(mask[sel]), points(rows, nodes), t(ts[nodes]),
            )  # fmt: skip
    merged = ranks[0].windows + ranks[1].windows
    np.testing.assert_allclose(merged, whole.windows, rtol=1e-12)
    np.testing.assert_allclose(ranks[0].nodes + ranks[1].nodes, whole.nodes, rtol=1e-12)

    _, idx = _graph(n, 4, 3)
    res = whole.result(idx)
    assert set(res["baselines"]) == set(names)
    err_last = np.abs(y - last[:, None])[mask].mean()
    assert res["baselines"]["last_value"]["mae"] == pytest.approx(err_last, rel=1e-12)
    err_hist = np.abs(y - hist)[mask].mean()
    assert res["baselines"][HISTORICAL]["mae"] == pytest.approx(err_hist, rel=1e-12)
    model_w = np.array([np.abs(y - mean)[i][mask[i]].mean() for i in range(b)])
    base_w = np.array([np.abs(y - tm)[i][mask[i]].mean() for i in range(b)])
    expected = diebold_mariano(model_w - base_w, h)
    assert res["baselines"]["train_mean"]["dm_mae"] == pytest.approx(expected)
    resid = ((y - mean) / ts * mask).sum((0, 1, 3)) / mask.sum((0, 1, 3))
    assert res["morans_i"] == pytest.approx(morans_i(resid, idx))


def test_baselines_are_gaussian_forecasts_with_a_spread_fitted_per_step():
    """BaselineSpread gives each baseline's RMS error per horizon step in train-std units; with
    it, a baseline's CRPS is that of N(point, (spread_h * train_std)^2), not its MAE."""
    rng = np.random.default_rng(8)
    b, h, n, f = 40, 3, 25, 1
    y = torch.from_numpy(rng.normal(0, 1, (b, h, n, f)) * np.array([1, 2, 3])[None, :, None, None])
    mask = torch.from_numpy(rng.random((b, h, n, f)) > 0.1)
    last = torch.from_numpy(rng.normal(0, 1, (b, n, f)))
    spread = BaselineSpread(h)
    zero = torch.zeros(n, f, dtype=torch.float64)
    spread.update(y[:20], mask[:20], {"last_value": last[:20, None], "train_mean": zero})
    spread.update(y[20:], mask[20:], {"last_value": last[20:, None], "train_mean": zero})
    rms = spread.result()
    m = mask.double()
    expected = (((y - last[:, None]) ** 2 * m).sum((0, 2, 3)) / m.sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(rms["last_value"], expected)
    assert rms["train_mean"][2] > rms["train_mean"][0] * 2  # the third step varies 3x as much

    tm, ts = (
        torch.full((n, f), 5.0, dtype=torch.float64),
        torch.full((n, f), 2.0, dtype=torch.float64),
    )
    yd, lastd = y * ts + tm, last * ts + tm  # data units
    acc = ComparisonAccumulator(np.arange(b), n, h, "cpu", spreads=rms)
    pts = {"last_value": lastd[:, None], "train_mean": tm}
    acc.update(torch.arange(b), torch.arange(n), yd, torch.ones_like(yd), yd, mask, pts, ts)
    res = acc.result(_graph(n, 4, 1)[1])["baselines"]
    sd = rms["train_mean"][None, :, None, None] * ts
    crps = gaussian_crps(tm.expand_as(yd), sd.expand_as(yd), yd)
    assert res["train_mean"]["crps"] == pytest.approx(float((crps * m).sum() / m.sum()))
    assert res["train_mean"]["crps"] < res["train_mean"]["mae"]  # a spread beats a point
    assert res["train_mean"]["probabilistic"] is True
