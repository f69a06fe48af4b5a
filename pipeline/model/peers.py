"""Published spatio-temporal forecasters from torch-spatiotemporal (tsl), as peers of ours
(the only module that imports tsl; ``pip install -e ".[peers]"``, docs/peers.md).

Each peer is wrapped to take what our model takes, from the same window stream (same windows,
splits, masks and normalisation): x and its mask [batch, time_in, node, feature] (the mask as
extra input channels, missing values as 0), the calendar of the first forecast step, the
sensors' positions and their k nearest neighbours. It returns a point forecast: the mean
[batch, horizon, node, feature] and a std of 0, whose CRPS is its MAE (train.loss=mae).

- ``graph_wavenet`` (Wu et al. 2019) and ``dcrnn`` (Li et al. 2018) read the graph of the
  DCRNN convention from the positions: w_ij = exp(-(d_ij / sigma)^2) over each sensor's k
  nearest, sigma the std of those distances, weights under 0.1 dropped; Graph WaveNet also
  learns its adaptive adjacency.
- ``agcrn`` (Bai et al. 2020) learns its graph from node embeddings;
- ``stid`` (Shao et al. 2022): node, time-of-day (288 bins) and day-of-week embeddings.

Graph WaveNet, AGCRN and STID learn one embedding per sensor: they forecast only the sensors
they were trained on (not held-out ones, data.holdout_sensors). The calendar reaches Graph
WaveNet, DCRNN and AGCRN as exogenous inputs (the 4 sin/cos features at every input step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PEERS = ("graph_wavenet", "dcrnn", "agcrn", "stid")
NEEDS_NODE_EMBEDDINGS = ("graph_wavenet", "agcrn", "stid")
DAY_BINS, WEEK_BINS = 288, 7  # STID's time-of-day and day-of-week embeddings
KEEP_WEIGHT = 0.1  # DCRNN's threshold on the Gaussian kernel weights


class PeerError(ImportError):
    """The peers' extra is not installed."""


def _tsl():
    try:
        import tsl.nn.models as models
    except ImportError as exc:
        raise PeerError(
            f"model.peer needs torch-spatiotemporal ({exc.name} is missing): "
            'pip install --no-build-isolation -e ".[peers]" (docs/peers.md)'
        ) from None
    return models


def gaussian_graph(pos: Tensor, neighbours: Tensor) -> tuple[Tensor, Tensor]:
    """edge_index [2, E] (source, target) and edge_weight [E] of the thresholded Gaussian
    kernel over each sensor's neighbours ([N, k], itself first, -1 none), positions [N, 3] km."""
    n, k = neighbours.shape
    target = torch.arange(n, device=pos.device)[:, None].expand(n, k)  # [N, k]
    keep = (neighbours >= 0) & (neighbours != target)
    src, dst = neighbours[keep], target[keep]  # [E]
    dist = (pos[src] - pos[dst]).norm(dim=-1)
    sigma = dist.std().clamp_min(1e-6) if len(dist) > 1 else dist.new_tensor(1.0)
    weight = torch.exp(-((dist / sigma) ** 2))
    strong = weight >= KEEP_WEIGHT
    return torch.stack([src[strong], dst[strong]]), weight[strong]


class PeerForecaster(nn.Module):
    """A tsl model behind :class:`pipeline.model.forecaster.Forecaster`'s interface."""

    def __init__(
        self,
        peer: str,
        time_in: int,
        horizon: int,
        features: int,
        num_nodes: int,
        calendar: bool = True,
    ) -> None:
        """``calendar``: model.calendar (False: every window gets the same calendar input)."""
        super().__init__()
        models = _tsl()
        self.peer, self.horizon, self.features = peer, horizon, features
        self.use_calendar = calendar
        size = 2 * features  # values and their mask
        if peer == "graph_wavenet":
            self.net = models.GraphWaveNetModel(size, features, horizon, 4, n_nodes=num_nodes)
        elif peer == "dcrnn":
            self.net = models.DCRNNModel(size, features, horizon, exog_size=4)
        elif peer == "agcrn":
            self.net = models.AGCRNModel(size, features, horizon, num_nodes, exog_size=4)
        elif peer == "stid":
            self.net = models.STIDModel(
                size, num_nodes, time_in, horizon, [DAY_BINS, WEEK_BINS], output_size=features
            )
        else:
            raise ValueError(f"unknown peer {peer!r}; one of {PEERS}")

    hops = 1  # whole networks only (config: data.tile_size=null)

    def kernels(self) -> list:
        return []  # no covariance kernel

    def set_qk(self, enabled: bool) -> None:
        pass

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        calendar: Tensor,
        pos: Tensor,
        neighbours: Tensor | None = None,
        node_index: Tensor | None = None,
        profile: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """As Forecaster.forward (``profile`` unused); std is 0 (a point forecast)."""
        b, t, n, f = x.shape
        x = torch.where(mask, x, torch.zeros_like(x))
        inputs = torch.cat([x, mask.to(x.dtype)], dim=-1)  # [B, T, N, 2F]
        if not self.use_calendar:
            calendar = torch.zeros_like(calendar)
        exog = calendar.to(x.dtype)[:, None, :].expand(b, t, calendar.shape[-1])  # [B, T, 4]
        if self.peer in ("graph_wavenet", "dcrnn"):
            if neighbours is None:
                raise ValueError(f"{self.peer} needs the neighbour graph (model.backend=knn)")
            edge_index, edge_weight = gaussian_graph(pos.float(), neighbours)
            mean = self.net(inputs, edge_index, edge_weight.to(x.dtype), exog)
        elif self.peer == "agcrn":
            mean = self.net(inputs, exog)
        else:  # stid: calendar as embedding indices [B, 2]
            day = torch.atan2(calendar[:, 0], calendar[:, 1]) / (2 * math.pi) % 1.0
            week = torch.atan2(calendar[:, 2], calendar[:, 3]) / (2 * math.pi) % 1.0
            index = torch.stack(
                [(day * DAY_BINS).long() % DAY_BINS, (week * WEEK_BINS).long() % WEEK_BINS], -1
            )
            mean = self.net(inputs, index)
        mean = mean.reshape(b, self.horizon, n, f)  # [B, H, N, F]
        return mean, torch.zeros_like(mean)
