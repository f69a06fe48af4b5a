"""The Bayes limit of a synthetic store: the exact predictive law of its field (NumPy).

A synthetic field (pipeline/data/synthetic.py) is a linear-Gaussian state-space model: the
random-Fourier-feature coefficients c_t [2M] follow a stationary AR(1),

    c_0 ~ N(0, I),   c_t = phi c_{t-1} + sqrt(1 - phi^2) eps_t,
    y_t = mean + H c_t + sqrt(nugget) e_t,   H = sqrt(variance / M) [cos(x W^T), sin(x W^T)],

so the best possible probabilistic forecast of y_{t+h} is the Kalman filter's predictive law.
Two variants: conditioned on the whole past, or on the model's input window only (a filter
started from the stationary prior ``time_in`` steps before the origin): what a windowed model
could reach at best.

Computation: information form. When every sensor is observed at a step, the posterior stays
diagonal in the eigenbasis U of H^T H (the prior phi^2 P + (1 - phi^2) I and the update
H^T H / nugget share it), so a step costs O(M) after one eigendecomposition; a step with
masked sensors is a dense update in that basis with the observed rows only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import norm

from pipeline.config import SyntheticConfig
from pipeline.data.store import Store
from pipeline.data.synthetic import sample_frequencies
from pipeline.evaluate.metrics import diebold_mariano, morans_i
from pipeline.model.losses import gaussian_crps

_Z90 = float(norm.ppf(0.95))  # half-width of the central 90 % interval in std units


class Oracle:
    """Exact Gaussian forecasts of a synthetic field observed at sensors ``coords`` [N, 2] km
    (x, y as the field places them; any order)."""

    def __init__(self, cfg: SyntheticConfig, coords: np.ndarray) -> None:
        self.cfg = cfg
        omega = sample_frequencies(cfg)  # [M, 2]
        phase = np.asarray(coords, np.float64) @ omega.T  # [N, M]
        scale = math.sqrt(cfg.variance / len(omega))
        self.h = scale * np.concatenate([np.cos(phase), np.sin(phase)], axis=1)  # [N, 2M]
        lam, self.u = np.linalg.eigh(self.h.T @ self.h)  # [2M], [2M, 2M]
        self.lam = np.maximum(lam, 0.0) / cfg.nugget  # eigenvalues of H^T H / nugget
        self.g = self.h @ self.u  # [N, 2M]: H in the eigenbasis
        self.g2 = self.g * self.g
        self.phi = cfg.ar_coef

    # -- filtering ------------------------------------------------------------------------

    def _update(self, m, p, y, mask):
        """Condition (m, p) (eigenbasis; p [2M] diagonal or [2M, 2M]) on one step y [N]
        (data units, any value where ``mask`` is False)."""
        r = (y - self.cfg.mean) / self.cfg.nugget  # [N]
        if mask.all() and p.ndim == 1:
            prec = 1.0 / p + self.lam
            return (m / p + self.g.T @ r) / prec, 1.0 / prec
        full = np.diag(p) if p.ndim == 1 else p
        go = self.g[mask]  # [n_obs, 2M]
        prec = np.linalg.inv(full) + go.T @ go / self.cfg.nugget
        cov = np.linalg.inv(prec)
        cov = 0.5 * (cov + cov.T)
        return cov @ (np.linalg.solve(full, m) + go.T @ r[mask]), cov

    def _predict(self, m, p):
        """(m, p) one AR(1) step ahead."""
        a = self.phi
        if p.ndim == 1:
            return a * m, a * a * p + (1 - a * a)
        return a * m, a * a * p + (1 - a * a) * np.eye(len(m))

    def _ahead(self, m, p, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and std [horizon, N] of y at 1 .. horizon steps after the state law
        (m, p) of the last conditioned step."""
        a = self.phi ** np.arange(1, horizon + 1)  # [horizon]
        mean = self.cfg.mean + (a[:, None] * m[None]) @ self.g.T  # [horizon, N]
        if p.ndim == 1:
            var = (a[:, None] ** 2 * p[None] + (1 - a[:, None] ** 2)) @ self.g2.T
        else:
            gpg = np.einsum("nk,kl,nl->n", self.g, p, self.g)  # [N]
            var = a[:, None] ** 2 * gpg[None] + (1 - a[:, None] ** 2) * self.g2.sum(1)[None]
        return mean, np.sqrt(var + self.cfg.nugget)

    def forecast(
        self,
        values: np.ndarray,
        mask: np.ndarray,
        origins: np.ndarray,
        horizon: int,
        time_in: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std [origins, horizon, N] of y at origin + 0 .. horizon - 1 given y before
        each origin: all of it (``time_in`` None) or the ``time_in`` steps before it.

        values, mask [T, N] (the store's sensors in the order of ``coords``)."""
        origins = np.asarray(origins)
        k = self.h.shape[1]
        mean = np.empty((len(origins), horizon, self.h.shape[0]))
        std = np.empty_like(mean)
        if time_in is None:  # one pass over the past
            m, p = np.zeros(k), np.ones(k)  # c_0's prior, before y_0
            t = 0
            for i, o in enumerate(origins):
                while t < o:
                    if t > 0:
                        m, p = self._predict(m, p)
                    m, p = self._update(m, p, values[t], mask[t])
                    t += 1
                mean[i], std[i] = self._ahead(m, p, horizon)
            return mean, std
        for i, o in enumerate(origins):
            m, p = np.zeros(k), np.ones(k)  # stationary prior at the window's first step
            for t in range(o - time_in, o):
                if t > o - time_in:
                    m, p = self._predict(m, p)
                m, p = self._update(m, p, values[t], mask[t])
            mean[i], std[i] = self._ahead(m, p, horizon)
        return mean, std


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
        y_ = np.where(seen, y, mean)
        crps = gaussian_crps(*(torch.from_numpy(a) for a in (mean, std, y_))).numpy()
        inside = np.abs(y_ - mean) <= _Z90 * std
        count = seen.sum((0, 2)).clip(min=1)  # per step
        per_window = (crps * seen).sum((1, 2)) / seen.sum((1, 2)).clip(min=1)
        resid = ((y_ - mean) / train_std * seen).sum((0, 1)) / seen.sum((0, 1)).clip(min=1)
        resid = np.where(seen.any((0, 1)), resid, np.nan)
        out[name] = {
            "mae": ((np.abs(y_ - mean) * seen).sum((0, 2)) / count).tolist(),
            "crps": ((crps * seen).sum((0, 2)) / count).tolist(),
            "coverage_90": ((inside & seen).sum((0, 2)) / count).tolist(),
            "mean": {
                "mae": float((np.abs(y_ - mean) * seen).sum() / seen.sum()),
                "crps": float((crps * seen).sum() / seen.sum()),
                "coverage_90": float((inside & seen).sum() / seen.sum()),
            },
            "morans_i": morans_i(resid, store["neighbours"][:]),
            "_per_window": per_window,
        }
        if hidden is not None:
            for group, cols in (("seen", ~hidden), ("unseen", hidden)):
                on = seen[:, :, cols]
                out[name][f"{group}_crps"] = float((crps[:, :, cols] * on).sum() / on.sum())
    window = out["window"]
    rows = np.searchsorted(np.asarray(origins), windows["origin"])
    oracle_crps = window.pop("_per_window")[rows]
    out["full_past"].pop("_per_window")
    ref = window["crps"]
    out["ratio_to_oracle"] = {
        "crps": [m / o for m, o in zip(test["crps"], ref, strict=True)],
        "mean": test["mean"]["crps"] / window["mean"]["crps"],
    }
    out["dm_vs_oracle"] = diebold_mariano(windows["crps"] - oracle_crps, horizon)
    return out
