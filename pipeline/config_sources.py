"""The sections of the typed config (pipeline/config.py) that say where the data come from:
the raw source files of preprocessing and the synthetic field with known truth."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.kernels import FAMILIES, KERNELS

Family = Literal[KERNELS]  # a family of pipeline/kernels.py, or none


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)


class SyntheticConfig(Section):
    """A space-time Gaussian random field with known truth (see ``pipeline/synthetic.py``)."""

    family: Family = "matern32"
    """Spatial correlation family of the field (``none`` and ``spherical`` cannot be sampled)."""
    range_km: float = Field(20.0, gt=0)
    """True length scale of the spatial correlation, km (the ``range`` of docs/design.md)."""
    variance: float = Field(1.0, gt=0)
    """Variance (sill) of the latent field."""
    nugget: float = Field(0.1, ge=0)
    """Variance of the independent measurement noise added to each observation."""
    mean: float = 0.0
    """Constant mean added to every value."""
    anisotropy_angle_deg: float = 0.0
    """Angle of the major axis, degrees counter-clockwise from east."""
    anisotropy_ratio: float = Field(1.0, gt=0, le=1)
    """Minor/major axis ratio (1 = isotropic)."""
    ar_coef: float = Field(0.9, ge=0, lt=1)
    """AR(1) coefficient of the Fourier coefficients from one time step to the next."""
    num_features: int = Field(512, ge=8)
    """Number of random Fourier frequencies M (the field is a [T, 2M] x [2M, N] product)."""
    num_sensors: int = Field(2000, ge=2)
    """Number of sensors N, placed uniformly at random in the square domain."""
    num_steps: int = Field(2000, ge=2)
    """Number of time steps T."""
    domain_km: float = Field(100.0, gt=0)
    """Side of the square domain holding the sensors, km."""
    layout: Literal["uniform", "clustered"] = "uniform"
    """Sensor placement: ``uniform`` in the domain, or ``clustered``: a share
    ``cluster_fraction`` of the sensors in ``clusters`` tight Gaussian clusters (sd
    ``cluster_km``) at random centres, the rest uniform (highways and cities over a sparse
    background: a sensor's k nearest lie at very different distances)."""
    clusters: int = Field(20, ge=1)
    """Number of clusters of the ``clustered`` layout."""
    cluster_km: float = Field(1.0, gt=0)
    """Standard deviation of a cluster around its centre, km per axis."""
    cluster_fraction: float = Field(0.8, ge=0, le=1)
    """Share of the sensors in clusters (``clustered`` layout)."""
    outage_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of the domain's area out of service during an outage (0: no outages): the sensors
    within ``outage_patches`` circular patches at random centres go unobserved for a random
    span of half to all of each episode of ``outage_steps`` steps (new centres each episode)."""
    outage_patches: int = Field(4, ge=1)
    """Number of outage patches per episode."""
    outage_steps: int = Field(48, ge=2)
    """Length of an outage episode, steps."""
    seed: int = 0
    """Seed; the field is a pure function of (seed, configuration)."""
    start: str = "2024-01-01T00:00:00"
    """Timestamp of the first step (UTC)."""
    freq: str = "5min"
    """Time step (pandas frequency string)."""

    @model_validator(mode="after")
    def _sampleable(self) -> SyntheticConfig:
        if self.family == "none" or FAMILIES[self.family].spectral is None:
            sampled = [name for name, family in FAMILIES.items() if family.spectral is not None]
            raise ValueError(
                f"family {self.family!r} cannot be sampled by random Fourier features; "
                f"use one of {', '.join(sampled)}"
            )
        return self


class SourceConfig(Section):
    """Raw input files of preprocessing (README, "Bring your own data")."""

    kind: Literal["synthetic", "wide_csv", "long_csv", "parquet", "hdf5", "xarray"] = "synthetic"
    """``synthetic`` (data.synthetic), ``wide_csv`` (a column per sensor), ``long_csv`` /
    ``parquet`` (rows of sensor_id, time, value[, more features]), ``hdf5`` (METR-LA layout),
    ``xarray`` (a Zarr store or NetCDF file with [time, sensor] variables)."""
    path: str | None = None
    """The data file, or the Zarr directory (not used by ``synthetic``)."""
    locations: str | None = None
    """CSV of sensor positions: ``sensor_id`` + ``latitude``/``longitude`` or ``x``/``y`` (km).
    xarray: optional when the dataset has such coordinates along the sensor dimension."""
    locations_header: bool = True
    """False when the locations file has no header row (columns: sensor_id, lat, lon)."""
    time_column: str | None = None
    """Wide CSV: name of the timestamp column; None when rows carry no timestamp (then
    ``start`` and ``freq`` define the time axis). Long formats: the time column (``time``);
    xarray: the time dimension (``time``)."""
    sensor_column: str = "sensor_id"
    """Long formats: the sensor id column; xarray: the sensor dimension (its coordinate, if
    any, holds the ids)."""
    value_columns: list[str] = ["value"]
    """Long formats: the feature columns; xarray: the data variables (F = their number)."""
    time_format: str | None = None
    """strftime format of the timestamps (e.g. ``%d/%m/%Y %H:%M``); None: ISO 8601 and what
    pandas infers, month first where a date is ambiguous (see ``dayfirst``)."""
    dayfirst: bool = False
    """Read ambiguous dates such as 01/02/2024 day first (1 February); ignored with
    ``time_format``."""
    start: str | None = None
    """Timestamp of the first row when rows carry no timestamp (UTC)."""
    freq: str | None = None
    """Time step (pandas frequency string, e.g. ``5min``); inferred from timestamps if None."""
    partition_mb: float = Field(64.0, gt=0)
    """Long formats: size of the partitions read in parallel (CSV bytes; Parquet: whole row
    groups up to this uncompressed size); memory per task follows it, not the file size."""
    delimiter: str = ","
    """Wide CSV: the field delimiter (one character, e.g. ``;`` from European spreadsheets)."""
    decimal: str = "."
    """Wide CSV: the decimal mark (``,`` from European spreadsheets)."""
    encoding: str = "utf-8"
    """Wide CSV: the text encoding (ASCII-compatible: utf-8, latin-1, cp1252, ...); a UTF-8
    byte-order mark is skipped."""
    sentinels: list[float] = []
    """Values that mean "missing" (e.g. 0 for METR-LA speeds): masked, never used."""
    hdf5_key: str = "df"
    """HDF5: the pandas key of the frame."""
    units: str = ""
    """Units of the values (recorded in the store)."""

    @model_validator(mode="after")
    def _csv_dialect(self) -> SourceConfig:
        if len(self.delimiter) != 1 or len(self.decimal) != 1:
            raise ValueError("delimiter and decimal must be one character each")
        if self.delimiter == self.decimal:
            raise ValueError(f"delimiter and decimal are both {self.delimiter!r}")
        try:
            ascii_ok = "\n,;.0".encode(self.encoding) == b"\n,;.0"
        except LookupError:
            raise ValueError(f"encoding {self.encoding!r} is unknown") from None
        if not ascii_ok:
            raise ValueError(
                f"encoding {self.encoding!r} is not ASCII-compatible (UTF-16/32): convert the "
                "file to UTF-8"
            )
        return self
