"""What must hold before and while a run trains: one process per run directory (a lock),
the config fits its store (every split holds a window, knn within the stored neighbours), and
the values a checkpoint is pinned to (the store's content, the model's shape)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Config, ConfigError, flatten
from pipeline.data.profile import step_ns
from pipeline.data.store import Store
from pipeline.data.stream import target_features, window_origins

# the keys a checkpoint's weights and windows depend on: resuming with another value is refused
PINNED_KEYS = (
    "model.d_model",
    "model.heads",
    "model.layers",
    "model.mlp_ratio",
    "model.kernel",
    "model.anisotropy",
    "model.kernel_heads",
    "model.qk_residual",
    "model.calendar",
    "model.daily_profile",
    "model.node_embedding",
    "model.temporal_layers",
    "model.temporal_width",
    "model.peer",
    "model.backend",
    "model.knn",  # the neighbourhood each sensor attends to
    "train.monitor",  # the best validation so far is of this metric
    "train.val_hidden",  # and of these sensors
    "model.kriged_inputs",
    "model.kriged_smoothing",  # the embedding's width
    "data.time_in",
    "data.horizon",
    "data.holdout_sensors",
    "data.target",
)


def check_fits(cfg: Config, store: Store) -> None:
    """The config's constraints on the store, checked before any work: every split holds a
    window, the knn backend's ``model.knn`` is within the stored neighbours, and a daily
    profile has a time step that divides a day."""
    if cfg.model.daily_profile:
        step_ns(store.attrs["freq"], f"store {store.path}")
    targets = target_features(store.attrs["features"], cfg.data.target, f"store {store.path}")
    if cfg.model.peer is not None and len(targets) < store.shape[2]:
        raise ConfigError(
            f"the peer {cfg.model.peer} forecasts every feature of {store.path}: leave "
            "data.target unset"
        )
    for split in ("train", "val", "test"):
        start, stop = store.split(split)
        if len(window_origins(start, stop, cfg.data.time_in, cfg.data.horizon)) == 0:
            raise ConfigError(
                f"data.horizon = {cfg.data.horizon} with data.time_in = {cfg.data.time_in}: "
                f"the {split} split of {store.path} ({stop - start} steps) holds no window; "
                "shorten them, or give the split more time (data.train_fraction, "
                "data.val_fraction)"
            )
    stored = store["neighbours"].shape[1]
    if cfg.model.backend == "knn" and cfg.model.knn > stored:
        raise ConfigError(
            f"model.knn = {cfg.model.knn} exceeds the {stored} neighbours stored in "
            f"{store.path} (data.neighbours, at most the number of sensors): lower model.knn"
        )


def pins(cfg: Config, store: Store) -> dict[str, str]:
    """What a checkpoint must agree with to be resumed: the store's content (fingerprint) and
    the values of ``PINNED_KEYS``."""
    flat = flatten(cfg)
    return {"data.store": store.fingerprint(), **{k: json.dumps(flat[k]) for k in PINNED_KEYS}}


@contextlib.contextmanager
def run_lock(run_dir: Path, hold: bool) -> Iterator[None]:
    """With ``hold`` (rank 0), an exclusive lock on ``run_dir`` for the block: two runs of one
    name would interleave their checkpoints."""
    if not hold:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - closed below, or on an error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"run directory {run_dir} is in use by {holder}: two runs of one name would mix "
            "their checkpoints; wait for it to end, or give this run another name="
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # releases the lock
