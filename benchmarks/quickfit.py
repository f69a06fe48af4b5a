"""In-memory, single-process training of the forecaster on a synthetic field.

The laboratory for deep variography (does the learned range find the true one?): no store, no
launcher, plain PyTorch, for the variography benchmark and its test. Production training
(DeepSpeed, checkpoints, tracking) is pipeline/train/loop.py; both cut windows with
``pipeline.data.stream.cut_windows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data.geometry import positions_km
from pipeline.data.holdout import drop_inputs, hide_sensors, holdout_nodes, unseen_statistics
from pipeline.data.neighbours import k_nearest
from pipeline.data.stream import cut_windows, window_origins
from pipeline.data.synthetic import SyntheticField
from pipeline.model.forecaster import Forecaster
from pipeline.model.losses import LOSSES
from pipeline.train.optimizer import parameter_groups


@dataclass
class WindowSource:
    """In-memory arrays to cut windows from: values/mask [T, N, F], time [T], mean/std [N, F]."""

    values: np.ndarray
    mask: np.ndarray
    time: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    time_in: int
    horizon: int
    hidden: np.ndarray | None = None  # [N] held-out sensors (data.holdout_sensors)

    def origins(self, start: int, stop: int) -> np.ndarray:
        return window_origins(start, stop, self.time_in, self.horizon)

    def batch(
        self, origins: np.ndarray, test: bool = False, drop: tuple | None = None
    ) -> dict[str, torch.Tensor]:
        """Windows at ``origins``; held-out sensors lose their inputs, and their targets too
        unless ``test``; ``drop`` (share, rng): train.sensor_dropout (as
        pipeline/data/stream.py does for a store)."""
        lo, hi = int(origins.min()) - self.time_in, int(origins.max()) + self.horizon
        batch = cut_windows(
            self.values[lo:hi],
            self.mask[lo:hi],
            self.time,
            lo,
            origins,
            self.mean,
            self.std,
            self.time_in,
            self.horizon,
        )
        if drop is not None and drop[0] > 0:
            drop_inputs(batch, *drop)
        if self.hidden is not None:
            hide_sensors(batch, self.hidden, targets=not test)
        return batch


@dataclass
class FitResult:
    model: Forecaster
    coords: np.ndarray  # [N, 2] km
    train_values: np.ndarray  # [T_train, N]
    source: WindowSource
    pos: torch.Tensor  # [N, 3] km
    neighbours: torch.Tensor  # [N, k]
    ranges: list[list[float]] = field(default_factory=list)  # per logged step: layer-0 heads
    losses: list[float] = field(default_factory=list)
    val_loss: float = float("nan")

    def learned(self) -> list[dict[str, list[float]]]:
        return [k.describe() for k in self.model.kernels()]

    @torch.no_grad()
    def predict(self, origins: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """The Gaussian forecast in data units: mean and std [origins, horizon, N] (feature 0)."""
        self.model.eval()
        means, stds = [], []
        for chunk in np.array_split(origins, max(1, -(-len(origins) // batch))):
            b = self.source.batch(chunk, test=True)
            mean, std = self.model(b["x"], b["x_mask"], b["calendar"], self.pos, self.neighbours)
            means.append(mean[..., 0].double().numpy())  # [B, horizon, N]
            stds.append(std[..., 0].double().numpy())
        scale, shift = self.source.std[:, 0], self.source.mean[:, 0]  # [N]
        return np.concatenate(means) * scale + shift, np.concatenate(stds) * scale


def synthetic_source(cfg: Config) -> tuple[WindowSource, np.ndarray]:
    """The synthetic field of ``cfg.data.synthetic`` in memory, with train statistics."""
    syn = cfg.data.synthetic
    fld = SyntheticField(syn)
    seen = fld.observed(0, syn.num_steps)  # [T, N]
    values = np.where(seen, fld.values(0, syn.num_steps), np.nan)[..., None]  # [T, N, 1]
    n_train = int(syn.num_steps * cfg.data.train_fraction)
    time = pd.date_range(syn.start, periods=syn.num_steps, freq=syn.freq).as_unit("ns").asi8
    coords = fld.coords(np.arange(syn.num_sensors))
    mean, std = np.nanmean(values[:n_train], 0), np.nanstd(values[:n_train], 0) + 1e-6
    hidden = holdout_nodes(fld.sensor_ids(), cfg.data.holdout_sensors, "the synthetic field")
    if hidden is not None:
        graph = k_nearest(positions_km(coords, "xy")[0], cfg.data.neighbours)[0]
        mean, std = unseen_statistics(mean, std, graph, hidden)
    src = WindowSource(
        values=values,
        mask=seen[..., None],
        time=time,
        mean=mean,
        std=std,
        time_in=cfg.data.time_in,
        horizon=cfg.data.horizon,
        hidden=hidden,
    )
    return src, coords


def fit_synthetic(cfg: Config, progress: bool = True) -> FitResult:
    """Train on the synthetic field for ``cfg.train.steps`` steps; validate at the end."""
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    src, coords = synthetic_source(cfg)
    t = cfg.data.synthetic.num_steps
    n_train, n_val = int(t * cfg.data.train_fraction), int(t * cfg.data.val_fraction)
    pos_np, frame = positions_km(coords, "xy")
    pos = torch.from_numpy(pos_np).float()
    neighbours = torch.from_numpy(k_nearest(pos_np, cfg.model.knn)[0])
    model = Forecaster(
        cfg.model,
        cfg.data.time_in,
        cfg.data.horizon,
        1,
        len(coords),
        frame=torch.from_numpy(frame).float(),
    )
    opt = torch.optim.AdamW(
        parameter_groups(model, cfg.train.lr, cfg.train.kernel_lr, cfg.train.weight_decay)
    )
    loss_fn = LOSSES[cfg.train.loss]
    result = FitResult(model, coords, src.values[:n_train, :, 0], src, pos, neighbours)
    train_origins = src.origins(0, n_train)
    bar = tqdm(range(cfg.train.steps), disable=not progress, desc="fit", leave=False)
    for step in bar:
        model.set_qk(step >= cfg.train.kernel_warmup_steps)
        origins = np.sort(rng.choice(train_origins, cfg.train.batch_size, replace=False))
        b = src.batch(origins, drop=(cfg.train.sensor_dropout, rng))
        mean, std = model(b["x"], b["x_mask"], b["calendar"], pos, neighbours)
        loss = loss_fn(mean, std, b["y"], b["y_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            result.losses.append(loss.item())
            result.ranges.append(model.kernels()[0].describe()["range_km"])
            bar.set_postfix(loss=f"{loss.item():.4f}", range=f"{result.ranges[-1][0]:.1f}")
    model.set_qk(True)
    val = src.origins(n_train, n_train + n_val)
    with torch.no_grad():
        losses = []
        for chunk in np.array_split(val, max(1, len(val) // 32)):
            b = src.batch(chunk)
            mean, std = model(b["x"], b["x_mask"], b["calendar"], pos, neighbours)
            losses.append(loss_fn(mean, std, b["y"], b["y_mask"]).item())
    result.val_loss = float(np.mean(losses))
    return result
