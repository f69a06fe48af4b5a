"""NetCDF / Zarr datasets read through xarray (a time dimension and a sensor dimension)."""

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
    first_invalid_position,
    load_locations,
    regular_axis,
)

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
