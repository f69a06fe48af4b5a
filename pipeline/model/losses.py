"""Training losses of the Gaussian forecast (and of point forecasts): masked means over
observed targets."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def gaussian_nll(mean: Tensor, std: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of y under N(mean, std^2) over observed targets."""
    y = torch.where(mask, y, mean.detach())
    z = (y - mean) / std
    nll = 0.5 * z * z + torch.log(std) + 0.5 * math.log(2 * math.pi)
    return _masked_mean(nll, mask)


def gaussian_crps(mean: Tensor, std: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Closed-form CRPS of N(mean, std^2) at y (Gneiting & Raftery 2007, eq. 5):
    std * [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)], z = (y - mean) / std.

    With a mask: the mean over observed targets; without: the elementwise CRPS.
    """
    if mask is not None:
        y = torch.where(mask, y, mean.detach())
    point = std <= 0  # a point forecast (std 0): its CRPS is the absolute error
    z = (y - mean) / torch.where(point, torch.ones_like(std), std)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    crps = std * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    crps = torch.where(point, (y - mean).abs(), crps)
    return crps if mask is None else _masked_mean(crps, mask)


def mae(mean: Tensor, std: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over observed targets (point forecasts: ``model.peer``)."""
    return _masked_mean((torch.where(mask, y, mean.detach()) - mean).abs(), mask)


LOSSES = {"nll": gaussian_nll, "crps": gaussian_crps, "mae": mae}
