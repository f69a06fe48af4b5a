"""Each sensor's daily profile: its train-split mean at every time of day (the historical
average of traffic forecasting), an input that gives the model each sensor's daily cycle
without a parameter per sensor (``model.daily_profile``, docs/peers.md).

Computed from a store in one pass over the train split, a chunk of sensors at a time; held in
normalised units ((profile - mean) / std, 0 = the sensor's train mean), [slot, N, F].
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from pipeline.config import ConfigError
from pipeline.data.store import Store, open_store
from pipeline.data.timefeatures import DAY_NS


def _step(freq: str) -> int:
    """The time step of ``freq`` in ns; 0 for calendar steps (months, years: no fixed length)."""
    try:
        return int(pd.Timedelta(pd.tseries.frequencies.to_offset(freq)).value)
    except (ValueError, TypeError):
        return 0


def divides_day(freq: str) -> bool:
    """Whether a time step of ``freq`` divides a day (a daily profile exists)."""
    step = _step(freq)
    return 0 < step <= DAY_NS and DAY_NS % step == 0


def step_ns(freq: str, where: str) -> int:
    """The time step of ``freq`` in ns, which must divide a day (one slot per step of a day)."""
    step = _step(freq)
    if not divides_day(freq):
        raise ConfigError(
            f"model.daily_profile needs a time step that divides a day; {where} has {freq!r}: "
            "set model.daily_profile=false"
        )
    return step


def slots(time_ns: np.ndarray, step: int) -> np.ndarray:
    """The time-of-day slot (0 .. day / step - 1) of each timestamp (int64 ns UTC)."""
    return (np.asarray(time_ns, dtype=np.int64) % DAY_NS) // step


def levels_at(
    profile: np.ndarray, step: int, when: np.ndarray, nodes: np.ndarray, features: np.ndarray
) -> np.ndarray:
    """The levels of ``profile`` [slot, N, F] at the times ``when`` [B, horizon] (ns) for the
    sensors ``nodes`` [n] and the features ``features`` [F_t]: [B, horizon, n, F_t] (only
    these elements are read)."""
    at = slots(when, step)[..., None]  # [B, horizon, 1]
    return profile[at, np.asarray(nodes)[None, None, :]][..., features]  # [B, horizon, n, F_t]


def daily_profile(store: Store, chunk: int | None = None) -> np.ndarray:
    """Each sensor's train mean per time-of-day slot, normalised, float32 [slot, N, F],
    read-only; a slot never observed in the train split is 0 (the sensor's train mean).
    ``chunk``: sensors per read (default the store's node chunk). A run's streams (train, val,
    test) and its export share one pass over the train split: the result is kept per store
    content."""
    return _profile(str(store.path), store.fingerprint(), chunk)


@functools.lru_cache(maxsize=2)
def _profile(path: str, fingerprint: str, chunk: int | None) -> np.ndarray:
    store = open_store(path)
    step = step_ns(store.attrs["freq"], f"store {store.path}")
    start, stop = store.split("train")
    slot = slots(store["time"][start:stop], step)  # [T_train]
    t, n, f = store.shape
    mean, std = store["mean"][:], store["std"][:]  # [N, F]
    out = np.zeros((DAY_NS // step, n, f), dtype=np.float32)
    chunk = chunk or store["values"].chunks[1]
    for n0 in range(0, n, chunk):
        n1 = min(n0 + chunk, n)
        values = store["values"][start:stop, n0:n1]  # [T_train, n, F]
        seen = store["mask"][start:stop, n0:n1]
        total = np.zeros((len(out), n1 - n0, f))
        count = np.zeros_like(total)
        np.add.at(total, slot, np.where(seen, values, 0.0))
        np.add.at(count, slot, seen)
        level = total / np.maximum(count, 1)
        norm = (level - mean[n0:n1]) / std[n0:n1]
        out[:, n0:n1] = np.where(count > 0, norm, 0.0)
    out.flags.writeable = False
    return out
