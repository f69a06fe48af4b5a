"""Training windows, from in-memory arrays or streamed from a Zarr store.

A window with origin t (its first forecast step) holds ``x [time_in, node, F]`` =
values[t - time_in : t], ``y [horizon, node, F]`` = values[t : t + horizon], their masks, and
the calendar features of time[t]; values are normalised with the train-split mean/std and are 0
where the mask is False. Windows never cross a split boundary.

:class:`WindowStream` streams batches from a store for training:

- the windows of a split are grouped (one store time chunk of origins x one
  spatial tile); an epoch visits every (window, tile) exactly once;
- the groups of an epoch are shuffled by (seed, epoch) and dealt to the shards
  (rank x loader worker) in turn, so shards are disjoint and together cover the epoch; within
  a group the order is a pure function of (seed, epoch, group), whatever the sharding;
- a batch holds windows of one group, so it reads one or two time chunks, which a small cache
  keeps for the next batch of the group; a background thread prefetches batches;
- the stream is endless (epoch after epoch) and resumes at any step: ``start_step`` skips that
  many batches of this rank's stream without reading them.

Held-out sensors (``data.holdout_sensors``, forecasting at new locations): their values never
enter a batch of the train or validation split, as input or as target; in the test split only
their targets do. Their normalisation statistics, which come from their own history, are
replaced by the average of their seen neighbours'.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data.geometry import positions_km
from pipeline.data.holdout import (
    drop_inputs,
    from_neighbours,
    hide_sensors,
    holdout_nodes,
    unseen_statistics,
    validation_hidden,
)
from pipeline.data.profile import daily_profile as daily_profile_of
from pipeline.data.profile import levels_at, step_ns
from pipeline.data.store import Store, open_store
from pipeline.data.timefeatures import calendar_features


def cut_windows(
    values: np.ndarray,
    mask: np.ndarray,
    time: np.ndarray,
    lo: int,
    origins: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    time_in: int,
    horizon: int,
    targets: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Windows at ``origins`` from a span of rows starting at time step ``lo``.

    values/mask [span, n, F] (rows lo..), time [T] (whole axis), mean/std [n, F];
    ``targets``: the forecast features (data.target; all when None): y, y_mask [.., F_t].
    """
    norm = np.where(mask, (values - mean) / std, 0.0).astype(np.float32)
    rel = origins - lo
    x_idx = rel[:, None] + np.arange(-time_in, 0)  # [B, time_in]
    y_idx = rel[:, None] + np.arange(horizon)  # [B, horizon]
    t = slice(None) if targets is None else targets
    return {
        "x": torch.from_numpy(norm[x_idx]),  # [B, time_in, n, F]
        "x_mask": torch.from_numpy(mask[x_idx]),
        "y": torch.from_numpy(norm[y_idx][..., t]),  # [B, horizon, n, F_t]
        "y_mask": torch.from_numpy(mask[y_idx][..., t]),
        "calendar": torch.from_numpy(calendar_features(time[origins])),  # [B, 4]
    }


def target_features(features: list[str], target: list[str] | None, where: str) -> np.ndarray:
    """The indices of the ``data.target`` features among the store's ``features`` (every
    feature when None)."""
    if target is None:
        return np.arange(len(features))
    unknown = [t for t in target if t not in features]
    if unknown or not target or len(set(target)) < len(target):
        raise ConfigError(
            f"data.target = {target}: {where} has the features {features}; name each target "
            "once, from these"
        )
    return np.array([features.index(t) for t in target])


def window_origins(start: int, stop: int, time_in: int, horizon: int) -> np.ndarray:
    """Every origin whose whole window lies in time steps [start, stop)."""
    return np.arange(start + time_in, stop - horizon + 1)


# --------------------------------------------------------------------------------------------
# Streaming from a store


@dataclass(frozen=True)
class Tile:
    """A node set: ``nodes`` [n] store indices in curve order; ``target`` [n] bool marks the
    tile's own sensors (the rest is halo); ``neighbours`` [n, k] local indices (-1: outside)."""

    nodes: np.ndarray
    target: np.ndarray
    neighbours: np.ndarray


def make_tiles(
    store_neighbours: np.ndarray, k: int, tile_size: int | None, hops: int = 1
) -> list[Tile]:
    """The whole network as one tile, or runs of ``tile_size`` curve-ordered targets plus the
    halo of sensors within ``hops`` neighbour hops of them.

    With ``hops`` = the model's layers the halo is its whole receptive field: layer l of a
    target reads layer l - 1 of its neighbours, so a target's output depends on sensors up to
    ``layers`` hops away and on nothing further; a tile's forecasts at its targets then equal
    those of the whole network (knn backend). Memory per step depends on the tile, not on N.
    """
    n = len(store_neighbours)
    nb = store_neighbours[:, :k]
    if tile_size is None or tile_size >= n:
        return [Tile(np.arange(n), np.ones(n, dtype=bool), nb.astype(np.int64))]
    tiles, lookup = [], np.full(n, -1, dtype=np.int64)
    for t0 in range(0, n, tile_size):
        t1 = min(t0 + tile_size, n)
        nodes = receptive_field(nb, np.arange(t0, t1), hops)
        lookup[nodes] = np.arange(len(nodes))
        tiles.append(Tile(nodes, (nodes >= t0) & (nodes < t1), lookup[nb[nodes]]))
        lookup[nodes] = -1
    return tiles


def receptive_field(neighbours: np.ndarray, seeds: np.ndarray, hops: int) -> np.ndarray:
    """The sensors within ``hops`` neighbour hops of ``seeds`` (included), sorted: curve
    order. ``neighbours`` [N, k] (no -1 entries)."""
    nodes = frontier = np.unique(seeds)
    for _ in range(hops):
        new = np.setdiff1d(np.unique(neighbours[frontier]), nodes, assume_unique=True)
        if len(new) == 0:
            break
        nodes, frontier = np.union1d(nodes, new), new
    return nodes


class ChunkCache:
    """Whole (time chunk, sensor chunk) pieces of values and mask, least recently used out."""

    def __init__(self, store: Store, capacity: int = 32) -> None:
        self.values, self.mask = store["values"], store["mask"]
        self.tc, self.nc = self.values.chunks[0], self.values.chunks[1]
        self.capacity, self.chunks = capacity, OrderedDict()
        self.bytes_read = 0

    def _chunk(self, ti: int, ni: int) -> tuple[np.ndarray, np.ndarray]:
        key = (ti, ni)
        if key in self.chunks:
            self.chunks.move_to_end(key)
            return self.chunks[key]
        sl = (slice(ti * self.tc, (ti + 1) * self.tc), slice(ni * self.nc, (ni + 1) * self.nc))
        chunk = (self.values[sl], self.mask[sl])
        self.bytes_read += chunk[0].nbytes + chunk[1].nbytes
        self.chunks[key] = chunk
        if len(self.chunks) > self.capacity:
            self.chunks.popitem(last=False)
        return chunk

    def read(self, lo: int, hi: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """values, mask [hi - lo, len(nodes), F] for time steps [lo, hi) at store ``nodes``."""
        f = self.values.shape[2]
        values = np.empty((hi - lo, len(nodes), f), dtype=np.float32)
        mask = np.empty((hi - lo, len(nodes), f), dtype=bool)
        node_chunk = nodes // self.nc
        for ni in np.unique(node_chunk):
            cols = np.flatnonzero(node_chunk == ni)
            local = nodes[cols] - ni * self.nc
            for ti in range(lo // self.tc, (hi - 1) // self.tc + 1):
                a, b = max(lo, ti * self.tc), min(hi, (ti + 1) * self.tc)
                bv, bm = self._chunk(ti, int(ni))
                values[a - lo : b - lo, cols] = bv[a - ti * self.tc : b - ti * self.tc][:, local]
                mask[a - lo : b - lo, cols] = bm[a - ti * self.tc : b - ti * self.tc][:, local]
        return values, mask


class WindowStream(torch.utils.data.IterableDataset):
    """Endless, sharded, resumable batches of windows from a store (see module docstring).

    Each item is a dict: x, x_mask [B, time_in, n, F]; y, y_mask [B, horizon, n, F];
    calendar [B, 4]; pos [n, 3] km; neighbours [n, k] (local, -1 outside the tile);
    target [n] bool (loss on targets only); nodes [n] store indices; origins [B];
    epoch and step (the rank-level batch counter); with ``holdout``, hidden [n] bool (the
    held-out sensors, see the module docstring).
    """

    def __init__(
        self,
        store: Store | str,
        split: str,
        time_in: int,
        horizon: int,
        batch_size: int,
        k: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tile_size: int | None = None,
        hops: int = 1,
        start_step: int = 0,
        prefetch: int = 2,
        shuffle: bool = True,
        holdout: float | list[str] | None = None,
        sensor_dropout: float = 0.0,
        daily_profile: bool = False,
        target: list[str] | None = None,
        val_hidden: float = 0.0,
    ) -> None:
        """``daily_profile``: batches carry each target's daily-profile level (``profile``,
        pipeline/data/profile.py; model.daily_profile); ``target``: data.target;
        ``val_hidden``: train.val_hidden (the validation split's batches then carry
        ``val_hidden`` [n] bool, the sensors whose input windows they hide)."""
        super().__init__()
        st = store if isinstance(store, Store) else open_store(store)
        self.store, self.path, self.split, self.batch_size = st, st.path, split, batch_size
        self.time_in, self.horizon, self.seed, self.shuffle = time_in, horizon, seed, shuffle
        self.rank, self.world_size, self.start_step, self.prefetch = (
            rank,
            world_size,
            start_step,
            prefetch,
        )
        n_store_k = st["neighbours"].shape[1]
        if k > n_store_k:
            raise ConfigError(
                f"model.knn = {k} exceeds the {n_store_k} neighbours stored in {st.path}; "
                "preprocess again with a larger data.neighbours or lower model.knn"
            )
        self.time_chunk = st["values"].chunks[0]
        start, stop = st.split(split)
        self.origins = window_origins(start, stop, time_in, horizon)
        if len(self.origins) == 0:
            raise ConfigError(
                f"store {st.path}: split {split!r} [{start}, {stop}) holds no window "
                f"of {time_in} + {horizon} steps: shorten data.time_in or data.horizon, or "
                "give the split more time (data.train_fraction, data.val_fraction)"
            )
        self.time = st["time"][:]
        self.mean, self.std = st["mean"][:], st["std"][:]
        # training batches only: not a one-pass read of the train split (shuffle False)
        self.sensor_dropout = sensor_dropout if split == "train" and shuffle else 0.0
        self.hidden = holdout_nodes(st["sensor_id"][:], holdout, f"store {st.path}")
        if self.hidden is not None:  # their statistics would carry their own history
            self.mean, self.std = unseen_statistics(
                self.mean, self.std, st["neighbours"][:], self.hidden
            )
        self.val_hidden = None  # validation only: seen sensors scored from their neighbours
        if split == "val":
            self.val_hidden = validation_hidden(st["sensor_id"][:], val_hidden, self.hidden)
        self.targets = target_features(st.attrs["features"], target, f"store {st.path}")
        self.profile = None
        if daily_profile:  # [slot, N, F]; held-out sensors' from their neighbours, as above
            step = step_ns(st.attrs["freq"], f"store {st.path}")
            levels = daily_profile_of(st)
            if self.hidden is not None:
                levels = from_neighbours(
                    levels.transpose(1, 0, 2), st["neighbours"][:], self.hidden
                ).transpose(1, 0, 2)  # via [N, slot, F]
            self.profile = (np.ascontiguousarray(levels), step)
        self.tiles = make_tiles(st["neighbours"][:], k, tile_size, hops)
        pos, _ = positions_km(st["coords"][:], st.attrs["crs"])
        self.pos = pos.astype(np.float32)
        # groups: (tile, origins whose time chunk is the same)
        groups = self.origins // self.time_chunk
        self.groups = [
            (t, self.origins[groups == g])
            for t in range(len(self.tiles))
            for g in np.unique(groups)
        ]

    # -- the plan: a pure function of (seed, epoch, shard) ------------------------------------

    def shard_batches(self, epoch: int, shard: int, shards: int) -> list[tuple[int, np.ndarray]]:
        """(tile, origins) of every batch of ``shard`` in ``epoch``, in order."""
        order = np.arange(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        out = []
        for b in order[shard::shards]:
            tile, origins = self.groups[b]
            if self.shuffle:
                origins = np.random.default_rng([self.seed, epoch, b]).permutation(origins)
            for i in range(0, len(origins), self.batch_size):
                out.append((tile, np.sort(origins[i : i + self.batch_size])))
        return out

    def _plan(self, shard: int, shards: int, skip: int) -> Iterator[tuple[int, int, np.ndarray]]:
        epoch = 0
        while True:
            batches = self.shard_batches(epoch, shard, shards)
            if skip >= len(batches):
                skip -= len(batches)
            else:
                for tile, origins in batches[skip:]:
                    yield epoch, tile, origins
                skip = 0
            epoch += 1
            if not self.shuffle:  # evaluation: one pass
                return

    # -- reading ------------------------------------------------------------------------------

    def _load(self, cache: ChunkCache, tile_i: int, origins: np.ndarray, step: int = 0) -> dict:
        tile = self.tiles[tile_i]
        lo, hi = int(origins.min()) - self.time_in, int(origins.max()) + self.horizon
        values, mask = cache.read(lo, hi, tile.nodes)
        batch = cut_windows(
            values,
            mask,
            self.time,
            lo,
            origins,
            self.mean[tile.nodes],
            self.std[tile.nodes],
            self.time_in,
            self.horizon,
            self.targets,
        )
        if self.profile is not None:  # each target's level at its time of day
            levels, step = self.profile
            when = self.time[origins[:, None] + np.arange(self.horizon)]  # [B, horizon]
            at = levels_at(levels, step, when, tile.nodes, self.targets)  # [B, horizon, n, F_t]
            batch["profile"] = torch.from_numpy(at)
        if self.sensor_dropout > 0:  # a pure function of (seed, step): resumable
            drop_inputs(batch, self.sensor_dropout, np.random.default_rng([self.seed, 7, step]))
        if self.hidden is not None:
            hidden = self.hidden[tile.nodes]  # [n]
            hide_sensors(batch, hidden, targets=self.split != "test")
            batch["hidden"] = torch.from_numpy(hidden)
        if self.val_hidden is not None:  # inputs only: their targets are what validation scores
            probe = self.val_hidden[tile.nodes]  # [n]
            hide_sensors(batch, probe, targets=False)
            batch["val_hidden"] = torch.from_numpy(probe)
        batch.update(
            pos=torch.from_numpy(self.pos[tile.nodes]),
            neighbours=torch.from_numpy(tile.neighbours),
            target=torch.from_numpy(tile.target),
            nodes=torch.from_numpy(tile.nodes),
            origins=torch.from_numpy(origins),
        )
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, loader_id = (info.num_workers, info.id) if info else (1, 0)
        # The rank's stream interleaves its workers' shards: step s is batch s // workers of
        # shard (rank, s % workers). The DataLoader asks its worker 0 first, so loader worker
        # i serves the shard whose first step at or after start_step is start_step + i.
        worker = (loader_id + self.start_step) % workers
        shards, shard = self.world_size * workers, self.rank * workers + worker
        if self.shuffle and shards > len(self.groups):
            raise ConfigError(
                f"split {self.split!r} of {self.path} has {len(self.groups)} groups of windows "
                "(tile x time chunk), "
                f"fewer than the {shards} readers (ranks x loader workers): use fewer loader "
                "workers or a smaller data.time_chunk"
            )
        step0 = self.start_step + loader_id
        skip = (step0 - worker) // workers
        cache = ChunkCache(self.store)
        plan = self._plan(shard, shards, skip)

        stop = threading.Event()

        def put(out: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce(out: queue.Queue) -> None:
            try:
                for i, (epoch, tile, origins) in enumerate(plan):
                    step = step0 + i * workers
                    batch = self._load(cache, tile, origins, step)
                    batch["epoch"], batch["step"] = epoch, step
                    if not put(out, batch):
                        return
            except BaseException as exc:  # hand the error to the consumer
                put(out, exc)
            put(out, None)

        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        thread = threading.Thread(target=produce, args=(q,), daemon=True)
        thread.start()
        self.cache = cache
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # closed early (or done): the producer finishes its batch and exits
            stop.set()
            thread.join()
