"""Raw sensor data sources: validation, the regular time axis, and block reads.

Every source answers the same questions: which sensors (ids, positions), which regular time
axis, which features, and ``read(g0, g1, sensors)``: values [g1 - g0, n, F] float32 (NaN where
missing) for time steps [g0, g1) of the axis at the given source sensor indices. ``read`` runs
on Dask workers (see pipeline/preprocess.py), so sources hold only paths and small index
arrays. Scans over big files go through the ``pmap`` callable that preprocessing passes in (a
Dask map), so this module needs no cluster of its own.

Every problem in the input is a :class:`SourceError` that names the file, the line or row, the
sensor or the config key, and what to do.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.errors import UserError
from pipeline.synthetic import SyntheticField

PMap = Callable[[Callable, Sequence], list]
SCAN_BLOCK = 32 << 20  # bytes per wide-CSV scan task
_PREFIX = 256  # bytes read after each line start to find its timestamp


class SourceError(UserError, ValueError):
    """Bad input, described for the person who has to fix it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Source:
    """What preprocessing needs from any input (subclasses implement ``read``)."""

    sensor_ids: np.ndarray  # [N] str, source order
    coords: np.ndarray  # [N, 2]
    crs: str  # "latlon" or "xy"
    time: np.ndarray  # [T] int64 ns UTC, regular
    freq: str
    features: list[str]
    files: list[Path] = field(default_factory=list)
    truth: dict[str, Any] | None = None
    node_subsets: bool = True  # read() of a subset of sensors costs less than of all

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Locations and the time axis


def _check_ids(ids: Sequence[str], where: str) -> np.ndarray:
    ids = np.asarray([str(s).strip() for s in ids], dtype=object)
    seen, dup = set(), []
    for s in ids:
        if s in seen:
            dup.append(s)
        seen.add(s)
    if dup:
        raise SourceError(
            f"{where}: duplicate sensor ids {sorted(set(dup))[:10]}; ids must be unique"
        )
    empty = [i for i, s in enumerate(ids) if s == ""]
    if empty:
        raise SourceError(f"{where}: empty sensor id at column/row {empty[0]}")
    return ids


def load_locations(path: str | None, header: bool, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Coordinates [N, 2] in the order of ``ids`` and their crs, from a locations CSV."""
    if path is None:
        raise SourceError("data.source.locations is not set: give a CSV of sensor positions")
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"locations file {p} does not exist (data.source.locations)")
    if p.stat().st_size == 0:
        raise SourceError(f"locations file {p} is empty")
    if header:
        df = pd.read_csv(p, dtype=str)
        cols = {c.strip().lower(): c for c in df.columns}
        id_col = cols.get("sensor_id") or cols.get("id")
        pairs = [("latitude", "longitude"), ("lat", "lon"), ("lat", "lng"), ("x", "y")]
        pair = next(((a, b) for a, b in pairs if a in cols and b in cols), None)
        if id_col is None or pair is None:
            raise SourceError(
                f"locations file {p}: need a sensor_id column and latitude/longitude (or x/y "
                f"in km) columns; found {list(df.columns)} (headerless? set "
                "data.source.locations_header=false)"
            )
        crs = "xy" if pair == ("x", "y") else "latlon"
        frame = pd.DataFrame({"id": df[id_col], "a": df[cols[pair[0]]], "b": df[cols[pair[1]]]})
        first_row = 2
    else:
        frame = pd.read_csv(p, header=None, dtype=str).iloc[:, :3]
        frame.columns = ["id", "a", "b"]
        crs, first_row = "latlon", 1
    loc_ids = _check_ids(frame["id"].tolist(), f"locations file {p}")
    vals = frame[["a", "b"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(vals).all(axis=1)
    if crs == "latlon":
        bad |= (np.abs(vals[:, 0]) > 90) | (np.abs(vals[:, 1]) > 180)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SourceError(
            f"locations file {p}, line {i + first_row}: sensor {loc_ids[i]!r} has invalid "
            f"coordinates {frame.iloc[i, 1]!r}, {frame.iloc[i, 2]!r} (latitude must be in "
            "[-90, 90], longitude in [-180, 180], no NaN)"
        )
    index = {s: i for i, s in enumerate(loc_ids)}
    missing = [s for s in ids if s not in index]
    if missing:
        raise SourceError(
            f"locations file {p}: no location for sensors {missing[:10]} found in the data; "
            "add them to the locations file or drop them from the data"
        )
    extra = sorted(set(index) - set(ids))
    if extra:
        raise SourceError(
            f"locations file {p}: sensors {extra[:10]} have a location but no data; "
            "remove them from the locations file"
        )
    return vals[[index[s] for s in ids]], crs


def regular_axis(
    stamps: pd.DatetimeIndex, freq: str | None, where: str, first_line: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Regular time axis [T] ns and each row's position on it, from row timestamps.

    Duplicate or decreasing timestamps, and timestamps off the ``freq`` grid, are errors naming
    the line (``first_line`` is the line number of row 0).
    """
    t = stamps.as_unit("ns").asi8
    if len(t) > 1:
        d = np.diff(t)
        if (d == 0).any():
            i = int(np.flatnonzero(d == 0)[0])
            raise SourceError(
                f"{where}: duplicate timestamp {stamps[i]} on lines {i + first_line} and "
                f"{i + 1 + first_line}; keep one row per time step"
            )
        if (d < 0).any():
            i = int(np.flatnonzero(d < 0)[0]) + 1
            raise SourceError(
                f"{where}, line {i + first_line}: timestamp {stamps[i]} is earlier than the "
                f"row before ({stamps[i - 1]}); sort the rows by time"
            )
    if freq is None:
        if len(t) < 2:
            raise SourceError(
                f"{where}: cannot infer the time step from one row; set data.source.freq"
            )
        step = int(pd.Series(np.diff(t)).mode().iloc[0])
        freq = pd.tseries.frequencies.to_offset(pd.Timedelta(step, "ns")).freqstr
    else:
        step = int(pd.Timedelta(pd.tseries.frequencies.to_offset(freq)).value)
    offset = t - t[0]
    off_grid = offset % step != 0
    if off_grid.any():
        i = int(np.flatnonzero(off_grid)[0])
        raise SourceError(
            f"{where}, line {i + first_line}: timestamp {stamps[i]} is not on the {freq} grid "
            f"starting at {stamps[0]}; fix data.source.freq or the timestamp"
        )
    pos = offset // step
    return t[0] + np.arange(pos[-1] + 1, dtype=np.int64) * step, pos, freq


def _parse_times(values: Sequence[str], where: str, first_line: int) -> pd.DatetimeIndex:
    try:
        return pd.DatetimeIndex(pd.to_datetime(pd.Series(values), utc=True)).as_unit("ns")
    except (ValueError, TypeError):
        for i, v in enumerate(values):
            try:
                pd.Timestamp(v)
            except (ValueError, TypeError):
                raise SourceError(
                    f"{where}, line {i + first_line}: {v!r} is not a timestamp"
                ) from None
        raise


def _axis_from_start(start: str | None, freq: str | None, rows: int, where: str):
    if start is None or freq is None:
        raise SourceError(
            f"{where} has no time column: set data.source.start and data.source.freq "
            "(or data.source.time_column if a column holds the timestamps)"
        )
    time = pd.date_range(pd.Timestamp(start, tz="UTC"), periods=rows, freq=freq).as_unit("ns").asi8
    return time, np.arange(rows), freq


def _first_bad_cell(frame: pd.DataFrame, columns: Sequence[str], where: str, first_line: int):
    for j, col in enumerate(frame.columns):
        if not pd.api.types.is_numeric_dtype(frame[col]):
            num = pd.to_numeric(frame[col], errors="coerce")
            bad = num.isna() & frame[col].notna() & (frame[col].astype(str).str.strip() != "")
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise SourceError(
                    f"{where}, line {i + first_line}, sensor {columns[j]!r}: "
                    f"{frame[col].iloc[i]!r} is not a number; fix the cell or leave it empty"
                )


# --------------------------------------------------------------------------------------------
# Wide CSV: one column per sensor


def _scan_block(path: str, offset: int, size: int, filesize: int) -> tuple[np.ndarray, list[bytes]]:
    """Line starts in [offset, offset + size) and the first field of each such line."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size + _PREFIX)
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf[:size] == 10)
    starts = offset + nl + 1
    starts = starts[starts < filesize]
    firsts = [data[s - offset : s - offset + _PREFIX].split(b",", 1)[0] for s in starts]
    return starts, firsts


def _parse_numbers(lines: list[bytes], drop_first: bool) -> np.ndarray | None:
    """Cells of CSV lines of plain numbers (empty = NaN), flattened, as float32 at C speed
    (one value per line through pandas' C parser); None if some cell is not a number."""
    cells = [line.split(b",", 1)[1] for line in lines] if drop_first else lines
    body = b"\n".join(cells).replace(b",", b"\n") + b"\n0"  # "0": keeps a last empty cell
    try:
        values = pd.read_csv(
            io.BytesIO(body),
            header=None,
            names=["v"],
            dtype=np.float32,
            skip_blank_lines=False,
            engine="c",
        ).to_numpy()[:-1, 0]
    except ValueError:
        return None
    return values


@dataclass
class WideCsvSource(Source):
    path: Path = Path()
    columns: list[str] = field(default_factory=list)  # all header fields
    sensor_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    line_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [rows + 1]
    row_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [rows]

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        out = np.full((g1 - g0, len(sensors), 1), np.nan, dtype=np.float32)
        r0, r1 = np.searchsorted(self.row_pos, [g0, g1])
        if r1 <= r0:
            return out
        a, b = int(self.line_starts[r0]), int(self.line_starts[r1])
        with open(self.path, "rb") as fh:
            fh.seek(a)
            data = fh.read(b - a)
        where = f"{self.path}"
        lines = [line.rstrip(b"\r") for line in data.rstrip(b"\r\n").split(b"\n")]
        commas = np.array([line.count(b",") for line in lines])
        wrong = np.flatnonzero(commas != len(self.columns) - 1)
        if len(wrong) or len(lines) != r1 - r0:
            i = int(wrong[0]) if len(wrong) else len(lines)
            found = commas[i] + 1 if i < len(lines) else 0
            raise SourceError(
                f"{where}, line {r0 + i + 2}: {found} fields, the header has "
                f"{len(self.columns)}; fix the ragged row"
            )
        drop = bool(self.sensor_cols[0] > 0)
        flat = _parse_numbers(lines, drop)
        if flat is not None and flat.size == len(lines) * len(self.sensor_cols):
            vals = flat.reshape(len(lines), len(self.sensor_cols))
        else:  # a cell is not a plain number: find it (the slow path, errors only)
            frame = pd.read_csv(
                io.BytesIO(data),
                header=None,
                names=self.columns,
                usecols=list(self.sensor_cols),
                skip_blank_lines=False,
            )
            names = [self.columns[c] for c in self.sensor_cols]
            _first_bad_cell(frame[names], names, where, r0 + 2)
            vals = frame[names].to_numpy(dtype=np.float32)
        if r1 - r0 == g1 - g0:  # no gap in these rows: no scatter needed
            return vals[:, sensors, None]
        out[self.row_pos[r0:r1] - g0, :, 0] = vals[:, sensors]
        return out


def open_wide_csv(cfg: DataConfig, pmap: PMap) -> WideCsvSource:
    src = cfg.source
    path = _data_path(src.path)
    filesize = path.stat().st_size
    if filesize == 0:
        raise SourceError(f"{path} is empty: expected a header of sensor ids and data rows")
    with open(path, "rb") as fh:
        header_line = fh.readline()
        fh.seek(max(0, filesize - 64))
        tail = fh.read()
    filesize -= len(tail) - len(tail.rstrip(b"\r\n"))  # trailing blank lines are not rows
    columns = [c.strip() for c in header_line.decode().rstrip("\r\n").split(",")]
    if src.time_column is not None:
        if src.time_column not in columns:
            raise SourceError(
                f"{path}: time column {src.time_column!r} (data.source.time_column) is not in "
                f"the header; the header starts {columns[:5]}"
            )
        if columns[0] != src.time_column:
            raise SourceError(
                f"{path}: the time column {src.time_column!r} must be the first column"
            )
    sensor_cols = np.arange(1 if src.time_column else 0, len(columns))
    ids = _check_ids([columns[c] for c in sensor_cols], f"{path} header")
    body = len(header_line)
    blocks = [
        (str(path), o, min(SCAN_BLOCK, filesize - o), filesize)
        for o in range(body, filesize, SCAN_BLOCK)
    ]
    scans = pmap(lambda args: _scan_block(*args), blocks)
    starts = np.concatenate([[body]] + [s for s, _ in scans]).astype(np.int64)
    starts = starts[starts < filesize]
    firsts = [f for _, fs in scans for f in fs]
    rows = len(starts)
    if rows == 0:
        raise SourceError(f"{path} has a header but no data rows")
    line_starts = np.append(starts, filesize)
    if src.time_column:
        with open(path, "rb") as fh:
            fh.seek(body)
            first = fh.read(_PREFIX).split(b",", 1)[0]
        stamps = _parse_times([x.decode().strip() for x in [first, *firsts]], str(path), 2)
        time, row_pos, freq = regular_axis(stamps, src.freq, str(path), 2)
    else:
        time, row_pos, freq = _axis_from_start(src.start, src.freq, rows, str(path))
    coords, crs = load_locations(src.locations, src.locations_header, ids)
    return WideCsvSource(
        sensor_ids=ids,
        coords=coords,
        crs=crs,
        time=time,
        freq=freq,
        features=["value"],
        files=[path, Path(src.locations)],
        node_subsets=False,
        path=path,
        columns=columns,
        sensor_cols=sensor_cols,
        line_starts=line_starts,
        row_pos=row_pos,
    )


# --------------------------------------------------------------------------------------------
# Long CSV / Parquet: rows of (sensor_id, time, value[, more features]); loaded in memory


@dataclass
class ArraySource(Source):
    """Values already pivoted to [T, N, F] in memory (long formats)."""

    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        return self.values[g0:g1][:, sensors]


def open_long(cfg: DataConfig, pmap: PMap) -> ArraySource:
    src = cfg.source
    path = _data_path(src.path)
    if path.stat().st_size == 0:
        raise SourceError(f"{path} is empty: expected rows of sensor_id, time, value")
    time_col = src.time_column or "time"
    if src.kind == "parquet":
        frame = pd.read_parquet(path)
        first_line, unit = 0, "row"
    else:
        frame = pd.read_csv(path, dtype={src.sensor_column: str})
        first_line, unit = 2, "line"
    need = [src.sensor_column, time_col, *src.value_columns]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: columns {missing} are missing; found {list(frame.columns)}")
    if len(frame) == 0:
        raise SourceError(f"{path} has a header but no data rows")
    where = f"{path}"
    values = frame[src.value_columns]
    for col in src.value_columns:
        if not pd.api.types.is_numeric_dtype(values[col]):
            num = pd.to_numeric(values[col], errors="coerce")
            bad = num.isna() & values[col].notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise SourceError(
                    f"{where}, {unit} {i + first_line}, column {col!r}: {values[col].iloc[i]!r} "
                    "is not a number"
                )
            values = values.assign(**{col: num})
    stamps = _parse_times(frame[time_col].astype(str).tolist(), where, first_line)
    sensor = frame[src.sensor_column].astype(str).str.strip().to_numpy()
    dup = (
        pd.DataFrame({"s": sensor, "t": stamps.as_unit("ns").asi8})
        .duplicated(keep=False)
        .to_numpy()
    )
    if dup.any():
        i = np.flatnonzero(dup)[:2]
        raise SourceError(
            f"{where}: sensor {sensor[i[0]]!r} has two rows for {stamps[i[0]]} ({unit}s "
            f"{i[0] + first_line} and {i[1] + first_line}); keep one"
        )
    uniq = pd.DatetimeIndex(
        np.unique(stamps.as_unit("ns").asi8).astype("datetime64[ns]")
    ).tz_localize("UTC")
    time, _, freq = regular_axis(uniq, src.freq, where, first_line)
    ids = _check_ids(list(dict.fromkeys(sensor)), where)
    step = (time[1] - time[0]) if len(time) > 1 else 1
    ti = (stamps.as_unit("ns").asi8 - time[0]) // step
    ni = pd.Index(ids).get_indexer(sensor)
    out = np.full((len(time), len(ids), len(src.value_columns)), np.nan, dtype=np.float32)
    out[ti, ni] = values.to_numpy(np.float32)
    coords, crs = load_locations(src.locations, src.locations_header, ids)
    return ArraySource(
        sensor_ids=ids,
        coords=coords,
        crs=crs,
        time=time,
        freq=freq,
        features=list(src.value_columns),
        files=[path, Path(src.locations)],
        values=out,
    )


# --------------------------------------------------------------------------------------------
# HDF5 in the METR-LA / PEMS-BAY pandas layout (fixed format: axis0 ids, axis1 times)


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
    path = _data_path(src.path)
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
        ids = _check_ids(
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
    coords, crs = load_locations(src.locations, src.locations_header, ids)
    return Hdf5Source(
        sensor_ids=ids,
        coords=coords,
        crs=crs,
        time=time,
        freq=freq,
        features=["value"],
        files=[path, Path(src.locations)],
        node_subsets=False,
        path=path,
        key=src.hdf5_key,
        row_pos=row_pos,
    )


# --------------------------------------------------------------------------------------------
# Synthetic


@dataclass
class SyntheticSource(Source):
    field_: SyntheticField | None = None

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        return self.field_.values(g0, g1, sensors)[..., None]


def open_synthetic(cfg: DataConfig, pmap: PMap) -> SyntheticSource:
    syn = cfg.synthetic
    fld = SyntheticField(syn)
    n = syn.num_sensors
    time = pd.date_range(pd.Timestamp(syn.start, tz="UTC"), periods=syn.num_steps, freq=syn.freq)
    width = max(1, math.ceil(math.log10(n)))
    return SyntheticSource(
        sensor_ids=np.asarray([f"s{i:0{width}d}" for i in range(n)], dtype=object),
        coords=fld.coords(np.arange(n)),
        crs="xy",
        time=time.as_unit("ns").asi8,
        freq=syn.freq,
        features=["value"],
        truth=fld.truth(),
        field_=fld,
    )


def _data_path(path: str | None) -> Path:
    if path is None:
        raise SourceError("data.source.path is not set: name the data file")
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"data file {p} does not exist (data.source.path)")
    return p


OPENERS: dict[str, Callable[[DataConfig, PMap], Source]] = {
    "synthetic": open_synthetic,
    "wide_csv": open_wide_csv,
    "long_csv": open_long,
    "parquet": open_long,
    "hdf5": open_hdf5,
}


def open_source(cfg: DataConfig, pmap: PMap = lambda f, xs: list(map(f, xs))) -> Source:
    """Open and validate the source of ``cfg.source.kind``."""
    if cfg.source.kind not in OPENERS:
        raise SourceError(
            f"data.source.kind = {cfg.source.kind!r} is unknown; one of {sorted(OPENERS)}"
        )
    return OPENERS[cfg.source.kind](cfg, pmap)
