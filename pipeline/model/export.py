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
from torch import Tensor, nn

from pipeline.config import Config, ModelConfig
from pipeline.data.geometry import positions_km
from pipeline.data.holdout import (
    from_neighbours,
    holdout_nodes,
    neighbour_average,
    unseen_statistics,
)
from pipeline.data.neighbours import nearest_to
from pipeline.data.profile import daily_profile, levels_at, step_ns
from pipeline.data.store import MAX_ABS, Store
from pipeline.data.stream import make_tiles, receptive_field
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
    # as the run's streams hold them: held-out sensors (data.holdout_sensors) normalised with
    # their seen neighbours' statistics and daily profile, their own carrying their history
    ids, neighbours = store["sensor_id"][:], store["neighbours"][:]
    mean, std, extra = store["mean"][:], store["std"][:], {}
    hidden = holdout_nodes(ids, cfg.data.holdout_sensors, f"store {store.path}")
    if hidden is not None:
        mean, std = unseen_statistics(mean, std, neighbours, hidden)
        extra["hidden"] = hidden
    if cfg.model.daily_profile:  # [slot, N, F] normalised
        profile = daily_profile(store)
        if hidden is not None:  # via [N, slot, F]
            profile = from_neighbours(profile.transpose(1, 0, 2), neighbours, hidden)
            profile = profile.transpose(1, 0, 2)
        extra["profile"] = np.ascontiguousarray(profile)
    np.savez(
        out / "network.npz",
        sensor_id=np.array([str(s) for s in ids]),
        coords=store["coords"][:],
        crs=np.array(store.attrs["crs"]),
        neighbours=neighbours[:, : cfg.model.knn],
        mean=mean,
        std=std,
        **extra,
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
        self.crs = str(net["crs"])
        pos, frame = positions_km(net["coords"], self.crs)
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
        self.tree_pos = pos  # float64: a point at a sensor's coordinates is at distance 0
        self.neighbours = net["neighbours"].astype(np.int64)
        # sensors held out of training: not among a query point's usable neighbours
        self.hidden = net["hidden"] if "hidden" in net.files else np.zeros(len(pos), bool)
        self.profile = None  # model.daily_profile: levels [slot, N, F] and the step in ns
        if "profile" in net.files:
            self.profile = (net["profile"], step_ns(meta["freq"], str(path)))

    def predict(
        self,
        x: np.ndarray,
        origin_time: np.ndarray,
        tile_size: int | None = None,
        query: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """x [B, time_in, N, F] in the data's units (NaN = missing), sensors in the order of
        ``sensor_id``; origin_time [B] int64 ns UTC of the first forecast step; ``tile_size``
        overrides the predictor's. Returns mean and std [B, horizon, N, F_t] in the data's units
        (F_t: the forecast features, ``meta["targets"]``). With ``query`` [M, 2], points
        without a sensor in the network's coordinates (latitude/longitude degrees or x/y km),
        also ``query_mean`` and ``query_std`` [B, horizon, M, F_t]: each point forecast as a
        sensor without history among the network's (:meth:`_predict_query`)."""
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
        self._check_scale(x, mask)
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
                    levels = levels_at(profile, step, when, nodes, self.targets)
                m, s = self._forward(
                    norm[:, :, nodes], mask[:, :, nodes], cal, nodes, tile.neighbours,
                    self.pos[nodes], levels,
                )  # fmt: skip
                mean[:, :, nodes[keep]] = m[:, :, torch.from_numpy(keep)].float().cpu().numpy()
                std[:, :, nodes[keep]] = s[:, :, torch.from_numpy(keep)].float().cpu().numpy()
        shift, scale = self.mean[:, self.targets], self.std[:, self.targets]
        out = {"mean": mean * scale + shift, "std": std * scale}
        _check_finite(out["mean"], out["std"], self.sensor_id, "sensor")
        if query is not None:
            size = tile_size if tile_size is not None else self.tile_size
            out.update(self._predict_query(norm, mask, cal, origin_time, query, size))
        return out

    def _forward(self, norm, mask, cal, nodes, neighbours, pos, levels) -> tuple[Tensor, Tensor]:
        """The model on the sensors ``nodes`` [n] of the network plus ``pos`` beyond them:
        norm, mask [B, T, n', F] and pos [n', 3] for n' >= n rows, neighbours [n', k] local."""
        d = self.device
        return self.model(
            torch.from_numpy(norm).to(d),  # [B, T, n', F]
            torch.from_numpy(mask).to(d),
            cal,
            pos.to(d),
            torch.from_numpy(neighbours).to(d),
            torch.from_numpy(nodes).to(d),  # model.node_embedding (the sensors' rows; none beyond)
            None if levels is None else torch.from_numpy(levels).to(d),
        )

    def _predict_query(self, norm, mask, cal, origin_time, query, tile_size) -> dict:
        """Forecasts at ``query`` points, each made as the model forecasts a sensor it never
        saw (``data.holdout_sensors``): no input window, attention over the point itself and
        its ``model.knn`` - 1 nearest sensors; normalisation and daily profile the average of
        those sensors' (as for a held-out sensor). Points are forecast ``tile_size`` at a time
        with the network sensors of their receptive field, so memory follows the tile."""
        qpos = self._query_positions(query)  # [M, 3]
        k, seen = self.neighbours.shape[1], ~self.hidden
        near = nearest_to(self.tree_pos, qpos, k - 1)  # [M, k - 1]
        q_mean = neighbour_average(self.mean, near, seen)  # [M, F]
        q_std = neighbour_average(self.std, near, seen)
        b, h, m = norm.shape[0], self.meta["horizon"], len(qpos)
        mean = np.empty((b, h, m, len(self.targets)), dtype=np.float32)  # [B, H, M, F_t]
        std = np.empty_like(mean)
        lookup = np.full(len(self.sensor_id), -1, dtype=np.int64)
        group = tile_size or m
        for g0 in range(0, m, group):
            q = np.arange(g0, min(g0 + group, m))
            seeds = near[q][near[q] >= 0]
            nodes = receptive_field(self.neighbours, seeds, self.model.hops)
            lookup[nodes] = np.arange(len(nodes))
            rows = len(nodes) + np.arange(len(q))  # the points' rows after the sensors'
            nb = np.concatenate(
                [
                    lookup[self.neighbours[nodes]],
                    np.column_stack(
                        [rows, np.where(near[q] >= 0, lookup[near[q].clip(min=0)], -1)]
                    ),
                ]
            )  # [n + q, k]
            lookup[nodes] = -1
            shape = (b, norm.shape[1], len(q), norm.shape[3])
            levels = None  # model.daily_profile: sensors' levels, then the points'
            if self.profile is not None:
                profile, step = self.profile
                when = origin_time[:, None] + np.arange(h) * step  # [B, horizon]
                at = levels_at(profile, step, when, nodes, self.targets)  # [B, H, n, F_t]
                around = neighbour_average(profile.transpose(1, 0, 2), near[q], seen)
                points = levels_at(
                    around.transpose(1, 0, 2), step, when, np.arange(len(q)), self.targets
                )
                levels = np.concatenate([at, points], axis=2).astype(np.float32)
            with torch.no_grad():
                mu, sigma = self._forward(
                    np.concatenate([norm[:, :, nodes], np.zeros(shape, np.float32)], axis=2),
                    np.concatenate([mask[:, :, nodes], np.zeros(shape, bool)], axis=2),
                    cal,
                    nodes,
                    nb,
                    torch.cat([self.pos[nodes], torch.from_numpy(qpos[q]).float()]),
                    levels,
                )
            mean[:, :, q] = mu[:, :, len(nodes) :].float().cpu().numpy()
            std[:, :, q] = sigma[:, :, len(nodes) :].float().cpu().numpy()
        shift, scale = q_mean[:, self.targets], q_std[:, self.targets]
        out = {"query_mean": mean * scale + shift, "query_std": std * scale}
        _check_finite(out["query_mean"], out["query_std"], np.arange(m), "query point")
        return out

    def _query_positions(self, query) -> np.ndarray:
        """``query`` [M, 2] in the network's coordinates as positions [M, 3] km."""
        if self.model.cfg.backend == "block":
            raise ValueError(
                "query points need the knn or dense backend: the block backend forms its blocks "
                "from the network's curve order"
            )
        q = np.asarray(query, dtype=np.float64)
        crs = str(self.crs)
        if q.ndim != 2 or q.shape[1] != 2 or len(q) == 0 or not np.isfinite(q).all():
            units = "latitude, longitude degrees" if crs == "latlon" else "x, y km"
            raise ValueError(
                f"query must be finite coordinates [points, 2] ({units}, as the network's); "
                f"got shape {list(q.shape)}"
            )
        if crs == "latlon" and (np.abs(q[:, 0]) > 90).any():
            raise ValueError("query latitudes must lie in [-90, 90]: is it (longitude, latitude)?")
        return positions_km(q, crs)[0]

    def _check_scale(self, x: np.ndarray, mask: np.ndarray) -> None:
        """Values of 1e15 or more are refused, as in preprocessing: error codes or unit
        mistakes, which would drive every forecast to inf or NaN."""
        big = mask & (np.abs(x) >= np.float32(MAX_ABS))
        if big.any():
            w, t, node, f = np.argwhere(big)[0]
            raise ValueError(
                f"x[{w}, {t}, {node}, {f}] = {x[w, t, node, f]:.3g} (sensor "
                f"{self.sensor_id[node]}, {int(big.sum())} such values): values of "
                f"{MAX_ABS:.0e} or more are error codes or unit mistakes, never readings; mark "
                "them missing (NaN) or fix the units"
            )


def _check_finite(mean: np.ndarray, std: np.ndarray, names, what: str) -> None:
    """A forecast that is not finite is an error, never returned."""
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    if bad.any():
        w, h, node, _ = np.argwhere(bad)[0]
        raise ValueError(
            f"the forecast of window {w} is not finite at {what} {names[node]} "
            f"(step {h + 1}; {int(bad.sum())} values in all): its inputs lie far outside "
            "what the model was trained on, or its weights are damaged; check the window's "
            "units against the training data's"
        )
