"""The Bayes limit of a synthetic store: the exact predictive law of its field (NumPy).

A synthetic field (pipeline/data/synthetic.py) is a linear-Gaussian state-space model: the
random-Fourier-feature coefficients c_t [2M] follow a stationary AR(1),

    c_0 ~ N(0, I),   c_t = phi c_{t-1} + sqrt(1 - phi^2) eps_t,
    y_t = mean + H c_t + sqrt(nugget) e_t,   H = sqrt(variance / M) [cos(x W^T), sin(x W^T)],

so the best possible probabilistic forecast of y_{t+h} is the Kalman filter's predictive law
(kalman.py). Two variants: conditioned on the whole past, or on the model's input window only
(a filter started from the stationary prior ``time_in`` steps before the origin): what a
windowed model could reach at best.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import SyntheticConfig
from pipeline.data.store import Store
from pipeline.data.synthetic import sample_frequencies
from pipeline.evaluate.kalman import StateSpace, score
from pipeline.evaluate.metrics import diebold_mariano


class Oracle(StateSpace):
    """Exact Gaussian forecasts of a synthetic field observed at sensors ``coords`` [N, 2] km
    (x, y as the field places them; any order)."""

    def __init__(self, cfg: SyntheticConfig, coords: np.ndarray) -> None:
        self.cfg = cfg
        omega = sample_frequencies(cfg)  # [M, 2]
        phase = np.asarray(coords, np.float64) @ omega.T  # [N, M]
        scale = math.sqrt(cfg.variance / len(omega))
        h = scale * np.concatenate([np.cos(phase), np.sin(phase)], axis=1)  # [N, 2M]
        super().__init__(h, cfg.ar_coef, cfg.nugget, cfg.mean)


MAX_BASIS = 50_000_000  # sensors x 2M above which the oracle is skipped (memory, time)
MAX_FORECASTS = 25_000_000  # test windows x horizon x sensors (and time x sensors), likewise


def limit(
    store: Store,
    time_in: int,
    horizon: int,
    origins: np.ndarray,
    windows: dict[str, np.ndarray],
    test: dict,
    hidden: np.ndarray | None = None,
) -> dict | None:
    """The oracle's scores on the test windows of a synthetic store, against the model's test
    metrics ``test`` and per-window losses ``windows`` (origin, count, mae, crps;
    ComparisonAccumulator), or None for a store that is not synthetic.

    Returns, for the window-only and the full-past oracle: MAE, CRPS and 90 % coverage per
    horizon step and pooled, Moran's I of the oracle's mean standardised residuals; and the
    model's CRPS as a ratio to the window oracle's (per step and pooled) with a
    Diebold-Mariano test of model against oracle on the per-window CRPS. With ``hidden`` [N]
    (held-out sensors, data.holdout_sensors) the oracle, like the model, never sees their
    values before the origin, and each variant also reports the CRPS of the seen and the
    unseen sensors."""
    raw = store.attrs.get("synthetic")
    if raw is None:
        return None
    cfg = SyntheticConfig(**raw)
    n = store.shape[1]
    cells = max(len(origins) * horizon, store.shape[0]) * n  # forecasts, or the whole store
    if n * 2 * cfg.num_features > MAX_BASIS or cells > MAX_FORECASTS:
        return {
            "skipped": f"{n} sensors x {2 * cfg.num_features} features x {len(origins)} test "
            f"windows x {horizon} steps is beyond the exact filter's budget"
        }
    oracle = Oracle(cfg, store["coords"][:])
    values = store["values"][:, :, 0].astype(np.float64)  # [T, N]
    mask = store["mask"][:, :, 0]
    steps = np.asarray(origins)[:, None] + np.arange(horizon)  # [O, H]
    y, seen = values[steps], mask[steps]  # [O, H, N]
    train_std = store["std"][:, 0]
    out: dict = {}
    given = mask.copy()  # what the oracle conditions on
    if hidden is not None:
        given[:, hidden] = False
    for name, window in (("window", time_in), ("full_past", None)):
        mean, std = oracle.forecast(values, given, origins, horizon, window)
        out[name] = score(mean, std, y, seen, train_std, store["neighbours"][:], hidden)
    window = out["window"]
    rows = np.searchsorted(np.asarray(origins), windows["origin"])
    oracle_crps = window.pop("_per_window")[rows, 2]
    out["full_past"].pop("_per_window")
    ref = window["crps"]
    out["ratio_to_oracle"] = {
        "crps": [m / o for m, o in zip(test["crps"], ref, strict=True)],
        "mean": test["mean"]["crps"] / window["mean"]["crps"],
    }
    out["dm_vs_oracle"] = diebold_mariano(windows["crps"] - oracle_crps, horizon)
    return out
