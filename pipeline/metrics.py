"""Masked forecast metrics per horizon step (DESIGN.md section 4), accumulated over batches and
ranks: MAE, RMSE, MAPE, Gaussian CRPS, PIT histogram, and coverage of the central 50 % and
90 % intervals.

The accumulator holds sums in one float64 tensor, so ranks merge by an all-reduce sum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.model import gaussian_crps

MAPE_EPS = 1e-6  # targets with |y| <= MAPE_EPS are left out of MAPE (and counted apart)
Z50 = 0.6744897501960817  # central 50 % interval: |z| <= Z50
Z90 = 1.6448536269514722  # central 90 % interval: |z| <= Z90
_COLS = ("n", "abs", "sq", "ape_n", "ape", "crps", "in50", "in90")


def pit(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """Probability integral transform Phi((y - mean) / std)."""
    return 0.5 * (1 + torch.erf((y - mean) / (std * math.sqrt(2))))


class MetricAccumulator:
    """Sums of the metrics per horizon step; ``state`` [horizon, 8 + bins] float64."""

    def __init__(self, horizon: int, bins: int = 10, device: torch.device | str = "cpu") -> None:
        self.horizon, self.bins = horizon, bins
        self.state = torch.zeros(horizon, len(_COLS) + bins, dtype=torch.float64, device=device)

    def update(self, mean: Tensor, std: Tensor, y: Tensor, mask: Tensor) -> None:
        """Add a batch: mean, std, y, mask [B, horizon, n, F] in the data's units."""
        mean, std, y = mean.double(), std.double(), y.double()
        m = mask.double()
        y = torch.where(mask, y, mean)  # masked cells contribute nothing (and no NaN)
        err = y - mean
        z = err / std
        mape_ok = mask & (y.abs() > MAPE_EPS)
        dims = (0, 2, 3)  # sum over batch, node, feature -> [horizon]
        cols = [
            m.sum(dims),
            (err.abs() * m).sum(dims),
            (err * err * m).sum(dims),
            mape_ok.double().sum(dims),
            torch.where(mape_ok, err.abs() / y.abs().clamp_min(MAPE_EPS), 0.0).sum(dims),
            (gaussian_crps(mean, std, y) * m).sum(dims),
            ((z.abs() <= Z50).double() * m).sum(dims),
            ((z.abs() <= Z90).double() * m).sum(dims),
        ]
        u = pit(mean, std, y)
        idx = (u * self.bins).long().clamp(0, self.bins - 1)  # [B, H, n, F]
        hist = torch.zeros(self.horizon, self.bins, dtype=torch.float64, device=mean.device)
        idx_h = idx.transpose(0, 1).reshape(self.horizon, -1)
        hist.scatter_add_(1, idx_h, m.transpose(0, 1).reshape(self.horizon, -1))
        self.state += torch.cat([torch.stack(cols, dim=1), hist], dim=1).to(self.state.device)

    def result(self) -> dict:
        """Per-step lists (index 0 = first forecast step) and pooled means."""
        s = self.state.cpu()
        col = {name: s[:, i] for i, name in enumerate(_COLS)}
        n = col["n"].clamp_min(1)
        per_step = {
            "mae": col["abs"] / n,
            "rmse": (col["sq"] / n).sqrt(),
            "mape": col["ape"] / col["ape_n"].clamp_min(1),
            "crps": col["crps"] / n,
            "coverage_50": col["in50"] / n,
            "coverage_90": col["in90"] / n,
        }
        total = col["n"].sum().clamp_min(1)
        pooled = {
            "mae": col["abs"].sum() / total,
            "rmse": (col["sq"].sum() / total).sqrt(),
            "mape": col["ape"].sum() / col["ape_n"].sum().clamp_min(1),
            "crps": col["crps"].sum() / total,
            "coverage_50": col["in50"].sum() / total,
            "coverage_90": col["in90"].sum() / total,
        }
        hist = s[:, len(_COLS) :].sum(0)
        hist = hist / hist.sum().clamp_min(1)
        return {
            "horizon_steps": list(range(1, self.horizon + 1)),
            **{k: v.tolist() for k, v in per_step.items()},
            "mean": {k: float(v) for k, v in pooled.items()},
            "pit_histogram": hist.tolist(),
            # total-variation distance of the PIT histogram from uniform (0 = calibrated)
            "pit_uniform_distance": float(0.5 * (hist - 1 / self.bins).abs().sum()),
            "count": int(col["n"].sum()),
        }
