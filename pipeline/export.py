"""The exported model: weights, configuration and the sensor network it forecasts on.

    <dir>/weights.pt    state dict (float32; loads with torch.load(weights_only=True))
    <dir>/model.json    model config, time_in, horizon, features, units, freq
    <dir>/network.npz   sensor_id, coords, crs, neighbours, mean, std (store order)

:class:`Predictor` turns a raw window into a Gaussian forecast in the data's units; the MLflow
pyfunc (pipeline/tracking.py) wraps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.calendar import calendar_features
from pipeline.config import Config, ModelConfig
from pipeline.geometry import positions_km
from pipeline.model import Forecaster
from pipeline.store import Store


def export_model(model: Forecaster, cfg: Config, store: Store, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / "weights.pt")
    meta = {
        "model": cfg.model.model_dump(),
        "time_in": cfg.data.time_in,
        "horizon": cfg.data.horizon,
        "features": store.attrs["features"],
        "units": store.attrs.get("units", ""),
        "freq": store.attrs["freq"],
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    np.savez(
        out / "network.npz",
        sensor_id=np.array([str(s) for s in store["sensor_id"][:]]),
        coords=store["coords"][:],
        crs=np.array(store.attrs["crs"]),
        neighbours=store["neighbours"][:, : cfg.model.knn],
        mean=store["mean"][:],
        std=store["std"][:],
    )
    return out


class Predictor:
    """Forecasts from raw windows with an exported model (CPU)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        net = np.load(path / "network.npz")
        self.meta, self.sensor_id = meta, net["sensor_id"]
        self.mean, self.std = net["mean"], net["std"]
        self.model = Forecaster(
            ModelConfig(**meta["model"]),
            meta["time_in"],
            meta["horizon"],
            len(meta["features"]),
            len(self.sensor_id),
        )
        self.model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
        self.model.eval()
        pos, frame = positions_km(net["coords"], str(net["crs"]))
        self.model.set_frame(torch.tensor(frame, dtype=torch.float32))
        self.pos = torch.tensor(pos, dtype=torch.float32)
        self.neighbours = torch.from_numpy(net["neighbours"].astype(np.int64))

    def predict(self, x: np.ndarray, origin_time: np.ndarray) -> dict[str, np.ndarray]:
        """x [B, time_in, N, F] in the data's units (NaN = missing), sensors in the order of
        ``sensor_id``; origin_time [B] int64 ns UTC of the first forecast step.
        Returns mean and std [B, horizon, N, F] in the data's units."""
        x = np.asarray(x, dtype=np.float32)
        expect = (self.meta["time_in"], len(self.sensor_id), len(self.meta["features"]))
        if x.ndim != 4 or x.shape[1:] != expect:
            raise ValueError(
                f"x must have shape [batch, {expect[0]}, {expect[1]}, {expect[2]}] "
                f"(batch, time_in, sensors, features); got {list(x.shape)}"
            )
        mask = np.isfinite(x)
        norm = np.where(mask, (x - self.mean) / self.std, 0.0).astype(np.float32)
        cal = calendar_features(np.asarray(origin_time, dtype=np.int64).reshape(-1))
        with torch.no_grad():
            mean, std = self.model(
                torch.from_numpy(norm),
                torch.from_numpy(mask),
                torch.from_numpy(cal),
                self.pos,
                self.neighbours,
            )
        return {"mean": mean.numpy() * self.std + self.mean, "std": std.numpy() * self.std}
