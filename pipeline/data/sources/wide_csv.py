"""Wide CSV sources: a header of sensor ids and one row per time step (optionally a first
column of timestamps), as spreadsheets and loggers export them: a UTF-8 byte-order mark,
quoted header and cells, CRLF line ends, ``data.source.delimiter`` (``;``),
``data.source.decimal`` (``,``) and ``data.source.encoding`` (any ASCII-compatible one).

Big files are scanned in parallel blocks for line offsets and timestamps (a line ends at a
newline byte: quoted cells may not hold line breaks); each task then parses its row range with
``pyarrow.csv``: plain rows as one column of cells (one per line), rows with quoted cells
as a table (slower: a table of thousands of columns costs per column). A row with the wrong
number of fields or a cell that is not a number is an error naming the file, the line and the
sensor.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import DataConfig
from pipeline.data.sources.base import (
    PMap,
    Source,
    SourceError,
    axis_from_start,
    check_ids,
    data_path,
    header_fields,
    located,
    parse_times,
    regular_axis,
)

SCAN_BLOCK = 32 << 20  # bytes per scan task
_PREFIX = 256  # bytes read after each line start to find its timestamp
_PADDING = re.compile(rb"^[ \t]+|[ \t]+$", re.MULTILINE)  # spaces and tabs around a cell
NULLS = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "#N/A", "-nan", "None"]
"""Cells that mean "missing" (besides data.source.sentinels)."""


def _scan_block(
    path: str, offset: int, size: int, filesize: int, delimiter: bytes
) -> tuple[np.ndarray, list[bytes]]:
    """Line starts in [offset, offset + size) and the first field of each such line."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size + _PREFIX)
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf[:size] == 10)
    starts = offset + nl + 1
    starts = starts[starts < filesize]
    firsts = [data[s - offset : s - offset + _PREFIX].split(delimiter, 1)[0] for s in starts]
    return starts, firsts


@dataclass
class WideCsvSource(Source):
    path: Path = Path()
    columns: list[str] = field(default_factory=list)  # all header fields
    sensor_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    line_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [rows + 1]
    row_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [rows]
    delimiter: str = ","
    decimal: str = "."
    encoding: str = "utf-8"

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        out = np.full((g1 - g0, len(sensors), 1), np.nan, dtype=np.float32)
        r0, r1 = np.searchsorted(self.row_pos, [g0, g1])
        if r1 <= r0:
            return out
        a, b = int(self.line_starts[r0]), int(self.line_starts[r1])
        with open(self.path, "rb") as fh:
            fh.seek(a)
            data = fh.read(b - a)
        vals = self._parse(data, r0, r1 - r0)  # [rows, sensors]
        if r1 - r0 == g1 - g0:  # no gap in these rows: no scatter needed
            return vals[:, sensors, None]
        out[self.row_pos[r0:r1] - g0, :, 0] = vals[:, sensors]
        return out

    def _parse(self, data: bytes, r0: int, rows: int) -> np.ndarray:
        """Rows r0 .. r0 + rows of the file (``data``) as float32 [rows, sensors]."""
        try:
            if b'"' in data:  # quoted cells: the CSV parser proper
                vals = self._parse_table(data)
            else:  # plain cells: split and convert in bulk (a wide table is slow per column)
                vals = self._parse_cells(data)
        except (pa.ArrowInvalid, UnicodeDecodeError):
            vals = None
        if vals is None or vals.shape != (rows, len(self.sensor_cols)):
            self._raise_first_error(data, r0)
            raise SourceError(
                f"{self.path}, lines {r0 + 2}-{r0 + rows + 1}: could not be read as "
                f"{len(self.columns)} fields of numbers; check data.source.delimiter, "
                "decimal and encoding"
            )
        return vals

    def _parse_cells(self, data: bytes) -> np.ndarray | None:
        """Unquoted rows: every sensor cell on a line of its own, parsed by pyarrow.csv as one
        float32 column (a table of thousands of columns costs per column; one column does
        not). None when a row has the wrong number of fields."""
        delim = self.delimiter.encode(self.encoding)
        lines = [line.rstrip(b"\r") for line in data.rstrip(b"\r\n").split(b"\n")]
        if any(line.count(delim) != len(self.columns) - 1 for line in lines):
            return None
        if self.sensor_cols[0] > 0:  # drop the time column
            lines = [line.split(delim, 1)[1] for line in lines]
        body = b"\n".join(lines).replace(delim, b"\n")  # one cell per line
        if b" " in body or b"\t" in body:  # blanks around a cell; a blank cell is missing
            body = _PADDING.sub(b"", body)
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(
                column_names=["v"],
                encoding=self.encoding,
                use_threads=False,
                block_size=len(body) + 1,
            ),
            # the delimiter no longer occurs; an empty line is a missing cell
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"v": pa.float32()},
                decimal_point=self.decimal,
                null_values=NULLS,
                strings_can_be_null=True,
            ),
        )
        flat = table["v"].to_numpy()  # [rows * sensors]; nulls are NaN
        return flat.reshape(len(lines), len(self.sensor_cols))

    def _parse_table(self, data: bytes) -> np.ndarray:
        """Rows with quoted cells, through pyarrow's CSV reader."""
        names = [f"c{i}" for i in range(len(self.columns))]
        wanted = [names[c] for c in self.sensor_cols]
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                column_names=names,
                encoding=self.encoding,
                use_threads=False,
                block_size=len(data) + 1,  # one block: rows never straddle two
            ),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.float32() for n in wanted},
                include_columns=wanted,
                decimal_point=self.decimal,
                null_values=NULLS,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        # float columns: pyarrow gives NaN for nulls
        return np.stack([c.to_numpy() for c in table.columns], axis=1)  # [rows, sensors]

    def _raise_first_error(self, data: bytes, r0: int) -> None:
        """The slow path, on errors only: name the first bad line, and its sensor."""
        try:
            text = data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            line = r0 + 2 + data[: exc.start].count(b"\n")
            raise SourceError(
                f"{self.path}, line {line}: bytes that are not {self.encoding}; set "
                "data.source.encoding to the file's encoding"
            ) from None
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter)
        for i, cells in enumerate(reader):
            line = r0 + i + 2
            if len(cells) != len(self.columns):
                raise SourceError(
                    f"{self.path}, line {line}: {len(cells)} fields, the header has "
                    f"{len(self.columns)}; fix the ragged row"
                )
            for c in self.sensor_cols:
                cell = cells[c].strip()
                if cell in NULLS:
                    continue
                try:
                    float(cell.replace(self.decimal, ".") if self.decimal != "." else cell)
                except ValueError:
                    raise SourceError(
                        f"{self.path}, line {line}, sensor {self.columns[c]!r}: {cell!r} is "
                        "not a number; fix the cell or leave it empty (decimal mark: "
                        f"{self.decimal!r}, data.source.decimal)"
                    ) from None


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
    columns = header_fields(header_line, path, src.encoding, src.delimiter)
    if len(columns) < 2 and src.delimiter not in header_line.decode(src.encoding, "replace"):
        guess = next((d for d in ";\t|," if d in header_line.decode("latin-1")), None)
        if guess is not None and guess != src.delimiter:
            raise SourceError(
                f"{path}, line 1: no {src.delimiter!r} in the header, but {guess!r} is there: "
                f"set data.source.delimiter: {guess!r}"
            )
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
    delim = src.delimiter.encode(src.encoding)
    blocks = [
        (str(path), o, min(SCAN_BLOCK, filesize - o), filesize, delim)
        for o in range(body, filesize, SCAN_BLOCK)
    ]
    scans = pmap(lambda args: _scan_block(*args), blocks)
    starts = np.concatenate([[body]] + [s for s, _ in scans]).astype(np.int64)
    starts = starts[starts < filesize]
    firsts = [f for _, fs in scans for f in fs]
    rows = len(starts)
    if rows == 0:
        raise SourceError(f"{path} has a header but no data rows")
    with open(path, "rb") as fh:
        fh.seek(body)
        first_line_blank = fh.read(1) in (b"\n", b"\r")
    blank = [first_line_blank] + [f[:1] in (b"\n", b"\r") for f in firsts]
    if any(blank):  # a blank line is no time step: refuse it rather than guess
        raise SourceError(
            f"{path}, line {blank.index(True) + 2}: a blank line among the data rows; remove it"
        )
    line_starts = np.append(starts, filesize)
    if src.time_column:
        with open(path, "rb") as fh:
            fh.seek(body)
            first = fh.read(_PREFIX).split(delim, 1)[0]
        stamps = [x.decode(src.encoding, "replace").strip().strip('"') for x in [first, *firsts]]
        stamps = parse_times(stamps, str(path), 2, src.time_format, src.dayfirst)
        time, row_pos, freq = regular_axis(stamps, src.freq, str(path), 2)
    else:
        time, row_pos, freq = axis_from_start(src.start, src.freq, rows, str(path))
    return WideCsvSource(
        **located(src, path, ids, time, freq, ["value"]),
        node_subsets=False,
        path=path,
        columns=columns,
        sensor_cols=sensor_cols,
        line_starts=line_starts,
        row_pos=row_pos,
        delimiter=src.delimiter,
        decimal=src.decimal,
        encoding=src.encoding,
    )
