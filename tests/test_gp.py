"""The fitted Gaussian-process baseline (pipeline/evaluate/gp.py) on a real synthetic store:
its parameters recover the field's, its forecasts come close to the exact oracle's, at seen and
held-out sensors, and a run reports it beside the other baselines."""

import json

import numpy as np
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data.store import open_store
from pipeline.data.stream import WindowStream
from pipeline.evaluate import gp
from pipeline.evaluate.kalman import score
from pipeline.evaluate.oracle import Oracle, limit
from pipeline.evaluate.variography import gstools_model

TIME_IN, HORIZON = 6, 3  # the synthetic_store fixture's windows


def _stream(store, holdout=None):
    return WindowStream(
        store, "test", TIME_IN, HORIZON, 8, 8, shuffle=False, holdout=holdout, daily_profile=True
    )


def _against_oracle(store_path, holdout=None):
    """The GP's result and the window oracle's, the oracle's per-window losses standing in for
    a model's."""
    store = open_store(store_path)
    stream = _stream(store, holdout)
    origins = stream.origins
    windows = {"origin": origins, "count": np.ones(len(origins))}
    windows.update(mae=np.ones(len(origins)), crps=np.ones(len(origins)))
    test = {"crps": [1.0] * HORIZON, "mean": {"crps": 1.0}}
    oracle = limit(store, TIME_IN, HORIZON, origins, windows, test, stream.hidden)
    return gp.baseline(store, stream, TIME_IN, HORIZON, windows, oracle), oracle, store


def test_fitted_parameters_recover_the_field_and_forecasts_come_close_to_the_oracle(
    synthetic_store,
):
    result, oracle, store = _against_oracle(synthetic_store)
    truth = SyntheticConfig(**store.attrs["synthetic"])
    fit = result["fit"]
    # the fitted correlation (whichever family fits best) follows the field's out to 2 ranges
    d = np.linspace(0, 2 * truth.range_km, 41)
    fitted = gstools_model(fit["family"], fit["range_km"]).correlation(d)
    true = gstools_model(truth.family, truth.range_km).correlation(d)
    assert np.abs(fitted - true).max() < 0.1, (fit, np.abs(fitted - true).max())
    share = (fit["nugget"] + fit["micro"]) / (fit["nugget"] + fit["micro"] + fit["sill"])
    assert abs(share - truth.nugget / (truth.nugget + truth.variance)) < 0.06, fit
    assert fit["micro"] < 0.05, fit  # the field's nugget is white in time
    assert abs(fit["phi"] - truth.ar_coef) < 0.06, fit
    assert not fit["daily_profile"]  # 400 five-minute steps: no profile worth subtracting
    # exact conditioning with fitted parameters: close to the oracle, never better by much
    assert 0.99 < result["ratio_to_oracle"] < 1.05, result["ratio_to_oracle"]
    assert abs(result["mean"]["coverage_90"] - 0.9) < 0.04, result["mean"]
    assert len(result["crps"]) == HORIZON and result["crps"][0] < result["crps"][-1]
    base = result["baseline"]
    assert base["crps"] == result["mean"]["crps"] and base["dm_crps"]["testable"]


def test_moments_split_the_nugget_into_persistent_and_white_parts():
    """A field with a spatial part, a part of each sensor's own that persists (AR(1), not
    shared with neighbours) and white noise: the fit tells the two nuggets apart."""
    rng = np.random.default_rng(0)
    n, steps, phi = 120, 1500, 0.9
    sill, micro, nugget, range_km = 0.6, 0.3, 0.1, 15.0
    plane = rng.uniform(0, 100, (n, 2))
    d = np.linalg.norm(plane[:, None] - plane[None], axis=-1)
    cov = sill * gstools_model("matern32", range_km).correlation(d) + micro * np.eye(n)
    root = np.linalg.cholesky(cov + 1e-9 * np.eye(n))
    state = root @ rng.standard_normal(n)
    z = np.empty((steps, n))
    for t in range(steps):  # AR(1) in time, stationary
        state = phi * state + np.sqrt(1 - phi**2) * (root @ rng.standard_normal(n))
        z[t] = state + np.sqrt(nugget) * rng.standard_normal(n)
    z[rng.random(z.shape) < 0.1] = np.nan  # missing values are skipped
    fit = gp.fit(z, plane)
    assert abs(fit["phi"] - phi) < 0.03, fit
    assert abs(fit["micro"] - micro) < 0.08 and abs(fit["nugget"] - nugget) < 0.08, fit
    assert abs(fit["sill"] - sill) < 0.15, fit


def test_held_out_sensors_are_forecast_from_their_neighbours_alone(synthetic_store):
    """Scored against the window oracle's forecast of the same held-out sensors (every other
    test window: the oracle's dense steps are its cost)."""
    store = open_store(synthetic_store)
    stream = _stream(store, holdout=0.2)
    stream.origins = stream.origins[::2]
    origins, hidden = stream.origins, stream.hidden
    windows = {"origin": origins, "count": np.ones(len(origins))}
    windows.update(mae=np.ones(len(origins)), crps=np.ones(len(origins)))
    result = gp.baseline(store, stream, TIME_IN, HORIZON, windows)
    values, mask = store["values"][:, :, 0].astype(np.float64), store["mask"][:, :, 0]
    given = mask & ~hidden[None]
    oracle = Oracle(SyntheticConfig(**store.attrs["synthetic"]), store["coords"][:])
    mean, std = oracle.forecast(values, given, origins, HORIZON, TIME_IN)
    steps = origins[:, None] + np.arange(HORIZON)
    best = score(
        mean, std, values[steps], mask[steps], store["std"][:, 0], store["neighbours"][:], hidden
    )
    unseen = result["unseen"]
    assert 0.99 < unseen["crps"] / best["unseen"]["crps"] < 1.06, (unseen, best["unseen"])
    assert result["seen"]["crps"] < unseen["crps"]  # no history of their own
    assert abs(unseen["coverage_90"] - 0.9) < 0.05, unseen


def test_a_network_beyond_the_exact_gp_is_skipped_with_the_reason(synthetic_store, monkeypatch):
    monkeypatch.setattr(gp, "MAX_SENSORS", 100)
    result, _, _ = _against_oracle(synthetic_store)
    assert result == {"skipped": "300 sensors: beyond the exact GP's 100"}


def test_a_run_reports_the_fitted_gp_with_its_diebold_mariano_tests(tracked):
    from pipeline.evaluate.report import summary

    out, _ = tracked
    m = json.loads((out / "tracked" / "metrics.json").read_text())
    base = m["test"]["baselines"][gp.NAME]
    assert base["probabilistic"] and base["dm_crps"]["testable"] and base["dm_mae"]["testable"]
    assert base["crps"] == pytest.approx(m["fitted_gp"]["mean"]["crps"])
    assert m["fitted_gp"]["ratio_to_oracle"] > 0.99
    text = summary(m)
    assert "vs fitted_gp" in text and "fitted GP (train split's variogram)" in text
