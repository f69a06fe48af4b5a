"""Raw sensor data sources and their registry: ``open_source`` by ``data.source.kind``.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.ingest import (  # noqa: F401  (SourceError and Source are part of this API)
    PMap,
    Source,
    SourceError,
    check_ids,
    data_path,
    first_invalid_position,
    load_locations,
    parse_times,
    regular_axis,
    sha256,
)
from pipeline.synthetic import SyntheticField
from pipeline.wide_csv import open_wide_csv

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
# xarray: an existing Zarr store or NetCDF file, one [time, sensor] variable per feature


def open_dataset(path: Path):
    """The xarray Dataset of a Zarr store (a directory) or a NetCDF-4 / NetCDF-3 file, lazily
    (no Dask: reads run inside Dask tasks already)."""
    import xarray as xr

    if path.is_dir():
        return xr.open_dataset(path, engine="zarr", chunks=None, consolidated=False)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:3] == b"CDF":  # classic NetCDF-3
        return xr.open_dataset(path, engine="scipy", chunks=None)
    return xr.open_dataset(path, engine="h5netcdf", chunks=None)


@dataclass
class XarraySource(Source):
    path: Path = Path()
    variables: list[str] = field(default_factory=list)
    time_dim: str = "time"
    sensor_dim: str = "sensor_id"
    row_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        out = np.full((g1 - g0, len(sensors), len(self.variables)), np.nan, dtype=np.float32)
        r0, r1 = np.searchsorted(self.row_pos, [g0, g1])
        uniq, inverse = np.unique(sensors, return_inverse=True)  # HDF5 reads want sorted indices
        with open_dataset(self.path) as ds:
            for f, var in enumerate(self.variables):
                block = (
                    ds[var]
                    .isel({self.time_dim: slice(r0, r1), self.sensor_dim: uniq})
                    .transpose(self.time_dim, self.sensor_dim)
                    .to_numpy()
                )  # [rows, sensors]
                out[self.row_pos[r0:r1] - g0, :, f] = block[:, inverse]
        return out


POSITION_COORDS = [("latitude", "longitude"), ("lat", "lon"), ("x", "y")]


def open_xarray(cfg: DataConfig, pmap: PMap) -> XarraySource:
    src = cfg.source
    if src.path is None:
        raise SourceError("data.source.path is not set: name the Zarr store or NetCDF file")
    path = Path(src.path)
    if not path.exists():
        raise SourceError(f"{path} does not exist (data.source.path)")
    try:
        ds = open_dataset(path)
    except Exception as exc:  # any backend's refusal: not a dataset we can read
        raise SourceError(f"{path} is not a readable Zarr store or NetCDF file ({exc})") from None
    time_dim, sensor_dim = src.time_column or "time", src.sensor_column
    with ds:
        missing = [v for v in src.value_columns if v not in ds.data_vars]
        if missing:
            raise SourceError(
                f"{path}: variables {missing} (data.source.value_columns) are not in the "
                f"dataset; its variables: {sorted(map(str, ds.data_vars))}"
            )
        for var in src.value_columns:
            if set(ds[var].dims) != {time_dim, sensor_dim}:
                raise SourceError(
                    f"{path}: variable {var!r} has dimensions {list(ds[var].dims)}; expected "
                    f"[{time_dim!r}, {sensor_dim!r}] (data.source.time_column names the time "
                    "dimension, data.source.sensor_column the sensor dimension)"
                )
            if not np.issubdtype(ds[var].dtype, np.number):
                raise SourceError(f"{path}: variable {var!r} is {ds[var].dtype}, not numeric")
        raw_t = ds[time_dim].to_numpy()
        if not np.issubdtype(raw_t.dtype, np.datetime64):
            raise SourceError(
                f"{path}: coordinate {time_dim!r} holds {raw_t.dtype}, not timestamps (give it "
                "CF time units, e.g. 'minutes since 2024-01-01')"
            )
        n = ds.sizes[sensor_dim]
        labels = ds[sensor_dim].to_numpy() if sensor_dim in ds.coords else np.arange(n)
        ids = check_ids([str(x) for x in labels], f"{path}, dimension {sensor_dim!r}")
        pair = next(((a, b) for a, b in POSITION_COORDS if a in ds.coords and b in ds.coords), None)
        if src.locations is None and pair is not None:
            coords = np.stack([ds[pair[0]].to_numpy(), ds[pair[1]].to_numpy()], axis=1)
            coords, crs = coords.astype(float), "xy" if pair == ("x", "y") else "latlon"
            if coords.shape != (n, 2):
                raise SourceError(f"{path}: coordinates {pair} must lie along {sensor_dim!r} alone")
            i = first_invalid_position(coords, crs)
            if i is not None:
                raise SourceError(
                    f"{path}: sensor {ids[i]!r} has invalid coordinates {pair[0]}="
                    f"{coords[i, 0]}, {pair[1]}={coords[i, 1]} (latitude must be in [-90, 90], "
                    "longitude in [-180, 180], no NaN)"
                )
        else:
            coords, crs = load_locations(src.locations, src.locations_header, ids)
    if len(raw_t) == 0:
        raise SourceError(f"{path}: dimension {time_dim!r} is empty")
    stamps = pd.DatetimeIndex(pd.to_datetime(raw_t, utc=True)).as_unit("ns")
    time, row_pos, freq = regular_axis(stamps, src.freq, f"{path}", 0, unit=f"{time_dim} index")
    return XarraySource(
        sensor_ids=ids,
        coords=coords,
        crs=crs,
        time=time,
        freq=freq,
        features=list(src.value_columns),
        files=[path] + ([Path(src.locations)] if src.locations else []),
        path=path,
        variables=list(src.value_columns),
        time_dim=time_dim,
        sensor_dim=sensor_dim,
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


OPENERS: dict[str, Callable[[DataConfig, PMap], Source]] = {
    "synthetic": open_synthetic,
    "wide_csv": open_wide_csv,
    "long_csv": open_long,
    "parquet": open_long,
    "hdf5": open_hdf5,
    "xarray": open_xarray,
}


def open_source(cfg: DataConfig, pmap: PMap = lambda f, xs: list(map(f, xs))) -> Source:
    """Open and validate the source of ``cfg.source.kind``."""
    if cfg.source.kind not in OPENERS:
        raise SourceError(
            f"data.source.kind = {cfg.source.kind!r} is unknown; one of {sorted(OPENERS)}"
        )
    return OPENERS[cfg.source.kind](cfg, pmap)
