"""Attention over time inside each sensor's input window (model.temporal_layers).

The flat window embedding of :class:`~pipeline.model.forecaster.Forecaster` sees a sensor's
whole window as one vector through one linear map; this encoder gives each time step its own
token (value and mask, plus a learned position of the step in the window), runs pre-norm
self-attention over the steps of one sensor, and returns the last step's token, projected,
as a residual added to the flat embedding. The projection starts at zero, so a fresh model
with temporal layers forecasts as one without them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TemporalEncoder(nn.Module):
    """Window tokens [B, T, N, 2F] -> one summary per sensor [B, N, d_model]."""

    def __init__(
        self,
        time_in: int,
        features: int,
        width: int,
        d_model: int,
        layers: int,
        mlp_ratio: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.step = nn.Linear(2 * features, width)
        self.position = nn.Parameter(0.02 * torch.randn(time_in, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                max(1, width // 16),
                mlp_ratio * width,
                dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_model)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t, n, c = tokens.shape
        seq = tokens.permute(0, 2, 1, 3).reshape(b * n, t, c)  # [B * N, T, 2F]
        h = self.step(seq) + self.position[:t]  # [B * N, T, W]
        for layer in self.layers:
            h = layer(h)
        last = self.out(self.norm(h[:, -1]))  # [B * N, D] (W -> d_model)
        return last.view(b, n, -1)  # [B, N, D]
