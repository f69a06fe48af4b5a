"""The spatial split and its training aid: which sensors are held out of training
(``data.holdout_sensors``), their normalisation and daily profile taken from seen neighbours,
their values removed from batches, ``train.sensor_dropout`` (whole input windows hidden so
that the model learns to forecast a sensor from its neighbours) and ``train.val_hidden`` (seen
sensors whose windows validation hides, to score that)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.config import ConfigError


def holdout_nodes(sensor_ids: np.ndarray, spec: float | list[str] | None, where: str):
    """The held-out sensors of ``data.holdout_sensors`` as a mask over ``sensor_ids`` [N]
    (None when nothing is held out): a fraction picks the sensors whose id hashes below it (the
    same sensors in every run, whatever the order), a list names them."""
    if spec is None:
        return None
    ids = [str(s) for s in sensor_ids]
    if isinstance(spec, float):
        hidden = _uniform(ids) < spec
    else:
        unknown = sorted(set(spec) - set(ids))
        if unknown:
            raise ConfigError(
                f"data.holdout_sensors names {len(unknown)} sensor(s) not in {where}: "
                f"{', '.join(unknown[:5])}; use ids of its sensor_id array"
            )
        hidden = np.isin(ids, list(spec))
    if hidden.all() or not hidden.any():
        raise ConfigError(
            f"data.holdout_sensors = {spec} holds out {int(hidden.sum())} of the {len(ids)} "
            f"sensors of {where}: keep at least one sensor on each side"
        )
    return hidden


def validation_hidden(sensor_ids: np.ndarray, share: float, held_out: np.ndarray | None):
    """The seen sensors whose input windows validation hides (``train.val_hidden``) as a mask
    over ``sensor_ids`` [N], or None for a share of 0: those whose id hashes (salted apart from
    the held-out split's) below ``share``, the same in every run and for every model."""
    if share <= 0:
        return None
    hidden = _uniform([str(s) for s in sensor_ids], salt="val_hidden/") < share
    if held_out is not None:
        hidden &= ~held_out
    if not hidden.any():
        raise ConfigError(
            f"train.val_hidden = {share} hides none of the {len(sensor_ids)} sensors' windows "
            "in validation: raise it, or set 0"
        )
    return hidden


def _uniform(ids: list[str], salt: str = "") -> np.ndarray:
    """A number in [0, 1) per sensor id [N], a hash of (salt, id): the same in every run."""
    digest = [hashlib.blake2b((salt + s).encode(), digest_size=8).digest() for s in ids]
    return np.array([int.from_bytes(d, "big") / 2.0**64 for d in digest])


def from_neighbours(a: np.ndarray, neighbours: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """``a`` [N, ...] with each held-out sensor's row replaced by the average over its seen
    stored neighbours (``neighbours`` [N, k], itself first; -1 none), or over every seen
    sensor where none of its neighbours is seen."""
    a = a.copy()
    a[hidden] = neighbour_average(a, neighbours[hidden][:, 1:], ~hidden)
    return a


def neighbour_average(a: np.ndarray, nb: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The average of ``a`` [N, ...] over each row's neighbours ``nb`` [M, j] (-1 none) that
    are ``seen`` [N]; over every seen sensor for a row with none: [M, ...]."""
    usable = (nb >= 0) & seen[nb.clip(min=0)]  # [M, j]
    weights = usable.reshape(*usable.shape, *([1] * (a.ndim - 1))).astype(np.float64)
    count = weights.sum(1)  # [M, 1, ...]
    local = (a[nb.clip(min=0)] * weights).sum(1) / count.clip(min=1)  # [M, ...]
    return np.where(count > 0, local, a[seen].mean(0)).astype(a.dtype)


def unseen_statistics(
    mean: np.ndarray, std: np.ndarray, neighbours: np.ndarray, hidden: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """mean, std [N, F] with the held-out sensors' taken from their seen neighbours
    (:func:`from_neighbours`): their own would carry their history."""
    return from_neighbours(mean, neighbours, hidden), from_neighbours(std, neighbours, hidden)


def hide_sensors(batch: dict, hidden: np.ndarray, targets: bool) -> None:
    """Remove the values of the ``hidden`` [n] sensors from a batch of :func:`cut_windows`
    (in place): their inputs always, their targets too when ``targets``."""
    h = torch.from_numpy(np.asarray(hidden, dtype=bool))
    keys = ("x", "y") if targets else ("x",)
    for key in keys:
        batch[key][:, :, h] = 0.0  # [B, time, n, F]
        batch[f"{key}_mask"][:, :, h] = False


def drop_inputs(batch: dict, share: float, rng: np.random.Generator) -> None:
    """Hide the whole input window of a random ``share`` of the batch's sensors (in place),
    keeping their targets: training for sensors without history (``train.sensor_dropout``)."""
    n = batch["x"].shape[2]
    drop = torch.from_numpy(rng.random(n) < share)  # [n]
    batch["x"][:, :, drop] = 0.0  # [B, time_in, n, F]
    batch["x_mask"][:, :, drop] = False
