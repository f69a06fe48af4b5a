"""Wide CSV sources: a header of sensor ids and one row per time step (optionally a first
column of timestamps). Big files are scanned in parallel blocks for line offsets and
timestamps, then read in row ranges, each parsed at C speed as one value per line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.sources.base import (
    PMap,
    Source,
    SourceError,
    axis_from_start,
    check_ids,
    data_path,
    first_bad_cell,
    load_locations,
    parse_times,
    regular_axis,
)

SCAN_BLOCK = 32 << 20  # bytes per scan task
_PREFIX = 256  # bytes read after each line start to find its timestamp


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
            first_bad_cell(frame[names], names, where, r0 + 2)
            vals = frame[names].to_numpy(dtype=np.float32)
        if r1 - r0 == g1 - g0:  # no gap in these rows: no scatter needed
            return vals[:, sensors, None]
        out[self.row_pos[r0:r1] - g0, :, 0] = vals[:, sensors]
        return out


def open_wide_csv(cfg: DataConfig, pmap: PMap) -> WideCsvSource:
    src = cfg.source
    path = data_path(src.path)
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
    ids = check_ids([columns[c] for c in sensor_cols], f"{path} header")
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
        stamps = parse_times([x.decode().strip() for x in [first, *firsts]], str(path), 2)
        time, row_pos, freq = regular_axis(stamps, src.freq, str(path), 2)
    else:
        time, row_pos, freq = axis_from_start(src.start, src.freq, rows, str(path))
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
