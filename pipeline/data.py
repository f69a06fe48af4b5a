"""Training windows cut from [time, node, feature] arrays (NumPy or Zarr), normalised.

A window with origin t (the first forecast step) has
``x [time_in, node, F]`` = values[t - time_in : t], ``y [horizon, node, F]`` =
values[t : t + horizon], their masks, and the calendar features of time[t].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.calendar import calendar_features


@dataclass
class WindowSource:
    """Arrays to cut windows from: values/mask [T, N, F], time [T] ns, mean/std [N, F]."""

    values: np.ndarray
    mask: np.ndarray
    time: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    time_in: int
    horizon: int

    def origins(self, start: int, stop: int) -> np.ndarray:
        """Every origin whose whole window lies in time steps [start, stop)."""
        return np.arange(start + self.time_in, stop - self.horizon + 1)

    def batch(self, origins: np.ndarray, nodes: slice | np.ndarray = slice(None)) -> dict:
        """Windows for ``origins`` [B] at ``nodes``, as tensors (see module docstring)."""
        lo, hi = int(origins.min()) - self.time_in, int(origins.max()) + self.horizon
        values = np.asarray(self.values[lo:hi])[:, nodes]  # [span, n, F]
        mask = np.asarray(self.mask[lo:hi])[:, nodes]
        values = (values - self.mean[nodes]) / self.std[nodes]
        rel = origins - lo
        x_idx = rel[:, None] + np.arange(-self.time_in, 0)  # [B, time_in]
        y_idx = rel[:, None] + np.arange(self.horizon)  # [B, horizon]
        return {
            "x": torch.from_numpy(values[x_idx].astype(np.float32)),  # [B, time_in, n, F]
            "x_mask": torch.from_numpy(mask[x_idx]),
            "y": torch.from_numpy(values[y_idx].astype(np.float32)),  # [B, horizon, n, F]
            "y_mask": torch.from_numpy(mask[y_idx]),
            "calendar": torch.from_numpy(calendar_features(np.asarray(self.time)[origins])),
        }
