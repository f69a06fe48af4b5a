"""What every raw source shares: the Source interface, input errors, sensor ids and locations,
and the regular time axis (pipeline/sources.py and pipeline/wide_csv.py build on it).

Every problem in the input is a :class:`SourceError` that names the file, the line or row, the
sensor or the config key, and what to do.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

PMap = Callable[[Callable, Sequence], list]


class SourceError(UserError, ValueError):
    """Bad input, described for the person who has to fix it."""


def sha256(path: Path) -> str:
    """SHA-256 of a file; of a directory (a Zarr store), over its files' relative paths and
    contents in sorted order."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f != path:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
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

    def close(self) -> None:
        """Remove what opening the source wrote (preprocessing calls it, also on failure)."""


# --------------------------------------------------------------------------------------------
# Locations and the time axis


def check_ids(ids: Sequence[str], where: str) -> np.ndarray:
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


def first_invalid_position(vals: np.ndarray, crs: str) -> int | None:
    """Index of the first row of ``vals`` [N, 2] that is NaN, or off the globe for latlon."""
    bad = ~np.isfinite(vals).all(axis=1)
    if crs == "latlon":
        bad |= (np.abs(vals[:, 0]) > 90) | (np.abs(vals[:, 1]) > 180)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


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
    loc_ids = check_ids(frame["id"].tolist(), f"locations file {p}")
    vals = frame[["a", "b"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    i = first_invalid_position(vals, crs)
    if i is not None:
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
    coords = vals[[index[s] for s in ids]]
    if len(coords) > 1 and (coords == coords[0]).all():
        raise SourceError(
            f"locations file {p}: all {len(coords)} sensors are at one point "
            f"({coords[0, 0]}, {coords[0, 1]}): distances between them would all be 0; give "
            "each sensor its own position"
        )
    return coords, crs


MIN_FILLED = 0.5  # rows per step of the regular axis below which the timestamps are suspect


def regular_axis(
    stamps: pd.DatetimeIndex, freq: str | None, where: str, first_line: int, unit: str = "line"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Regular time axis [T] ns and each row's position on it, from row timestamps.

    Duplicate or decreasing timestamps, and timestamps off the ``freq`` grid, are errors naming
    the row as ``{unit} {number}`` (``first_line`` is the number of row 0).
    """
    t = stamps.as_unit("ns").asi8
    if len(t) > 1:
        d = np.diff(t)
        if (d == 0).any():
            i = int(np.flatnonzero(d == 0)[0])
            raise SourceError(
                f"{where}: duplicate timestamp {stamps[i]} on {unit}s {i + first_line} and "
                f"{i + 1 + first_line}; keep one row per time step"
            )
        if (d < 0).any():
            i = int(np.flatnonzero(d < 0)[0]) + 1
            raise SourceError(
                f"{where}, {unit} {i + first_line}: timestamp {stamps[i]} is earlier than the "
                f"row before ({stamps[i - 1]}); sort the rows by time ({TIME_HINT})"
            )
    if freq is None:
        if len(t) < 2:
            raise SourceError(
                f"{where}: cannot infer the time step from one row; set data.source.freq"
            )
        step = int(pd.Series(np.diff(t)).mode().iloc[0])
        freq = pd.tseries.frequencies.to_offset(pd.Timedelta(step, "ns")).freqstr
        if step >= CALENDAR_NS:  # months and years vary in length: the coarsest calendar
            fits = [  # step whose grid holds every timestamp, if any does
                (len(grid), name)
                for name in CALENDAR_STEPS
                if (grid := pd.date_range(stamps[0], stamps[-1], freq=name)).isin(stamps).sum()
                == len(stamps)
            ]
            freq = min(fits)[1] if fits else freq
    grid_step = pd.tseries.frequencies.to_offset(freq)
    try:
        step = int(pd.Timedelta(grid_step).value)  # a fixed step (h, D, 15min, 7D)
    except ValueError:  # a calendar step (MS, QS, YS, W-SUN): its grid is a date range
        return _calendar_axis(stamps, grid_step, freq, where, first_line, unit)
    offset = t - t[0]
    off_grid = offset % step != 0
    if off_grid.any():
        i = int(np.flatnonzero(off_grid)[0])
        raise SourceError(
            f"{where}, {unit} {i + first_line}: timestamp {stamps[i]} is not on the {freq} grid "
            f"starting at {stamps[0]}; fix data.source.freq or the timestamp"
        )
    pos = offset // step
    steps = int(pos[-1]) + 1
    _check_filled(stamps, steps, freq, where, unit)
    _note_clock_change_gaps(t[0], step, pos, where)
    return t[0] + np.arange(steps, dtype=np.int64) * step, pos, freq


HOUR_NS = 3_600 * 10**9
DST_MONTHS = (3, 4, 9, 10, 11)  # when daylight saving starts or ends, north or south


def _note_clock_change_gaps(t0: int, step: int, pos: np.ndarray, where: str) -> None:
    """Timestamps are read as UTC when they carry no offset. Local times with daylight saving
    skip an hour when clocks go forward: that hour would be left missing without a word. Say
    so for each gap of exactly one hour on a Sunday of a month when clocks change."""
    if step > HOUR_NS or HOUR_NS % step:
        return
    jumps = np.flatnonzero(np.diff(pos) == HOUR_NS // step + 1)  # one hour of steps absent
    gaps = pd.DatetimeIndex(t0 + (pos[jumps] + 1) * step, tz="UTC")
    gaps = gaps[(gaps.dayofweek == 6) & gaps.month.isin(DST_MONTHS)]
    if len(gaps):
        more = f" (and {len(gaps) - 1} more such hours)" if len(gaps) > 1 else ""
        print(
            f"note: {where}: no row for the hour from {gaps[0]:%Y-%m-%d %H:%M} UTC, a Sunday"
            f"{more}. Timestamps without an offset are read as UTC; if these are local times "
            "with daylight saving, that is the hour clocks skip in spring, and it stays "
            "missing: give the times with their offset (2024-03-31T03:00+02:00) or in UTC"
        )


CALENDAR_NS = 28 * 86_400 * 10**9  # an inferred step this long may be a calendar one (months)
CALENDAR_STEPS = ("MS", "ME", "QS", "QE", "YS", "YE")  # tried when inferring such a step


def _calendar_axis(stamps, offset, freq: str, where: str, first_line: int, unit: str):
    """:func:`regular_axis` for calendar steps: the grid from the first timestamp on."""
    grid = pd.date_range(stamps[0], stamps[-1], freq=offset)
    pos = grid.get_indexer(stamps)
    if (pos < 0).any():
        i = int(np.flatnonzero(pos < 0)[0])
        raise SourceError(
            f"{where}, {unit} {i + first_line}: timestamp {stamps[i]} is not on the {freq} grid "
            f"starting at {stamps[0]}; fix data.source.freq or the timestamp"
        )
    _check_filled(stamps, len(grid), freq, where, unit)
    return grid.as_unit("ns").asi8, pos.astype(np.int64), freq


def _check_filled(stamps, steps: int, freq: str, where: str, unit: str) -> None:
    """A misread date spreads the rows over a long axis: refuse an axis mostly empty."""
    t = stamps
    if len(t) < MIN_FILLED * steps:  # a misread date spreads the rows over a long axis
        raise SourceError(
            f"{where}: the {len(t)} {unit}s fill only {len(t) / steps:.1%} of the {steps} "
            f"{freq} steps from {stamps[0]} to {stamps[-1]}: the timestamps look misread "
            f"({TIME_HINT}) or data.source.freq is wrong; a file that really is mostly gaps "
            "should be cut into its observed periods"
        )


TIME_HINT = (
    "if the dates are day first (31/01/2024), set data.source.dayfirst: true or "
    "data.source.time_format (e.g. '%d/%m/%Y %H:%M')"
)


def to_utc(values, time_format: str | None = None, dayfirst: bool = False) -> pd.DatetimeIndex:
    """Timestamps (strings) as a UTC DatetimeIndex [ns], by ``data.source.time_format`` or
    ``dayfirst`` (naive times are taken as UTC)."""
    parsed = pd.to_datetime(pd.Series(values), utc=True, format=time_format, dayfirst=dayfirst)
    return pd.DatetimeIndex(parsed).as_unit("ns")


def parse_times(
    values: Sequence[str],
    where: str,
    first_line: int,
    time_format: str | None = None,
    dayfirst: bool = False,
) -> pd.DatetimeIndex:
    try:
        return to_utc(values, time_format, dayfirst)
    except (ValueError, TypeError):
        for i, v in enumerate(values):
            try:
                to_utc([v], time_format, dayfirst)
            except (ValueError, TypeError):
                how = f"in the format {time_format!r}" if time_format else "a timestamp"
                raise SourceError(
                    f"{where}, line {i + first_line}: {v!r} is not {how}; set "
                    "data.source.time_format to the file's format"
                ) from None
        raise SourceError(  # each parses alone, not together: formats differ between rows
            f"{where}: the timestamps do not read in one format (first: {values[0]!r}); "
            f"set data.source.time_format ({TIME_HINT})"
        ) from None


def axis_from_start(start: str | None, freq: str | None, rows: int, where: str):
    if start is None or freq is None:
        raise SourceError(
            f"{where} has no time column: set data.source.start and data.source.freq "
            "(or data.source.time_column if a column holds the timestamps)"
        )
    try:
        time = pd.date_range(pd.Timestamp(start, tz="UTC"), periods=rows, freq=freq)
    except ValueError as exc:
        raise SourceError(
            f"{where}: data.source.start {start!r} / data.source.freq {freq!r}: {exc}"
        ) from None
    time = time.as_unit("ns").asi8
    return time, np.arange(rows), freq


def first_bad_cell(frame: pd.DataFrame, columns: Sequence[str], where: str, first_line: int):
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


def located(
    src, path: Path, ids: np.ndarray, time: np.ndarray, freq: str, features: Sequence[str]
) -> dict[str, Any]:
    """The fields of the ``Source`` record that every file format fills the same way: ids,
    positions from the locations file (``src``: ``data.source``), the time axis, features and
    the files whose checksums the store records."""
    coords, crs = load_locations(src.locations, src.locations_header, ids)
    return {
        "sensor_ids": ids,
        "coords": coords,
        "crs": crs,
        "time": time,
        "freq": freq,
        "features": list(features),
        "files": [path, Path(src.locations)],
    }


def header_fields(
    raw: bytes, path: Path, encoding: str = "utf-8", delimiter: str = ","
) -> list[str]:
    """The column names of a CSV header line (quoted fields, a byte-order mark)."""
    try:
        text = raw.decode(encoding).lstrip("\ufeff")  # a byte-order mark is not an id
    except UnicodeDecodeError:
        raise SourceError(
            f"{path}, line 1: the header is not {encoding}; set data.source.encoding"
        ) from None
    (cells,) = list(csv.reader([text.rstrip("\r\n")], delimiter=delimiter)) or [[]]
    return [c.strip() for c in cells]


def data_path(path: str | None) -> Path:
    if path is None:
        raise SourceError("data.source.path is not set: name the data file")
    p = Path(path)
    if p.is_dir():
        raise SourceError(f"data file {p} is a directory (data.source.path): name a file in it")
    if not p.is_file():
        raise SourceError(f"data file {p} does not exist (data.source.path)")
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise SourceError(f"data file {p} cannot be read ({exc.strerror})") from None
    kind = next((name for magic, name in COMPRESSED if head.startswith(magic)), None)
    if kind is not None:
        raise SourceError(
            f"data file {p} is {kind}-compressed: decompress it first and point "
            "data.source.path at the plain file"
        )
    return p


COMPRESSED = (  # magic bytes of archives that a data file must not be
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
