"""The exported model: weights, configuration and the sensor network it forecasts on.

    <dir>/weights.pt    state dict (float32; loads with torch.load(weights_only=True))
    <dir>/model.json    model config, time_in, horizon, features, units, freq, tile_size
    <dir>/network.npz   sensor_id, coords, crs, neighbours, mean, std (store order)

:class:`Predictor` turns a raw window into a Gaussian forecast in the data's units, sweeping
spatial tiles (targets + the halo of the model's receptive field) so that memory depends on the
tile, not on the network: a million-sensor window is forecast tile by tile and stitched. The
MLflow pyfunc (pipeline/tracking.py) wraps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.data.geometry import positions_km
from pipeline.data.profile import daily_profile, levels_at, step_ns
from pipeline.data.store import Store
from pipeline.data.stream import make_tiles
from pipeline.data.timefeatures import calendar_features
from pipeline.model.forecaster import build_model


def export_model(model: nn.Module, cfg: Config, store: Store, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / "weights.pt")
    meta = {
        "model": cfg.model.model_dump(),
        "time_in": cfg.data.time_in,
        "horizon": cfg.data.horizon,
        "features": store.attrs["features"],  # inputs
        "targets": cfg.data.target or store.attrs["features"],  # forecast (data.target)
        "units": store.attrs.get("units", ""),
        "freq": store.attrs["freq"],
        "tile_size": cfg.data.tile_size,
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    extra = {"profile": daily_profile(store)} if cfg.model.daily_profile else {}
    np.savez(
        out / "network.npz",
        sensor_id=np.array([str(s) for s in store["sensor_id"][:]]),
        coords=store["coords"][:],
        crs=np.array(store.attrs["crs"]),
        neighbours=store["neighbours"][:, : cfg.model.knn],
        mean=store["mean"][:],
        std=store["std"][:],
        **extra,  # [slot, N, F] normalised (model.daily_profile)
    )
    return out


MIN_NS = 10**17  # 1973-03-03 in ns; seconds, ms or us since 1970 of any date since are below


def origin_ns(origin_time, batch: int) -> np.ndarray:
    """``origin_time`` [batch] as int64 ns UTC: datetime64 values are converted; integers must
    be nanoseconds (a clear error for seconds, milliseconds or microseconds)."""
    t = np.asarray(origin_time).reshape(-1)
    if np.issubdtype(t.dtype, np.datetime64):
        t = t.astype("datetime64[ns]").astype(np.int64)
    elif not np.issubdtype(t.dtype, np.integer):
        raise ValueError(
            f"origin_time must be int64 ns since 1970 UTC or datetime64; got dtype {t.dtype}"
        )
    if len(t) != batch:
        raise ValueError(f"origin_time holds {len(t)} times for a batch of {batch} windows")
    small = np.abs(t) < MIN_NS
    if small.any():
        v = int(t[np.flatnonzero(small)[0]])
        raise ValueError(
            f"origin_time {v} is not in nanoseconds since 1970 UTC (seconds, ms or us?): "
            "give int64 ns (seconds x 1e9) or datetime64 values"
        )
    return t.astype(np.int64)


class Predictor:
    """Forecasts from raw windows with an exported model.

    ``tile_size``: sensors forecast per tile (default: the training tiles, or the whole network
    when it trained without tiles). With the knn backend, tiled forecasts equal whole-network
    forecasts (the halo covers the receptive field). With the block backend each tile forms its
    own blocks, as in training; on a CPU (eager FlexAttention, [tile, tile] scores per head)
    keep tiles to a few thousand sensors. ``device``: ``cpu`` (default), ``cuda`` or ``auto``.
    """

    def __init__(self, path: str | Path, tile_size: int | None = None, device: str = "cpu") -> None:
        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        net = np.load(path / "network.npz")
        self.meta, self.sensor_id = meta, net["sensor_id"]
        self.mean, self.std = net["mean"], net["std"]  # [N, F] of the input features
        self.targets = [meta["features"].index(t) for t in meta.get("targets", meta["features"])]
        self.tile_size = tile_size if tile_size is not None else meta.get("tile_size")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        pos, frame = positions_km(net["coords"], str(net["crs"]))
        self.model = build_model(
            ModelConfig(**meta["model"]),
            meta["time_in"],
            meta["horizon"],
            len(meta["features"]),
            len(self.sensor_id),
            frame=torch.tensor(frame, dtype=torch.float32),
            targets=self.targets,
        )
        self.model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
        self.model.eval()
        self.model.to(self.device)
        self.pos = torch.tensor(pos, dtype=torch.float32)
        self.neighbours = net["neighbours"].astype(np.int64)
        self.profile = None  # model.daily_profile: levels [slot, N, F] and the step in ns
        if "profile" in net.files:
            self.profile = (net["profile"], step_ns(meta["freq"], str(path)))

    def predict(
        self, x: np.ndarray, origin_time: np.ndarray, tile_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """x [B, time_in, N, F] in the data's units (NaN = missing), sensors in the order of
        ``sensor_id``; origin_time [B] int64 ns UTC of the first forecast step; ``tile_size``
        overrides the predictor's. Returns mean and std [B, horizon, N, F_t] in the data's units
        (F_t: the forecast features, ``meta["targets"]``)."""
        x = np.asarray(x, dtype=np.float32)
        expect = (self.meta["time_in"], len(self.sensor_id), len(self.meta["features"]))
        if x.ndim != 4 or x.shape[1:] != expect:
            raise ValueError(
                f"x must have shape [batch, {expect[0]}, {expect[1]}, {expect[2]}] "
                f"(batch, time_in, sensors, features); got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("x holds no window (batch 0): give at least one")
        origin_time = origin_ns(origin_time, x.shape[0])
        mask = np.isfinite(x)
        norm = np.where(mask, (x - self.mean) / self.std, 0.0).astype(np.float32)
        cal = torch.from_numpy(calendar_features(origin_time)).to(self.device)
        if self.profile is not None:  # each target's level at its time of day
            profile, step = self.profile
            when = origin_time[:, None] + np.arange(self.meta["horizon"]) * step  # [B, horizon]
        tiles = make_tiles(
            self.neighbours,
            self.neighbours.shape[1],
            tile_size if tile_size is not None else self.tile_size,
            hops=self.model.hops,
        )
        b, n, f = x.shape[0], x.shape[2], len(self.targets)
        mean = np.empty((b, self.meta["horizon"], n, f), dtype=np.float32)  # [B, H, N, F_t]
        std = np.empty_like(mean)
        with torch.no_grad():
            for tile in tiles:
                nodes, keep = tile.nodes, tile.target
                levels = None  # model.daily_profile: [B, H, n, F_t]
                if self.profile is not None:
                    at = levels_at(profile, step, when, nodes, self.targets)
                    levels = torch.from_numpy(at).to(self.device)
                m, s = self.model(
                    torch.from_numpy(norm[:, :, nodes]).to(self.device),  # [B, T, n, F]
                    torch.from_numpy(mask[:, :, nodes]).to(self.device),
                    cal,
                    self.pos[nodes].to(self.device),
                    torch.from_numpy(tile.neighbours).to(self.device),
                    torch.from_numpy(nodes).to(self.device),  # model.node_embedding
                    levels,
                )
                mean[:, :, nodes[keep]] = m[:, :, torch.from_numpy(keep)].float().cpu().numpy()
                std[:, :, nodes[keep]] = s[:, :, torch.from_numpy(keep)].float().cpu().numpy()
        shift, scale = self.mean[:, self.targets], self.std[:, self.targets]
        return {"mean": mean * scale + shift, "std": std * scale}
