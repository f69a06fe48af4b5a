"""Exact forecasts of a linear-Gaussian space-time field, and their scores (NumPy).

The field at N sensors is a stationary AR(1) in a state c_t [K] seen through H [N, K]:

    c_0 ~ N(0, I),   c_t = phi c_{t-1} + sqrt(1 - phi^2) eps_t,
    y_t = mean + H c_t + sqrt(nugget) e_t,

so Cov(y_t, y_u) = phi^|t-u| H H^T + nugget [t = u] I: a separable space-time Gaussian process,
and the best probabilistic forecast of y_{t+h} given past observations is the Kalman filter's
predictive law. The synthetic fields' Bayes limit (oracle.py, H of random Fourier features) and
the fitted Gaussian-process baseline (gp.py, H a square root of a fitted covariance) are both
this filter.

Computation: information form. When every sensor is observed at a step, the posterior stays
diagonal in the eigenbasis U of H^T H (the prior phi^2 P + (1 - phi^2) I and the update
H^T H / nugget share it), so a step costs O(N K) after one eigendecomposition; a step with
masked sensors is a dense update in that basis with the observed rows only (covariance form:
one Cholesky factor of the observed rows' [n_obs, n_obs] innovation covariance).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve
from scipy.stats import norm

from pipeline.evaluate.metrics import morans_i
from pipeline.model.losses import gaussian_crps

Z90 = float(norm.ppf(0.95))  # half-width of the central 90 % interval in std units


class StateSpace:
    """Exact Gaussian forecasts of the field above: ``h`` [N, K], AR coefficient ``phi``,
    ``nugget`` variance, ``mean`` a scalar or [N]."""

    def __init__(self, h: np.ndarray, phi: float, nugget: float, mean=0.0) -> None:
        self.h, self.phi, self.nugget, self.mean = h, phi, nugget, mean
        lam, self.u = np.linalg.eigh(h.T @ h)  # [K], [K, K]
        self.lam = np.maximum(lam, 0.0) / nugget  # eigenvalues of H^T H / nugget
        self.g = h @ self.u  # [N, K]: H in the eigenbasis
        self.g2 = self.g * self.g

    def _update(self, m, p, y, mask):
        """Condition (m, p) (eigenbasis; p [K] diagonal or [K, K]) on one step y [N]
        (data units, any value where ``mask`` is False)."""
        r = np.where(mask, y - self.mean, 0.0) / self.nugget  # [N]
        if mask.all() and p.ndim == 1:
            prec = 1.0 / p + self.lam
            return (m / p + self.g.T @ r) / prec, 1.0 / prec
        full = np.diag(p) if p.ndim == 1 else p
        go = self.g[mask]  # [n_obs, K]
        pg = full @ go.T  # [K, n_obs]
        gain = cho_solve(cho_factor(go @ pg + self.nugget * np.eye(len(go))), pg.T).T
        cov = full - gain @ pg.T  # [K, K]
        cov = 0.5 * (cov + cov.T)
        return m + gain @ (r[mask] * self.nugget - go @ m), cov

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
        mean = self.mean + (a[:, None] * m[None]) @ self.g.T  # [horizon, N]
        if p.ndim == 1:
            var = (a[:, None] ** 2 * p[None] + (1 - a[:, None] ** 2)) @ self.g2.T
        else:
            gpg = ((self.g @ p) * self.g).sum(1)  # [N]: diag(G P G^T)
            var = a[:, None] ** 2 * gpg[None] + (1 - a[:, None] ** 2) * self.g2.sum(1)[None]
        return mean, np.sqrt(var + self.nugget)

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

        values, mask [T, N] (the sensors in the order of ``h``'s rows)."""
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


def dense_steps(mask: np.ndarray, origins: np.ndarray, time_in: int) -> int:
    """How many of the window filter's steps take the dense path (a masked sensor at that
    step or an earlier one of the window): what its cost grows with, O(K^3) each."""
    partial = ~mask.all(1)  # [T]
    count = 0
    for o in np.asarray(origins):
        hit = np.flatnonzero(partial[o - time_in : o])
        count += time_in - hit[0] if len(hit) else 0
    return count


def score(
    mean: np.ndarray,
    std: np.ndarray,
    y: np.ndarray,
    seen: np.ndarray,
    train_std: np.ndarray,
    neighbours: np.ndarray,
    hidden: np.ndarray | None = None,
) -> dict:
    """Scores of Gaussian forecasts ``mean``, ``std`` of ``y`` [O, H, N] where ``seen``
    [O, H, N]: MAE, CRPS and 90 % coverage per horizon step and pooled, Moran's I of the mean
    residual per sensor (standardised by ``train_std`` [N]) over ``neighbours`` [N, k], with
    ``hidden`` [N] the pooled MAE / CRPS / coverage of the seen and the unseen sensors, and
    ``_per_window`` [O, 3]: observed cells, MAE and CRPS of each window (not JSON)."""
    y = np.where(seen, y, mean)
    crps = gaussian_crps(*(torch.from_numpy(a) for a in (mean, std, y))).numpy()
    err = np.abs(y - mean)
    inside = err <= Z90 * std
    count = seen.sum((0, 2)).clip(min=1)  # per step
    cells = seen.sum((1, 2))  # per window
    resid = ((y - mean) / train_std * seen).sum((0, 1)) / seen.sum((0, 1)).clip(min=1)
    resid = np.where(seen.any((0, 1)), resid, np.nan)

    def pooled(on: np.ndarray) -> dict:
        total = max(on.sum(), 1)
        return {
            "mae": float((err * on).sum() / total),
            "crps": float((crps * on).sum() / total),
            "coverage_90": float((inside & on).sum() / total),
        }

    out = {
        "mae": ((err * seen).sum((0, 2)) / count).tolist(),
        "crps": ((crps * seen).sum((0, 2)) / count).tolist(),
        "coverage_90": ((inside & seen).sum((0, 2)) / count).tolist(),
        "mean": pooled(seen),
        "morans_i": morans_i(resid, neighbours),
        "_per_window": np.stack(
            [
                cells,
                (err * seen).sum((1, 2)) / cells.clip(min=1),
                (crps * seen).sum((1, 2)) / cells.clip(min=1),
            ],
            axis=1,
        ),
    }
    if hidden is not None:
        for group, cols in (("seen", ~hidden), ("unseen", hidden)):
            on = seen.copy()
            on[:, :, ~cols] = False
            out[group] = pooled(on)
    return out
