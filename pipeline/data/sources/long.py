"""Long CSV / Parquet: rows of (sensor_id, time, value[, more features]), the commonest raw
layout of sensor data, streamed in partitions so that a file larger than memory preprocesses
with memory flat in its size.

Partitions are byte ranges of a CSV (cut at line ends) or groups of Parquet row groups, read
with pyarrow on the Dask workers (through ``pmap``):

1. survey: each partition's sensor ids and distinct timestamps (the driver unites them into
   the sensor list and the regular time axis);
2. spill: each partition is pivoted to (time index, sensor index, row, values) and written as
   one piece per store time chunk, under a folder beside the store;
3. ``read(g0, g1)`` gathers the pieces of the time chunks it covers into [time, sensor,
   feature]; a sensor with two rows for one time step is an error naming both rows.

The spill folder is removed by ``close()`` (preprocessing calls it, also on failure).
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.sources.base import (
    PMap,
    Source,
    SourceError,
    check_ids,
    data_path,
    header_fields,
    located,
    regular_axis,
    to_utc,
)


@dataclass(frozen=True)
class Part:
    """One partition: a CSV byte range [start, stop) or Parquet row groups."""

    index: int
    start: int = 0
    stop: int = 0
    row_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reader:
    """Reads partitions of one long file (pickled to the workers)."""

    path: Path
    kind: str  # long_csv | parquet
    header: tuple[str, ...]  # CSV column names
    sensor: str
    time: str
    values: tuple[str, ...]
    time_format: str | None = None
    dayfirst: bool = False

    def unit(self) -> tuple[str, int]:
        """How rows are counted in messages, and the number of the first data row."""
        return ("line", 2) if self.kind == "long_csv" else ("row", 0)

    def table(self, part: Part, columns: list[str]) -> pa.Table:
        if self.kind == "parquet":
            return pq.ParquetFile(self.path).read_row_groups(list(part.row_groups), columns)
        with open(self.path, "rb") as fh:
            fh.seek(part.start)
            data = fh.read(part.stop - part.start)
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                column_names=list(self.header), use_threads=False, block_size=len(data) + 1
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={self.sensor: pa.string(), self.time: pa.string()},
                strings_can_be_null=False,
            ),
        )

    def sensors(self, table: pa.Table) -> pa.ChunkedArray:
        """The sensor column as stripped strings [rows] (Arrow: no Python string per row)."""
        return pc.utf8_trim_whitespace(table[self.sensor].cast(pa.string()))

    def survey(self, part: Part) -> tuple[int, np.ndarray, np.ndarray, bool]:
        """Rows, sensor ids in order of appearance, distinct timestamps (ns), and whether a
        timestamp failed to parse."""
        t = self.table(part, [self.sensor, self.time])
        try:
            stamps = np.unique(_stamps(t[self.time], self.time_format, self.dayfirst))
        except SourceError:
            return t.num_rows, np.zeros(0, object), np.zeros(0, np.int64), True
        ids = pc.unique(self.sensors(t)).to_numpy(zero_copy_only=False)  # first appearance
        return t.num_rows, ids, stamps, False

    def spill(
        self,
        part: Part,
        first_row: int,
        ids: np.ndarray,
        axis: tuple[np.ndarray, int],
        out: Path,
    ) -> str | None:
        """Pivot the partition into one piece per time chunk; returns an error or None."""
        unit, first = self.unit()
        t = self.table(part, [self.sensor, self.time, *self.values])
        values = np.empty((t.num_rows, len(self.values)), np.float32)
        for j, col in enumerate(self.values):
            column = t[col]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = pc.utf8_trim_whitespace(column)  # " 1.5" reads as 1.5, " " as missing
                column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
            try:
                values[:, j] = column.cast(pa.float32()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                cells = column.to_pylist()
                for i, cell in enumerate(cells):
                    if cell is not None and _not_number(cell):
                        return (
                            f"{self.path}, {unit} {first_row + i + first}, column {col!r}: "
                            f"{cell!r} is not a number"
                        )
        time, time_chunk = axis
        ti = np.searchsorted(time, _stamps(t[self.time], self.time_format, self.dayfirst))
        ni = pc.index_in(self.sensors(t), value_set=pa.array(ids, pa.string()))
        ni = ni.to_numpy(zero_copy_only=False)
        rows = first_row + np.arange(t.num_rows, dtype=np.int64)
        chunk = ti // time_chunk
        for c in np.unique(chunk):
            sel = chunk == c
            piece = out / f"{int(c):08d}"
            piece.mkdir(parents=True, exist_ok=True)
            with open(piece / f"{part.index:06d}.npz", "wb") as fh:
                np.savez(
                    fh,
                    ti=ti[sel].astype(np.int32),
                    ni=ni[sel].astype(np.int32),
                    row=rows[sel],
                    values=values[sel],
                )
        return None


def _not_number(cell) -> bool:
    try:
        float(cell)
    except (TypeError, ValueError):
        return True
    return False


def _stamps(
    column: pa.ChunkedArray, time_format: str | None = None, dayfirst: bool = False
) -> np.ndarray:
    """int64 ns UTC of a time column (strings parsed once per distinct value, by
    data.source.time_format / dayfirst)."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        # Arrow stores instants as UTC; a naive time is taken as UTC
        tz = getattr(column.type, "tz", None)
        return column.cast(pa.timestamp("ns", tz=tz)).cast(pa.int64()).to_numpy()
    text = column.cast(pa.string())
    uniq = pc.unique(text)
    try:
        parsed = to_utc(uniq.to_pandas(), time_format, dayfirst)
    except (ValueError, TypeError):
        raise SourceError("a cell is not a timestamp") from None
    if parsed.isna().any():
        raise SourceError("a cell is not a timestamp")
    return parsed.asi8[pc.index_in(text, value_set=uniq).to_numpy(zero_copy_only=False)]


def _not_timestamp(value, time_format: str | None, dayfirst: bool) -> bool:
    try:
        return bool(to_utc([value], time_format, dayfirst).isna().any())
    except (TypeError, ValueError):
        return True


@dataclass
class LongSource(Source):
    reader: Reader | None = None
    spill_dir: Path = Path()
    time_chunk: int = 64
    pieces: dict[int, list[str]] = field(default_factory=dict)  # time chunk -> piece files

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        f = len(self.features)
        out = np.full((g1 - g0, len(self.sensor_ids), f), np.nan, dtype=np.float32)
        seen = np.full((g1 - g0, len(self.sensor_ids)), -1, dtype=np.int64)  # row of each cell
        for c in range(g0 // self.time_chunk, (g1 - 1) // self.time_chunk + 1):
            for name in self.pieces.get(c, []):
                with np.load(self.spill_dir / f"{c:08d}" / name) as piece:
                    ti, ni, row, values = (piece[k] for k in ("ti", "ni", "row", "values"))
                keep = (ti >= g0) & (ti < g1)
                ti, ni, row, values = ti[keep] - g0, ni[keep], row[keep], values[keep]
                self._check_duplicates(seen, ti, ni, row, g0)
                seen[ti, ni] = row
                out[ti, ni] = values
        return out[:, sensors]

    def _check_duplicates(self, seen, ti, ni, row, g0) -> None:
        """A cell given twice, within these rows or by a row read before, is an error."""
        cells = ti * seen.shape[1] + ni
        order = np.argsort(cells, kind="stable")
        twice = np.flatnonzero(np.diff(cells[order]) == 0)
        if twice.size:
            i, j = order[twice[0]], order[twice[0] + 1]
            self._duplicate(ti[i], ni[i], row[i], row[j], g0)
        before = np.flatnonzero(seen[ti, ni] >= 0)
        if before.size:
            i = before[0]
            self._duplicate(ti[i], ni[i], seen[ti[i], ni[i]], row[i], g0)

    def _duplicate(self, ti: int, ni: int, a: int, b: int, g0: int) -> None:
        unit, first = self.reader.unit()
        when = pd.Timestamp(self.time[g0 + ti], tz="UTC")
        raise SourceError(
            f"{self.reader.path}: sensor {self.sensor_ids[ni]!r} has two rows for {when} "
            f"({unit}s {min(a, b) + first} and {max(a, b) + first}); keep one"
        )

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _partitions(path: Path, kind: str, size_mb: float) -> tuple[list[Part], tuple[str, ...]]:
    """The partitions of a file of ``kind`` and its column names."""
    target = max(1, int(size_mb * 2**20))
    if kind == "parquet":
        meta = pq.ParquetFile(path).metadata
        parts, group, size = [], [], 0
        for g in range(meta.num_row_groups):
            group.append(g)
            size += meta.row_group(g).total_byte_size
            if size >= target:
                parts.append(Part(len(parts), row_groups=tuple(group)))
                group, size = [], 0
        if group:
            parts.append(Part(len(parts), row_groups=tuple(group)))
        return parts, tuple(meta.schema.names)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.readline()
        cuts = [len(header)]
        for offset in range(len(header) + target, size, target):
            fh.seek(offset)
            fh.readline()  # to the end of the line that straddles the cut
            if fh.tell() < size and fh.tell() > cuts[-1]:
                cuts.append(fh.tell())
    cuts.append(size)
    names = tuple(header_fields(header, path))
    parts = [Part(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(cuts))]
    return parts, names


def open_long(cfg: DataConfig, pmap: PMap) -> LongSource:
    src: SourceConfig = cfg.source
    path = data_path(src.path)
    if path.stat().st_size == 0:
        raise SourceError(f"{path} is empty: expected rows of sensor_id, time, value")
    time_col = src.time_column or "time"
    parts, columns = _partitions(path, src.kind, src.partition_mb)
    need = [src.sensor_column, time_col, *src.value_columns]
    missing = [c for c in need if c not in columns]
    if missing:
        raise SourceError(f"{path}: columns {missing} are missing; found {list(columns)}")
    reader = Reader(
        path,
        src.kind,
        columns,
        src.sensor_column,
        time_col,
        tuple(src.value_columns),
        src.time_format,
        src.dayfirst,
    )
    unit, first = reader.unit()
    surveys = pmap(reader.survey, parts)
    starts = np.concatenate([[0], np.cumsum([s[0] for s in surveys])]).astype(np.int64)
    if starts[-1] == 0:
        raise SourceError(f"{path} has a header but no data rows")
    for part, (_, _, _, failed) in zip(parts, surveys, strict=True):
        if failed:  # name the row: find it in this partition alone
            stamps = reader.table(part, [time_col])[time_col].to_pylist()
            bad = next(
                i for i, v in enumerate(stamps) if _not_timestamp(v, src.time_format, src.dayfirst)
            )
            how = f"in the format {src.time_format!r}" if src.time_format else "a timestamp"
            raise SourceError(
                f"{path}, {unit} {int(starts[part.index]) + bad + first}: {stamps[bad]!r} is "
                f"not {how}; set data.source.time_format to the file's format"
            )
    ids = check_ids(list(dict.fromkeys(s for survey in surveys for s in survey[1])), str(path))
    uniq = np.unique(np.concatenate([s[2] for s in surveys]))
    axis = pd.DatetimeIndex(uniq.astype("datetime64[ns]")).tz_localize("UTC")
    time, _, freq = regular_axis(axis, src.freq, str(path), first)
    spill_dir = Path(cfg.store).parent / f".{Path(cfg.store).name}.long-spill"
    shutil.rmtree(spill_dir, ignore_errors=True)
    try:
        axis = (time, cfg.time_chunk)
        errors = pmap(lambda p: reader.spill(p, int(starts[p.index]), ids, axis, spill_dir), parts)
        errors = [e for e in errors if e is not None]
        if errors:
            raise SourceError(errors[0])
        return LongSource(
            **located(src, path, ids, time, freq, src.value_columns),
            node_subsets=False,
            reader=reader,
            spill_dir=spill_dir,
            time_chunk=cfg.time_chunk,
            pieces={int(d.name): sorted(f.name for f in d.iterdir()) for d in spill_dir.iterdir()},
        )
    except BaseException:
        shutil.rmtree(spill_dir, ignore_errors=True)
        raise
