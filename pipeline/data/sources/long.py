"""Long CSV / Parquet: rows of (sensor_id, time, value[, more features]), pivoted to
[time, sensor, feature]."""

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
    load_locations,
    parse_times,
    regular_axis,
)


@dataclass
class ArraySource(Source):
    """Values already pivoted to [T, N, F] in memory (long formats)."""

    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        return self.values[g0:g1][:, sensors]


def open_long(cfg: DataConfig, pmap: PMap) -> ArraySource:
    src = cfg.source
    path = data_path(src.path)
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
    stamps = parse_times(frame[time_col].astype(str).tolist(), where, first_line)
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
    ids = check_ids(list(dict.fromkeys(sensor)), where)
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
