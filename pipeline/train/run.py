"""What a training run holds from setup to finish (pipeline/train/loop.py) and the pieces its
loop and its evaluation (pipeline/train/evaluation.py) share: the batch on the device, the
forward pass, the streams of the run's store, the learned kernel parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.store import Store
from pipeline.data.stream import WindowStream
from pipeline.train import engine
from pipeline.train.averaging import WeightAverage


class Tracker(Protocol):
    """What training asks of a tracker (pipeline/track/tracking.py implements it)."""

    def start(self, store: Store, resuming: bool) -> None: ...
    def log_step(self, step: int, loss: float, kernels: list[dict], lr: float) -> None: ...
    def log_validation(self, step: int, val: dict) -> None: ...
    def finish(self, metrics: dict, model_dir: Path, store: Store) -> str | None: ...
    def fail(self, exc: BaseException) -> None: ...


@dataclass
class Run:
    """What a training run holds from setup to finish."""

    cfg: Config
    ctx: engine.Context
    store: Store
    run_dir: Path
    model: nn.Module  # Forecaster, or a PeerForecaster (model.peer)
    engine: Any
    dtype: torch.dtype
    tracker: Tracker | None
    state: dict
    resumed: dict | None
    average: WeightAverage | None = None  # train.ema_decay
    streams: dict[str, WindowStream] = field(default_factory=dict)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("x", "calendar", "profile") and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def forward(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean, std (float32, normalised units) and the loss mask (observed targets only)."""
    mean, std = engine(
        batch["x"],
        batch["x_mask"],
        batch["calendar"],
        batch["pos"],
        batch["neighbours"],
        batch["nodes"],  # the sensors' store indices (model.node_embedding)
        batch.get("profile"),  # model.daily_profile
    )
    mask = batch["y_mask"] & batch["target"][None, None, :, None]
    return mean.float(), std.float(), mask


def auxiliary_loss(engine) -> torch.Tensor | None:
    """The field variogram's misfit of the last training forward (model.variography; its
    gradient reaches the variogram's parameters only), or None."""
    return getattr(engine.module, "variogram_loss", None)


def split_stream(run: Run, split: str, **kwargs) -> WindowStream:
    """This rank's share of ``split`` (see pipeline/data/stream.py)."""
    cfg, ctx = run.cfg, run.ctx
    return WindowStream(
        run.store,
        split,
        cfg.data.time_in,
        cfg.data.horizon,
        cfg.train.batch_size,
        min(cfg.model.knn, run.store["neighbours"].shape[1]),  # check_fits: knn backend fits
        seed=cfg.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        tile_size=cfg.data.tile_size,
        hops=cfg.model.layers,  # the halo covers the model's receptive field
        holdout=cfg.data.holdout_sensors,
        sensor_dropout=cfg.train.sensor_dropout,
        val_hidden=cfg.train.val_hidden,
        daily_profile=kwargs.pop("daily_profile", cfg.model.daily_profile),
        target=cfg.data.target,
        **kwargs,
    )


def kernel_params(model: nn.Module) -> list[dict]:
    """Learned kernel parameters per layer; none for kernel ``none`` (nothing is learned)."""
    kernels = model.kernels()  # none for a peer
    if not kernels or kernels[0].family == "none":
        return []
    return [{"layer": i, **k.describe()} for i, k in enumerate(kernels)]


def kernel_estimate(model: nn.Module) -> dict[str, float] | None:
    """The run's estimate of the field's covariance (model.variography), or None."""
    estimate = getattr(model, "kernel_estimate", None)  # none for a peer
    return None if estimate is None else estimate()
