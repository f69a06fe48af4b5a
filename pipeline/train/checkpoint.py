"""Checkpoints: DeepSpeed's engine state plus, per rank, the trainer state (step, data
position, RNG states) saved as plain tensors and containers, so that our files load with
``torch.load(weights_only=True)``. DeepSpeed's files are checked before DeepSpeed loads them:
nothing in them but tensors, containers and an allow-list of DeepSpeed's plain classes."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.train.engine import Context, barrier, checkpoint_globals


def rng_state() -> dict[str, Any]:
    """RNG states of torch, NumPy and Python as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


MARKER = "COMPLETE"  # in a checkpoint's folder: every rank's files are written, with sizes


def save(
    engine, ckpt_dir: Path, step: int, trainer_state: dict, ctx: Context, keep: int | None = None
) -> None:
    """Engine state (DeepSpeed) + each rank's trainer state; then, once every rank is done,
    the checkpoint's completion marker (the only thing resume trusts), and the checkpoints
    beyond the newest ``keep`` complete ones removed (:func:`prune`)."""
    tag = f"step{step:08d}"
    with _writing(ckpt_dir / tag):
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save(
            {**trainer_state, "rng": rng_state(), "world_size": ctx.world_size},
            ckpt_dir / tag / f"trainer_rank{ctx.rank}.pt",
        )
        barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag)
        barrier()  # every rank's files are closed
        if ctx.is_main:
            sizes = {p.name: p.stat().st_size for p in sorted((ckpt_dir / tag).glob("*.pt"))}
            tmp = ckpt_dir / tag / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"step": step, "world_size": ctx.world_size, "files": sizes}))
            tmp.replace(ckpt_dir / tag / MARKER)
            prune(ckpt_dir, keep)
    barrier()


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a quota, a refused folder)."""


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A file system refusal while writing ``folder`` (torch.save reports a full disk as a
    RuntimeError, and a full disk at close names no file) as one line that names the folder
    and the free space there; the incomplete checkpoint has no marker, so resume skips it."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        where = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        free = shutil.disk_usage(where).free / 2**20
        stream = any(word in str(exc) for word in ("writ", "iostream", "No space"))
        if isinstance(exc, RuntimeError) and not (stream or free < 1):
            raise  # not a write failure: a bug, with its traceback
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:  # torch's stream errors do not say why
            reason = "No space left on device" if free < 1 else str(exc)
        raise CheckpointWriteError(
            f"checkpoint {folder} could not be written ({reason.splitlines()[0]}); "
            f"{free:.1f} MB free there: free space or set train.out_dir on a larger disk "
            "(a resume starts from the last complete checkpoint)"
        ) from None


BEST = "best.pt"  # in the checkpoints folder: the best validation weights so far


def save_best(weights: dict[str, torch.Tensor], ckpt_dir: Path, step: int, value: float) -> None:
    """The weights of the best validation so far (rank 0 calls it), replaced atomically: a
    kill while writing leaves the previous best."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{BEST}.tmp"
    torch.save({"step": step, "value": value, "weights": weights}, tmp)
    tmp.replace(ckpt_dir / BEST)


def load_best(ckpt_dir: Path) -> dict | None:
    """``{"step", "value", "weights"}`` of :func:`save_best`, or None if there is none."""
    path = ckpt_dir / BEST
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is said the same way
        raise ConfigError(
            f"the best-validation weights {path} cannot be read ({type(exc).__name__}): "
            "delete the file to test the last weights, or train afresh (train.resume=never)"
        ) from None


def prune(ckpt_dir: Path, keep: int | None) -> None:
    """Remove the checkpoints older than the newest ``keep`` complete ones (None: keep all).
    Only after a new one is complete: the newest complete checkpoint, the one a resume takes,
    is never removed."""
    if keep is None:
        return
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), reverse=True)
    complete = [t for t in tags if (t / MARKER).is_file()][:keep]
    if len(complete) < keep:
        return
    for tag_dir in tags:
        if tag_dir.name < complete[-1].name:
            shutil.rmtree(tag_dir, ignore_errors=True)


def _incomplete(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be resumed from, or None if it can."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return "no completion marker (interrupted while writing)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its completion marker is damaged"
    if not isinstance(files, dict) or not files:
        return "its completion marker lists no files"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when written"
    return _damaged(tag_dir, files)


def _damaged(tag_dir: Path, files: dict) -> str | None:
    """Why a checkpoint's files cannot be read back (torch's files are zip archives with a
    CRC-32 per record: a changed byte anywhere is found here, before anything loads), or
    None."""
    for name in files:
        try:
            with zipfile.ZipFile(tag_dir / name) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"{name} is damaged ({type(exc).__name__})"
        if bad is not None:
            return f"{name} is damaged (record {bad} fails its checksum)"
    return None


def newest_complete(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The newest checkpoint that is complete, and what was skipped on the way and why."""
    skipped = []
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), reverse=True)
    for tag_dir in tags:
        why = _incomplete(tag_dir)
        if why is None:
            return tag_dir.name, skipped
        skipped.append(f"{tag_dir.name}: {why}")
    return None, skipped


def check_pickles(tag_dir: Path) -> None:
    """Refuse a checkpoint whose files name any global beyond tensors, containers and
    DeepSpeed's own plain classes (engine.checkpoint_globals): DeepSpeed loads its files with
    ``torch.load(weights_only=False)``, where such a global could run code. Reads each file's
    pickle, not its tensors."""
    allowed = checkpoint_globals()
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
            raise ConfigError(
                f"checkpoint file {path} cannot be read ({type(exc).__name__}); delete "
                f"{tag_dir} to resume from an earlier checkpoint, or train.resume=never"
            ) from None
        if found - allowed:
            raise ConfigError(
                f"checkpoint file {path} holds pickled objects beyond tensors "
                f"({', '.join(sorted(found - allowed))}), which could run code on loading: "
                "refused. Resume only from checkpoints this pipeline wrote"
            )


def _check_pins(tag_dir: Path, saved: dict, now: dict) -> None:
    """Refuse a checkpoint written with another store content or model shape, naming the keys
    (checkpoints from before pinning carry none and are not checked)."""
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        what = "; ".join(f"{k}: {saved[k]} then, {now[k]} now" for k in differ)
        if "data.store" in differ:
            what = what.replace("data.store:", "data.store (content fingerprint):", 1)
        raise ConfigError(
            f"checkpoint {tag_dir} was written with other values ({what}): resume with the "
            "values it was written with, or start afresh with train.resume=never (the old "
            "checkpoints are moved aside, not deleted)"
        )


def load(engine, ckpt_dir: Path, ctx: Context, zero_stage: int, pins: dict) -> dict | None:
    """Restore the newest complete checkpoint (DeepSpeed's ``latest`` is not trusted: a kill
    while saving can leave it naming a partial one); returns this rank's trainer state (None
    if there is none), with ``skipped``: the newer checkpoints passed over and why. ``pins``:
    the values the checkpoint must have been written with (store fingerprint, model shape)."""
    tag, skipped = newest_complete(ckpt_dir)
    if ctx.is_main:
        for line in skipped:
            print(f"resume: skipped checkpoint {line}")
    if tag is None:
        return None
    own = ckpt_dir / tag / f"trainer_rank{ctx.rank}.pt"
    first = torch.load(ckpt_dir / tag / "trainer_rank0.pt", weights_only=True)
    saved_world = int(first["world_size"])
    if saved_world != ctx.world_size and zero_stage > 0:
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} was written by {saved_world} processes with ZeRO "
            f"stage {zero_stage}, whose optimizer state is partitioned per process: resume "
            f"with {saved_world} processes, or start a new run (train.resume=never)"
        )
    _check_pins(ckpt_dir / tag, first.get("pins", {}), pins)
    check_pickles(ckpt_dir / tag)  # before DeepSpeed's own (unrestricted) torch.load
    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    state = torch.load(own, weights_only=True) if own.is_file() else dict(first)
    if own.is_file() and saved_world == ctx.world_size:
        set_rng_state(state["rng"])
    state["resharded"] = saved_world != ctx.world_size
    state["skipped"] = skipped
    return state
