"""The Zarr v3 store layout (docs/design.md, section 2): create, publish
atomically, open and validate.

    values         float32 [T, N, F]  chunks (time_chunk, node_chunk, F); NaN where missing
    mask           bool    [T, N, F]  True where observed
    time           int64   [T]        ns since epoch, UTC, regular (attrs.freq)
    coords         float64 [N, 2]     lat/lon degrees or x/y km (attrs.crs)
    sensor_id      str     [N]
    order          int64   [N]        original (source) index of each sensor
    neighbours     int32   [N, k]     k nearest sensors (itself first), store indices
    neighbour_dist float32 [N, k]     km
    mean, std      float32 [N, F]     from the train split only
    attrs          schema_version, freq, splits, features, units, crs, sources (+ sha256),
                   synthetic truth, chunking

Sensors are stored in space-filling-curve order: ``order[j]`` is the source index of store
sensor ``j``. A store is built under a temporary sibling path, validated, marked complete
(``COMPLETE`` file) and then renamed into place; a directory without the marker is never
opened as a finished store. The marker holds the manifest of every file of the store (size
and sha256): opening checks that each exists with its size (a listing: a deleted or
truncated chunk is an error naming it, never NaN read as data), and ``verify_store`` (``python
launch/preprocess.py --verify STORE``) checks every checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import UserError

SCHEMA_VERSION = 1
MARKER = "COMPLETE"
WRITE_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
MAX_ABS = 1e15  # no sensor reads this much: such a value is an error code or a unit mistake
ARRAYS = (
    "values",
    "mask",
    "time",
    "coords",
    "sensor_id",
    "order",
    "neighbours",
    "neighbour_dist",
    "mean",
    "std",
)


# Blosc LZ4 with byte shuffle: GB/s to write and read, and smooth sensor series and masks
# compress well; the big arrays are written once and read every epoch.
FAST_CODEC = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class StoreError(UserError, RuntimeError):
    """A store that is missing, unfinished, of another schema version, or inconsistent."""


def create_arrays(
    path: Path, t: int, n: int, f: int, k: int, time_chunk: int, node_chunk: int
) -> zarr.Group:
    """Create the empty arrays of a store at ``path`` (a temporary path: see atomic_store)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = (min(time_chunk, t), min(node_chunk, n), f)
    root.create_array(
        "values",
        shape=(t, n, f),
        chunks=chunks,
        dtype="float32",
        fill_value=np.nan,
        compressors=FAST_CODEC,
    )
    root.create_array(
        "mask",
        shape=(t, n, f),
        chunks=chunks,
        dtype="bool",
        fill_value=False,
        compressors=FAST_CODEC,
    )
    root.create_array("time", shape=(t,), chunks=(t,), dtype="int64")
    root.create_array("coords", shape=(n, 2), chunks=(n, 2), dtype="float64")
    root.create_array("sensor_id", shape=(n,), chunks=(n,), dtype=str)
    root.create_array("order", shape=(n,), chunks=(n,), dtype="int64")
    root.create_array("neighbours", shape=(n, k), chunks=(min(n, 1 << 18), k), dtype="int32")
    root.create_array("neighbour_dist", shape=(n, k), chunks=(min(n, 1 << 18), k), dtype="float32")
    root.create_array("mean", shape=(n, f), chunks=(n, f), dtype="float32")
    root.create_array("std", shape=(n, f), chunks=(n, f), dtype="float32")
    return root


@dataclass
class Store:
    """An opened, validated store. Arrays are Zarr arrays (read lazily)."""

    path: Path
    root: zarr.Group

    def __getitem__(self, name: str) -> zarr.Array:
        return self.root[name]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.root["values"].shape)

    def split(self, name: str) -> tuple[int, int]:
        """[start, stop) time steps of the split ``train``, ``val`` or ``test``."""
        start, stop = self.attrs["splits"][name]
        return int(start), int(stop)

    def fingerprint(self) -> str:
        """A short hash of the content now at ``path``: its manifest of file checksums (which
        covers the metadata), read again from disk on every call, so a store replaced while a
        run reads it shows a new fingerprint; older stores without a manifest: the metadata."""
        try:
            manifest = _manifest(self.path)
        except OSError:
            return "missing"
        content = manifest if manifest is not None else self.attrs
        return hashlib.sha256(
            json.dumps(content, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]


def validate(root: zarr.Group, where: Path) -> None:
    """Check the layout and its invariants; raise StoreError naming what is wrong."""
    attrs = dict(root.attrs)
    for name in ARRAYS:
        if name not in root:
            raise StoreError(f"store {where}: array {name!r} is missing")
    t, n, f = root["values"].shape
    expect = {
        "mask": (t, n, f),
        "time": (t,),
        "coords": (n, 2),
        "sensor_id": (n,),
        "order": (n,),
        "mean": (n, f),
        "std": (n, f),
    }
    for name, shape in expect.items():
        if tuple(root[name].shape) != shape:
            raise StoreError(f"store {where}: {name} has shape {root[name].shape}, want {shape}")
    time = root["time"][:]
    if t > 1 and not (np.diff(time) > 0).all():
        raise StoreError(f"store {where}: time is not strictly increasing")
    if not np.isfinite(root["coords"][:]).all():
        raise StoreError(f"store {where}: coords hold NaN or inf")
    nb = root["neighbours"][:]
    if nb.min() < 0 or nb.max() >= n or not (nb[:, 0] == np.arange(n)).all():
        raise StoreError(f"store {where}: neighbour index out of range or not self-first")
    if sorted(root["order"][:].tolist()) != list(range(n)):
        raise StoreError(f"store {where}: order is not a permutation of the sensors")
    std = root["std"][:]
    if not (np.isfinite(std).all() and (std > 0).all()):
        raise StoreError(f"store {where}: std must be finite and positive")
    splits = attrs.get("splits", {})
    if set(splits) != {"train", "val", "test"}:
        raise StoreError(f"store {where}: attrs.splits must name train, val and test")


def _files(root: Path) -> dict[str, int]:
    """Size of every file below ``root`` except the marker, by relative POSIX path."""
    out, stack = {}, [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name != MARKER or Path(e.path).parent != root:
                    out[Path(e.path).relative_to(root).as_posix()] = e.stat().st_size
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, list] | None:
    """{relative file: [size, sha256]} recorded at publish (None for older stores)."""
    return json.loads((path / MARKER).read_text()).get("files")


def _check_files(path: Path, manifest: dict[str, list]) -> None:
    """Every file of the manifest is there with its size (a listing, no data read)."""
    present = _files(path)
    for name, (size, _) in manifest.items():
        if name not in present:
            raise StoreError(
                f"store {path}: {name} is missing (the store is damaged); preprocess the data "
                "again (data.overwrite=true)"
            )
        if present[name] != size:
            raise StoreError(
                f"store {path}: {name} has {present[name]} bytes, {size} were written (truncated "
                "or altered); preprocess the data again (data.overwrite=true)"
            )


def verify_store(path: str | Path) -> int:
    """Check every file of a finished store against its recorded sha256; returns the number
    of files checked (raises StoreError naming the first that differs)."""
    store = open_store(path)
    manifest = _manifest(store.path)
    if manifest is None:
        raise StoreError(f"store {store.path} has no manifest (an older store): preprocess again")
    for name, (_, digest) in manifest.items():
        if _sha256(store.path / name) != digest:
            raise StoreError(
                f"store {store.path}: {name} does not match its checksum (altered or "
                "corrupted); preprocess the data again (data.overwrite=true)"
            )
    return len(manifest)


def open_store(path: str | Path) -> Store:
    """Open a finished store, with clear errors for missing / unfinished / other-version /
    damaged (a chunk file missing or of the wrong size) stores."""
    path = Path(path)
    if not path.exists():
        raise StoreError(
            f"store {path} does not exist: run `python launch/preprocess.py --config ...` first"
        )
    if not (path / MARKER).is_file():
        raise StoreError(
            f"store {path} is unfinished (no {MARKER} marker: its preprocessing did not "
            "complete); delete it and run preprocessing again"
        )
    manifest = _manifest(path)
    if manifest is not None:
        _check_files(path, manifest)
    root = zarr.open_group(str(path), mode="r")
    version = root.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema_version {version}, this code reads {SCHEMA_VERSION}: "
            "preprocess the data again with this version"
        )
    validate(root, path)
    return Store(path, root)


def _remove_stale_partials(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by killed processes."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 2)[-2]
        alive = True
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            alive = False
        except PermissionError:
            pass
        if not alive:
            shutil.rmtree(partial, ignore_errors=True)


def check_target(target: Path, overwrite: bool) -> None:
    """``target`` can receive a store: not a symbolic link, not there unless ``overwrite``, and
    its folder exists (created; a refusal there is the caller's one-line error)."""
    if target.is_symlink():  # a store is published by renaming a folder onto its path
        raise StoreError(
            f"store {target} is a symbolic link (to {os.readlink(target)}"
            f"{'' if target.exists() else ', which leads nowhere: a loop or a missing target'}); "
            "give data.store the real path, or remove the link"
        )
    if target.exists() and not overwrite:
        raise StoreError(f"store {target} already exists; set data.overwrite=true to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise StoreError(
            f"store {target}: {exc.filename} is in its path but is not a folder (a file, or a "
            "link that leads nowhere); choose another data.store"
        ) from None


@contextlib.contextmanager
def atomic_store(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to build a store in; on success validate it, mark it complete
    and move it to ``target``. On any error the temporary path is removed and ``target`` is
    left as it was."""
    target = Path(target)
    check_target(target, overwrite)
    _remove_stale_partials(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        validate(zarr.open_group(str(tmp), mode="r"), tmp)
        files = {name: [size, _sha256(tmp / name)] for name, size in _files(tmp).items()}
        marker = {"schema_version": SCHEMA_VERSION, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker))
        old = None
        if overwrite and target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)  # fails if another process published ``target`` meanwhile
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise StoreError(
                f"store {target} was published by another process while this one was writing "
                "it; it was left as that process wrote it (set data.overwrite=true to replace it)"
            ) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:  # a full disk, a quota, a refused folder: said, nothing published
        if exc.errno not in WRITE_REFUSED:
            raise
        free = shutil.disk_usage(target.parent).free / 2**20
        raise StoreError(
            f"store {target} could not be written ({exc.strerror}); {free:.1f} MB free there, "
            "nothing was published: free space, or give data.store a path on a disk with room "
            "that this user may write"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
