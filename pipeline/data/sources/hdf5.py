"""HDF5 in the METR-LA / PEMS-BAY pandas layout (fixed format: axis0 ids, axis1 times)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.sources.base import (
    PMap,
    Source,
    SourceError,
    check_ids,
    data_path,
    located,
    regular_axis,
)


@dataclass
class Hdf5Source(Source):
    path: Path = Path()
    key: str = "df"
    row_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        import h5py

        out = np.full((g1 - g0, len(sensors), 1), np.nan, dtype=np.float32)
        r0, r1 = np.searchsorted(self.row_pos, [g0, g1])
        with h5py.File(self.path, "r") as fh:
            block = fh[self.key]["block0_values"][r0:r1]  # [rows, N]
        out[self.row_pos[r0:r1] - g0, :, 0] = block[:, sensors]
        return out


def open_hdf5(cfg: DataConfig, pmap: PMap) -> Hdf5Source:
    import h5py

    src = cfg.source
    path = data_path(src.path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SourceError(f"{path} is not a readable HDF5 file ({exc})") from None
    with fh:
        if src.hdf5_key not in fh or "block0_values" not in fh[src.hdf5_key]:
            raise SourceError(
                f"{path}: no pandas frame under key {src.hdf5_key!r} (data.source.hdf5_key) "
                "in the fixed layout (axis0, axis1, block0_values)"
            )
        group = fh[src.hdf5_key]
        if "block1_values" in group:
            raise SourceError(
                f"{path}: frame {src.hdf5_key!r} has several dtype blocks; store one float block"
            )
        ids = check_ids(
            [x.decode() if isinstance(x, bytes) else str(x) for x in group["axis0"][:]], str(path)
        )
        raw_t = group["axis1"][:]
        kind = group["axis1"].attrs.get("kind", b"datetime64")  # pandas >= 3 records the unit
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        raw_t = raw_t.astype(kind if "[" in kind else "datetime64[ns]")
        rows = len(raw_t)
    if rows == 0:
        raise SourceError(f"{path} has no rows")
    stamps = pd.DatetimeIndex(pd.to_datetime(raw_t, utc=True)).as_unit("ns")
    time, row_pos, freq = regular_axis(stamps, src.freq, str(path), 0)
    return Hdf5Source(
        **located(src, path, ids, time, freq, ["value"]),
        node_subsets=False,
        path=path,
        key=src.hdf5_key,
        row_pos=row_pos,
    )
