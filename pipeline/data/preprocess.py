"""Dask preprocessing: raw source -> validated, cleaned, curve-ordered Zarr v3 store.

    open + validate the source -> sort sensors along a Morton curve -> one Dask task per
    (time chunk[, node chunk]): read, mask NaN / inf / sentinels, write the chunk, return
    train-split partial sums -> per-sensor mean/std from the train split only -> k-nearest
    neighbours (KD-tree, km) -> attributes -> validate -> publish atomically.

The only module that imports Dask. It runs on a ``LocalCluster`` (``dask.workers`` x
``dask.threads_per_worker``) or on an existing scheduler (``dask.scheduler`` or
``$DASK_SCHEDULER_ADDRESS``): the same code either way. Chunking: ``time_chunk`` steps x
``node_chunk`` sensors x F (64 x 4096 x 1 float32 = 1 MiB by default): a training window of
time_in + horizon <= 64 steps touches one or two time chunks, and a spatial tile of a few
thousand curve-ordered sensors touches one or two node chunks, so the loader reads whole,
reusable chunks of about a megabyte each.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from dask.distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from pipeline.config import Config, ConfigError, DaskConfig, DataConfig
from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import curve_order, k_nearest
from pipeline.data.sources import Source, SourceError, open_source
from pipeline.data.sources.base import sha256
from pipeline.data.store import (
    MAX_ABS,
    SCHEMA_VERSION,
    atomic_store,
    check_target,
    create_arrays,
)

TASK_VALUES = 8_000_000  # values per write task (32 MB as float32)
CONNECT_S = 10  # seconds to reach a configured Dask scheduler
HANDSHAKE_MAX = 1 << 20  # a Dask scheduler's greeting is a few hundred bytes


@contextlib.contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster bound to 127.0.0.1."""
    address = cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        unreachable = (
            f"Dask scheduler {address} (dask.scheduler / DASK_SCHEDULER_ADDRESS) did not "
            f"answer within {CONNECT_S} s"
        )
        advice = "start it, fix the address, or unset both to run a local cluster"
        _check_greeting(address, unreachable, advice)
        try:
            client = Client(address, timeout=CONNECT_S)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"{unreachable} ({type(exc).__name__}); {advice}") from None
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _check_greeting(address: str, unreachable: str, advice: str) -> None:
    """A Dask scheduler speaks first: on a TCP connection it sends its handshake, an 8-byte
    length and a small message. Something else at the address (an HTTP server waits for a
    request; another service greets with text) would hang Dask's client, which waits for the
    handshake without a limit, or make it allocate what the text's bytes read as."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp"):  # tls://, ws://, inproc://: Dask's own checks
        return
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return  # Dask names a malformed address itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S) as sock:
            sock.settimeout(CONNECT_S)
            head = b""
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        raise ConfigError(
            f"{unreachable}: something listens there but sent nothing (not a Dask scheduler?); "
            f"{advice}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{unreachable} ({exc.strerror or exc}); {advice}") from None
    if len(head) < 8 or struct.unpack("<Q", head)[0] > HANDSHAKE_MAX:
        raise ConfigError(
            f"{address} (dask.scheduler / DASK_SCHEDULER_ADDRESS) is not a Dask scheduler: "
            f"it answered {head[:8]!r}, not Dask's handshake; {advice}"
        )


def _write_block(
    source: Source,
    store: str,
    g0: int,
    g1: int,
    n0: int,
    n1: int,
    sensors: np.ndarray,
    sentinels: tuple[float, ...],
    train_stop: int,
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read, clean and write values[g0:g1, n0:n1]; return train sums (sum, sumsq, count), the
    count of observations in the block, and the largest |value| with its time step, per sensor
    and feature."""
    values = np.asarray(source.read(g0, g1, sensors), dtype=np.float32)  # [t, n, F]
    mask = np.isfinite(values)
    if sentinels:
        mask &= ~np.isin(values, np.asarray(sentinels, dtype=np.float32))
    if np.isinf(values).any() or sentinels:  # missing is NaN in the store, whatever the source
        values = np.where(mask, values, np.float32(np.nan))
    root = zarr.open_group(store, mode="r+")
    root["values"][g0:g1, n0:n1] = values
    root["mask"][g0:g1, n0:n1] = mask
    rows = max(0, min(g1, train_stop) - g0)
    train = np.where(mask[:rows], values[:rows], np.float32(0)).astype(np.float64)  # [rows, n, F]
    size = np.where(mask, np.abs(values), np.float32(0))  # [t, n, F]
    return (
        n0,
        n1,
        train.sum(0),
        np.square(train).sum(0),
        mask[:rows].sum(0),
        mask.sum(0),
        size.max(0),
        g0 + size.argmax(0),
    )


def _task_blocks(
    t: int, n: int, f: int, time_chunk: int, node_chunk: int, node_subsets: bool
) -> list[tuple[int, int, int, int]]:
    """(g0, g1, n0, n1) of each write task: whole chunks only (so no two tasks write the same
    chunk), about TASK_VALUES values each (so a task's memory is bounded whatever N)."""
    nodes = node_chunk if node_subsets else n
    rows = max(1, TASK_VALUES // (nodes * f) // time_chunk) * time_chunk
    return [
        (g0, min(g0 + rows, t), n0, min(n0 + nodes, n))
        for g0 in range(0, t, rows)
        for n0 in range(0, n, nodes)
    ]


def splits(t: int, train_fraction: float, val_fraction: float) -> dict[str, list[int]]:
    """Chronological [start, stop) of train / val / test."""
    a = int(round(t * train_fraction))
    b = int(round(t * (train_fraction + val_fraction)))
    return {"train": [0, a], "val": [a, b], "test": [b, t]}


def preprocess(cfg: Config, progress: bool = True) -> Path:
    """Build the store of ``cfg.data`` and return its path."""
    data = cfg.data
    target = Path(data.store)
    check_target(target, data.overwrite)  # before any work
    with dask_client(cfg.dask) as client:

        def pmap(func, items):
            return client.gather(client.map(func, list(items), pure=False))

        source = open_source(data, pmap)
        try:
            _write_store(client, source, data, target, progress)
        finally:
            source.close()
    return target


def _write_store(
    client: Client, source: Source, data: DataConfig, target: Path, progress: bool
) -> None:
    """The write tasks, train statistics, neighbours and attributes; published atomically."""
    t, n, f = len(source.time), len(source.sensor_ids), len(source.features)
    if t < data.time_in + data.horizon:
        raise SourceError(
            f"{source.files[0] if source.files else 'source'}: {t} time steps are fewer "
            f"than one window (data.time_in + data.horizon = {data.time_in + data.horizon})"
        )
    pos, frame = positions_km(source.coords, source.crs)
    order = curve_order(pos, frame, data.curve)  # store index j -> source index order[j]
    split = splits(t, data.train_fraction, data.val_fraction)
    k = min(data.neighbours, n)
    if k < data.neighbours:
        print(
            f"note: data.neighbours = {data.neighbours}, but the network has {n} sensors: each "
            f"keeps all {n} (itself first)"
        )
    with atomic_store(target, data.overwrite) as tmp:
        root = create_arrays(tmp, t, n, f, k, data.time_chunk, data.node_chunk)
        blocks = _task_blocks(t, n, f, data.time_chunk, data.node_chunk, source.node_subsets)
        source_future = client.scatter(source, broadcast=True)
        hashes = client.map(sha256, source.files, pure=False)  # overlaps the writes
        futures = [
            client.submit(
                _write_block,
                source_future,
                str(tmp),
                g0,
                g1,
                n0,
                n1,
                order[n0:n1],
                tuple(data.source.sentinels),
                split["train"][1],
                pure=False,
            )
            for g0, g1, n0, n1 in blocks
        ]
        total, total_sq = np.zeros((n, f)), np.zeros((n, f))
        count, seen = np.zeros((n, f)), np.zeros((n, f))
        largest, largest_at = np.zeros((n, f)), np.zeros((n, f), dtype=np.int64)
        chunks = as_completed(futures)
        # closed also when a task raises: an error then starts its own line
        with tqdm(
            chunks, total=len(futures), desc="preprocess", unit="chunk", disable=not progress
        ) as bar:
            for future in bar:
                n0, n1, s, sq, c, obs, big, at = future.result()
                total[n0:n1] += s
                total_sq[n0:n1] += sq
                count[n0:n1] += c
                seen[n0:n1] += obs
                larger = big > largest[n0:n1]
                largest[n0:n1] = np.where(larger, big, largest[n0:n1])
                largest_at[n0:n1] = np.where(larger, at, largest_at[n0:n1])
        never = np.flatnonzero((seen == 0).all(axis=1))
        if len(never):
            ids = [source.sensor_ids[order[j]] for j in never[:10]]
            raise SourceError(
                f"sensors {ids} have no observation at all; drop them from the data and "
                "the locations file"
            )
        too_large = largest >= np.float32(MAX_ABS)  # as stored: 1e15 is 9.99999987e14 in float32
        if too_large.any():
            j, c = np.argwhere(too_large)[0]
            when = np.datetime_as_string(np.datetime64(int(source.time[largest_at[j, c]]), "ns"))
            sensor, feature = source.sensor_ids[order[j]], source.features[c]
            raise SourceError(
                f"sensor {sensor!r}, {feature!r} at {when[:19]} UTC: {largest[j, c]:.3g}; "
                f"values of {MAX_ABS:.0e} or more are taken for error codes or unit mistakes: "
                "add it to data.source.sentinels, or rescale the data"
            )
        mean, std, fallback = _train_stats(total, total_sq, count)
        nb, nd = k_nearest(pos[order], k)
        root["time"][:] = source.time
        root["coords"][:] = source.coords[order]
        root["sensor_id"][:] = np.asarray(source.sensor_ids[order], dtype=str)
        root["order"][:] = order
        root["neighbours"][:] = nb.astype(np.int32)
        root["neighbour_dist"][:] = nd.astype(np.float32)
        root["mean"][:] = mean
        root["std"][:] = std
        root.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "freq": source.freq,
                "splits": split,
                "features": source.features,
                "units": data.source.units,
                "crs": source.crs,
                "curve": data.curve,
                "sources": [
                    {"path": str(p), "sha256": h}
                    for p, h in zip(source.files, client.gather(hashes), strict=True)
                ],
                "truth": source.truth,
                # the whole field configuration: evaluation rebuilds its exact forecast law
                "synthetic": (
                    data.synthetic.model_dump(mode="json") if source.truth is not None else None
                ),
                "time_chunk": data.time_chunk,
                "node_chunk": data.node_chunk,
                "sentinels": list(data.source.sentinels),
                "sensors_without_train_stats": [
                    str(source.sensor_ids[order[j]]) for j in fallback[:100]
                ],
                "observed_fraction": float(seen.sum() / (t * n * f)),
            }
        )


def _train_stats(total, total_sq, count):
    """Per-sensor mean/std [N, F] from train sums; sensors without train observations take
    the network's train mean/std (listed in the store's attributes)."""
    net_count = count.sum(0)
    net_mean = total.sum(0) / np.maximum(net_count, 1)
    net_std = np.sqrt(np.maximum(total_sq.sum(0) / np.maximum(net_count, 1) - net_mean**2, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    missing = count == 0
    mean = np.where(missing, net_mean, mean)
    std = np.where(missing, net_std, std)
    std = np.where(std > 1e-6, std, np.maximum(net_std, 1e-6))  # constant sensors: no 0 std
    fallback = np.flatnonzero(missing.any(axis=1))
    return mean.astype(np.float32), std.astype(np.float32), fallback
