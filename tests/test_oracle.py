"""The Bayes-limit oracle of synthetic fields against brute-force Gaussian conditioning."""

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.config import SyntheticConfig
from pipeline.data.synthetic import SyntheticField
from pipeline.evaluate.oracle import Oracle


def _field(n=5, steps=30, **kw):
    cfg = SyntheticConfig(
        num_features=8,
        num_sensors=n,
        num_steps=steps,
        nugget=0.3,
        ar_coef=0.8,
        range_km=30.0,
        domain_km=50.0,
        mean=1.5,
        **kw,
    )
    fld = SyntheticField(cfg)
    return cfg, fld.coords(np.arange(n)), fld.values(0, steps).astype(np.float64)


def _brute_force(oracle, values, mask, origin, horizon, time_in):
    """Condition the joint Gaussian of every y_t on the observed cells before ``origin``."""
    cfg, h = oracle.cfg, oracle.h
    t, n = values.shape
    lag = np.abs(np.arange(t)[:, None] - np.arange(t)[None])  # [T, T]
    cov = np.kron(cfg.ar_coef**lag, h @ h.T) + cfg.nugget * np.eye(t * n)  # [T N, T N]
    first = 0 if time_in is None else origin - time_in
    seen = np.zeros((t, n), bool)
    seen[first:origin] = mask[first:origin]
    seen = seen.ravel()
    target = np.zeros((t, n), bool)
    target[origin : origin + horizon] = True
    target = target.ravel()
    y = values.ravel() - cfg.mean
    s_oo = cov[np.ix_(seen, seen)]
    s_to = cov[np.ix_(target, seen)]
    mean = cfg.mean + s_to @ np.linalg.solve(s_oo, y[seen])
    var = np.diag(cov[np.ix_(target, target)] - s_to @ np.linalg.solve(s_oo, s_to.T))
    return mean.reshape(horizon, n), np.sqrt(var).reshape(horizon, n)


@pytest.mark.parametrize("time_in", [None, 6], ids=["full-past", "window"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-observed", "masked"])
def test_filter_equals_brute_force_conditioning(time_in, masked):
    cfg, coords, values = _field()
    mask = np.ones(values.shape, bool)
    if masked:
        mask = np.random.default_rng(0).random(values.shape) > 0.3
        values = np.where(mask, values, 1e6)  # masked cells must not be read
    oracle = Oracle(cfg, coords)
    origins = np.array([8, 17, 25])
    mean, std = oracle.forecast(values, mask, origins, 3, time_in)
    for i, o in enumerate(origins):
        want_mean, want_std = _brute_force(oracle, values, mask, o, 3, time_in)
        np.testing.assert_allclose(mean[i], want_mean, rtol=0, atol=1e-8)
        np.testing.assert_allclose(std[i], want_std, rtol=0, atol=1e-8)


def test_forecasts_are_calibrated():
    """PIT uniform and 90 % intervals cover 90 % of what the field does next."""
    cfg, coords, values = _field(n=40, steps=800)
    oracle = Oracle(cfg, coords)
    origins = np.arange(50, 797)
    mean, std = oracle.forecast(values, np.ones(values.shape, bool), origins, 3, None)
    y = values[origins[:, None] + np.arange(3)]  # [O, 3, N]
    pit = norm.cdf((y - mean) / std).ravel()
    hist = np.histogram(pit, bins=10, range=(0, 1))[0] / pit.size
    assert np.abs(hist - 0.1).max() < 0.015, hist
    inside = np.abs(y - mean) <= norm.ppf(0.95) * std
    assert abs(inside.mean() - 0.9) < 0.015, inside.mean()


def test_window_oracle_is_no_better_than_the_full_past():
    cfg, coords, values = _field(n=20, steps=300)
    oracle = Oracle(cfg, coords)
    origins = np.arange(20, 297)
    mask = np.ones(values.shape, bool)
    _, full = oracle.forecast(values, mask, origins, 3, None)
    _, window = oracle.forecast(values, mask, origins, 3, 4)
    assert (window >= full - 1e-12).all()  # less information, never a narrower law
