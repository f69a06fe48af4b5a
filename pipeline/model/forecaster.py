"""The probabilistic spatially-informed forecaster (docs/design.md, section 1).

One token per sensor: the sensor's input window (values and their mask, flattened over time and
feature; with ``model.temporal_layers``, plus attention over the window's steps,
pipeline/model/temporal.py) and calendar features of the forecast origin are embedded to
``d_model``; L pre-norm layers of geostatistical attention across sensors + MLP follow; a
Gaussian head gives, per horizon step and feature, a mean (a correction of the last observed
value) and a scale. With ``model.node_embedding`` a sensor with an input window also adds its
own learned vector, and one without (held out, a query point) a shared unknown-sensor vector:
the model still forecasts at sensors it never saw, given their coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.model.attention import GeoAttention
from pipeline.model.block_attention import block_plan
from pipeline.model.covariance import CovarianceBias
from pipeline.model.temporal import TemporalEncoder
from pipeline.model.variogram import FieldVariogram

CALENDAR_FEATURES = 4  # sin/cos of time of day and of day of week


class Layer(nn.Module):
    """Pre-norm residual layer: geostatistical attention across sensors, then an MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kernel = CovarianceBias(
            cfg.kernel,
            cfg.heads,
            cfg.init_range_km,
            cfg.init_nugget,
            anisotropy=cfg.anisotropy,
            learnable=cfg.learn_kernel,
            kernel_heads=cfg.kernel_heads,
        )
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = GeoAttention(
            cfg.d_model, cfg.heads, kernel, cfg.backend, cfg.qk_residual, cfg.dropout
        )
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor, pos: Tensor, observed: Tensor, neighbours: Tensor | None):
        x = x + self.attn(self.norm1(x), pos, observed, neighbours)
        return x + self.mlp(self.norm2(x))


class Forecaster(nn.Module):
    """Window [batch, time_in, node, feature] -> Gaussian forecast [batch, horizon, node, F_t]
    of the target features (data.target; all by default)."""

    def __init__(
        self,
        cfg: ModelConfig,
        time_in: int,
        horizon: int,
        features: int,
        num_nodes: int | None = None,
        frame: Tensor | None = None,
        checkpoint_layers: bool = False,
        targets: list[int] | None = None,
    ) -> None:
        """``frame``: the network's local (east, north, up) frame [3, 3] (rows; see
        positions_km), used by anisotropic kernels and kept in the state dict.
        ``checkpoint_layers``: activation checkpointing of each layer while training.
        ``targets``: the input features it forecasts (indices; None: all)."""
        super().__init__()
        self.cfg, self.time_in, self.horizon = cfg, time_in, horizon
        self.targets = list(range(features)) if targets is None else [int(t) for t in targets]
        self.features = f_out = len(self.targets)
        inputs = 2 * time_in * features + (horizon * f_out if cfg.daily_profile else 0)
        self.smoothing = cfg.kriged_smoothing and cfg.variography and cfg.kernel != "none"
        inputs += time_in * f_out if self.smoothing else 0
        self.embed = nn.Linear(inputs, cfg.d_model)
        self.temporal = None
        if cfg.temporal_layers:
            self.temporal = TemporalEncoder(
                time_in,
                features,
                cfg.temporal_width,
                cfg.d_model,
                cfg.temporal_layers,
                cfg.mlp_ratio,
                cfg.dropout,
            )
        self.calendar = nn.Linear(CALENDAR_FEATURES, cfg.d_model) if cfg.calendar else None
        self.node_embedding = None
        if cfg.node_embedding:
            if num_nodes is None:
                raise ValueError("model.node_embedding needs the number of sensors")
            self.node_embedding = nn.Embedding(num_nodes, cfg.d_model)
            # in place of the identity of a sensor without an input window (held out, a query
            # point, hidden by train.sensor_dropout, a whole-window outage)
            self.unknown_sensor = nn.Parameter(torch.zeros(cfg.d_model))
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 2 * horizon * f_out)
        self.checkpoint_layers = checkpoint_layers
        self.variogram = None  # the field's variogram (model.variography), fitted while training
        if cfg.variography and cfg.kernel != "none":
            self.variogram = FieldVariogram(
                cfg.kernel, cfg.init_range_km, cfg.init_nugget, cfg.anisotropy
            )
        self.variogram_loss: Tensor | None = None  # of the last training forward
        if frame is not None:
            estimate = [] if self.variogram is None else [self.variogram.kernel]
            for kernel in self.kernels() + estimate:
                kernel.set_frame(frame)

    def kernels(self) -> list[CovarianceBias]:
        return [layer.attn.kernel for layer in self.layers]

    def kernel_estimate(self) -> dict[str, float] | None:
        """The run's estimate of the field's covariance (range_km, nugget, anisotropy)."""
        return None if self.variogram is None else self.variogram.describe()

    @property
    def hops(self) -> int:
        """Neighbour hops of the receptive field (a tile's halo): one per layer."""
        return self.cfg.layers

    def set_qk(self, enabled: bool) -> None:
        """Switch the data-driven <q, k> residual on or off (kernel warm-up)."""
        for layer in self.layers:
            layer.attn.qk_enabled = enabled

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
        """x, mask [B, T_in, N, F] (x normalised, any value where mask is False);
        calendar [B, 4]; pos [N, 3] km (curve order for the block backend); neighbours [N, k]
        (knn backend; -1 outside a tile); node_index [N] or fewer (model.node_embedding: each row's
        sensor, -1 or rows beyond it for points without one; a sensor without an input window
        gets the learned unknown-sensor vector instead of its own); profile
        [B, horizon, N, F_t] (model.daily_profile: each target's daily-profile level, normalised).

        Returns mean and std, each [B, horizon, N, F_t] (F_t: the target features).
        """
        b, t, n, f = x.shape
        x = torch.where(mask, x, torch.zeros_like(x))
        graph = neighbours  # the k-nearest graph (kriging's neighbourhoods)
        tgt = self.targets
        smoothed = None  # [B, T, N, F_t] twice: the field's estimate, where it has one
        if self.smoothing:
            if graph is None:
                raise ValueError("a model with model.kriged_smoothing needs the neighbour graph")
            smoothed = self.variogram.krige(x[..., tgt], mask[..., tgt], pos, graph, True)
        filled, valued = x, mask  # the window with kriged values, where it has a value
        if self.cfg.kriged_inputs and self.variogram is not None and graph is not None:
            if smoothed is None:
                kriged, got = self.variogram.krige(x[..., tgt], mask[..., tgt], pos, graph)
            else:  # at an unobserved cell the smoothed value is the fill (the same solve)
                kriged = torch.where(mask[..., tgt], x[..., tgt], smoothed[0])
                got = smoothed[1]
            filled, valued = x.clone(), mask.clone()
            filled[..., tgt], valued[..., tgt] = kriged, mask[..., tgt] | got
        steps = torch.cat([filled, mask.to(x.dtype)], dim=-1)  # [B, T, N, 2F]
        tokens = steps.permute(0, 2, 1, 3).reshape(b, n, t * 2 * f)  # [B, N, T * 2F]
        base, based = filled[..., tgt], valued[..., tgt]  # [B, T, N, F_t]
        if smoothed is not None:
            base, based = smoothed
            smooth = base.permute(0, 2, 1, 3).reshape(b, n, -1)  # [B, N, T * F_t]
            tokens = torch.cat([tokens, smooth], dim=-1)
        if self.cfg.daily_profile:
            if profile is None:
                raise ValueError("a model with model.daily_profile needs the profile input")
            levels = profile.to(x.dtype).permute(0, 2, 1, 3).reshape(b, n, -1)  # [B, N, H * F]
            tokens = torch.cat([tokens, levels], dim=-1)
        h = self.embed(tokens)  # [B, N, D]
        if self.temporal is not None:
            h = h + self.temporal(steps)
        if self.calendar is not None:
            h = h + self.calendar(calendar)[:, None, :]
        observed = mask.any(dim=(1, 3))  # [B, N]
        if self.node_embedding is not None:
            if node_index is None:
                raise ValueError("a model with node embeddings needs node_index")
            index = node_index.to(torch.long)
            if index.shape[0] < n:  # rows beyond the sensors (query points): no identity
                index = F.pad(index, (0, n - index.shape[0]), value=-1)
            known = observed & (index >= 0)[None]  # [B, N]
            ident = self.node_embedding(index.clamp_min(0))[None]  # [1, N, D]
            h = h + torch.where(known[..., None], ident, self.unknown_sensor)
        self.variogram_loss = None
        if self.training and self.variogram is not None:
            tgt = self.targets
            self.variogram.observe(x[..., tgt], mask[..., tgt], pos, neighbours)
            self.variogram_loss = self.variogram.loss()
        if self.cfg.backend == "block":  # one block structure for every layer
            neighbours = block_plan(pos, observed, self.cfg.block_size, self.cfg.key_blocks)
        for layer in self.layers:
            if self.checkpoint_layers and self.training:
                h = checkpoint(layer, h, pos, observed, neighbours, use_reentrant=False)
            else:
                h = layer(h, pos, observed, neighbours)
        out = self.head(self.norm(h)).view(b, n, self.horizon, self.features, 2)  # [B,N,H,F_t,2]
        out = out.permute(0, 2, 1, 3, 4)  # [B, H, N, F_t, 2]
        last = _last_observed(base, based)  # [B, N, F_t]
        mean = last[:, None] + out[..., 0]
        std = F.softplus(out[..., 1]) + 1e-3
        if self.cfg.kriging_variance and self.variogram is not None and graph is not None:
            # sensors without an input window: the estimate's kriging variance added
            extra = self.variogram.kriging_variance(observed, pos, graph)  # [B, N]
            std = torch.sqrt(std * std + extra[:, None, :, None].to(std.dtype))
        return mean, std


def build_model(
    cfg: ModelConfig,
    time_in: int,
    horizon: int,
    features: int,
    num_nodes: int,
    frame: Tensor | None = None,
    checkpoint_layers: bool = False,
    targets: list[int] | None = None,
) -> nn.Module:
    """Our :class:`Forecaster`, or the published peer that ``cfg.peer`` names (same interface;
    pipeline/model/peers.py, imported only then; a peer forecasts every feature, which
    pipeline/train/guards.py checks). ``targets``: the forecast features of ours."""
    if cfg.peer is not None:
        from pipeline.model.peers import PeerForecaster

        return PeerForecaster(cfg.peer, time_in, horizon, features, num_nodes, cfg.calendar)
    return Forecaster(cfg, time_in, horizon, features, num_nodes, frame, checkpoint_layers, targets)


def _last_observed(x: Tensor, mask: Tensor) -> Tensor:
    """The most recent observed value per sensor and feature [B, N, F] (0 where none)."""
    t = x.shape[1]
    steps = torch.arange(t, device=x.device).view(1, t, 1, 1)
    latest = torch.where(mask, steps, torch.full_like(steps, -1)).amax(dim=1)  # [B, N, F]
    value = x.gather(1, latest.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(latest >= 0, value, torch.zeros_like(value))
