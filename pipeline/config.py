"""The one typed configuration of the project.

Every entry point (`launch/*.py`) loads a YAML file with :func:`load_config` and applies
command-line overrides ``section.key=value``. Unknown keys and bad values raise
:class:`ConfigError`, which names the dotted key, the bad value and what is allowed (with the
nearest known key for a typo). The field docstrings below are the documentation of each key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError
from pipeline.kernels import FAMILIES, KERNELS

Family = Literal[KERNELS]  # a family of pipeline/kernels.py, or none


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)


class SyntheticConfig(_Section):
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


class SourceConfig(_Section):
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


class DataConfig(_Section):
    """Where the data comes from and how windows are cut."""

    store: str = "stores/small.zarr"
    """Path of the Zarr store that preprocessing writes and training reads."""
    source: SourceConfig = SourceConfig()
    """Raw input of preprocessing."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """Parameters of the synthetic field (used when the source is synthetic)."""
    overwrite: bool = False
    """Replace an existing store at ``store`` (otherwise preprocessing refuses)."""
    time_chunk: int = Field(64, ge=1)
    """Time steps per store chunk (a training window reads one or two chunks)."""
    node_chunk: int = Field(4096, ge=1)
    """Sensors per store chunk (a spatial tile reads a few of them)."""
    curve: Literal["morton", "hilbert"] = "morton"
    """Space-filling curve that orders the sensors in the store. ``hilbert`` keeps runs of
    sensors more compact (better ``block`` attention neighbourhoods and tiles)."""
    tile_size: int | None = Field(None, ge=1)
    """Train on spatial tiles of this many target sensors plus the halo that the model's
    receptive field needs (model.layers hops of neighbours); None: whole network."""
    time_in: int = Field(12, ge=1)
    """Input window length (time steps)."""
    horizon: int = Field(12, ge=1)
    """Forecast horizon (time steps)."""
    neighbours: int = Field(16, ge=1)
    """Number of nearest sensors (itself included) stored per sensor."""
    train_fraction: float = Field(0.7, gt=0, lt=1)
    """Leading fraction of time steps used for training."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Next fraction used for validation; the rest is the test split."""
    target: list[str] | None = None
    """The features to forecast, by name (the store's ``features``); None: every feature. The
    others are inputs only."""
    holdout_sensors: float | list[str] | None = None
    """Sensors held out of training entirely, for forecasting at new locations: a fraction
    (chosen by a hash of each sensor id, the same in every run) or a list of sensor ids. They
    are never an input nor a target in training or validation; at test time they are forecast
    from their coordinates and their neighbours alone (no history of their own), and the test
    metrics report seen and unseen sensors separately."""

    @model_validator(mode="after")
    def _holdout(self) -> DataConfig:
        h = self.holdout_sensors
        if isinstance(h, float) and not 0 < h < 1:
            raise ValueError(f"holdout_sensors = {h}: give a fraction in (0, 1) or sensor ids")
        if isinstance(h, list) and not h:
            raise ValueError("holdout_sensors is an empty list: give sensor ids, or leave it out")
        return self

    @model_validator(mode="after")
    def _splits(self) -> DataConfig:
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"train_fraction + val_fraction = {self.train_fraction + self.val_fraction} "
                "must be < 1 to leave a test split"
            )
        return self


class ModelConfig(_Section):
    """The spatially-informed transformer (docs/design.md, section 1)."""

    d_model: int = Field(64, ge=4)
    """Width of each sensor token."""
    heads: int = Field(4, ge=1)
    """Attention heads; each has its own range, nugget and anisotropy."""
    layers: int = Field(2, ge=1)
    """Number of pre-norm (attention + MLP) blocks."""
    mlp_ratio: int = Field(2, ge=1)
    """Hidden width of the MLP as a multiple of d_model."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention output and MLP."""
    kernel: Family = "matern32"
    """Covariance family of the attention bias; ``none`` is a plain transformer."""
    init_range_km: float = Field(10.0, gt=0)
    """Initial range of every head, km."""
    init_nugget: float = Field(0.1, gt=0, lt=1)
    """Initial nugget of every head."""
    learn_kernel: bool = True
    """Learn range and nugget (False freezes them at their initial values)."""
    anisotropy: bool = False
    """Learn a geometric anisotropy (angle, axis ratio) per head."""
    qk_residual: bool = True
    """Keep the data-driven <q, k> term; False leaves the kernel prior alone."""
    backend: Literal["dense", "knn", "block"] = "knn"
    """Attention backend: ``dense`` (all pairs), ``knn`` (k nearest), ``block`` (block-sparse
    FlexAttention; trains on CUDA only)."""
    knn: int = Field(16, ge=1)
    """Neighbours per query for the ``knn`` backend (itself included); also the neighbour
    graph of spatial tiles' halos."""
    block_size: int = Field(128, ge=16)
    """``block`` backend: sensors per block (a multiple of 16; on CUDA a multiple of 128)."""
    key_blocks: int = Field(8, ge=1)
    """``block`` backend: key blocks each query block attends to (nearest centroids first)."""
    calendar: bool = True
    """Give the model the time of day and day of week of each window. Turn it off for data
    without daily or weekly cycles (the synthetic fields): there the clock only identifies
    the training period, which the model then memorises (docs/limit.md)."""
    daily_profile: bool = False
    """Give the model each sensor's train mean at the time of day of every forecast step (its
    daily profile, pipeline/data/profile.py): the daily cycle of each sensor without a
    parameter per sensor. Needs a time step that divides a day (docs/peers.md)."""
    node_embedding: bool = False
    """Learn an embedding per sensor (ties the model to the sensors it was trained on)."""
    peer: Literal["graph_wavenet", "dcrnn", "agcrn", "stid"] | None = None
    """A published model from torch-spatiotemporal instead of ours (pipeline/model/peers.py,
    docs/peers.md; ``pip install --no-build-isolation -e ".[peers]"``): a point forecast,
    trained with ``train.loss: mae``."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if self.block_size % 16:
            raise ValueError(f"block_size={self.block_size} must be a multiple of 16")
        if self.peer is not None and self.daily_profile:
            raise ValueError(f"the peer {self.peer} does not read model.daily_profile: set false")
        return self


class TrainConfig(_Section):
    """Optimisation, evaluation and checkpoints (pipeline/train.py, DeepSpeed)."""

    steps: int = Field(300, ge=1)
    """Optimiser steps."""
    batch_size: int = Field(8, ge=1)
    """Windows per micro-batch per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimiser step (gradient accumulation)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate of the network weights."""
    kernel_lr: float = Field(3e-2, gt=0)
    """Peak learning rate of the kernel parameters (range, nugget, anisotropy)."""
    sensor_dropout: float = Field(0.0, ge=0, lt=1)
    """Share of the sensors of each training batch whose whole input window is hidden (their
    targets kept), so that the model learns to forecast a sensor from its neighbours alone:
    what it must do for held-out sensors (data.holdout_sensors) and long outages."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to kernel parameters, biases and norms)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear learning-rate warm-up, then cosine decay to ``min_lr_ratio`` x peak."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clipping (0 disables)."""
    loss: Literal["nll", "crps", "mae"] = "crps"
    """Training loss: Gaussian negative log-likelihood or closed-form Gaussian CRPS; ``mae``
    for the point forecasts of ``model.peer``."""
    kernel_warmup_steps: int = Field(0, ge=0)
    """Steps at the start during which the <q, k> residual is switched off (prior alone)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16 on CPUs and GPUs that have it; fp16 on older GPUs)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory at large N)."""
    loader_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: a prefetch thread in the training process)."""
    seed: int = 0
    """Seed of weights and data order."""
    log_every: int = Field(10, ge=1)
    """Steps between progress and metric updates."""
    eval_every: int = Field(100, ge=1)
    """Steps between validations."""
    eval_batches: int | None = Field(None, ge=1)
    """Cap on validation batches per rank (None: the whole validation split)."""
    oracle: bool = True
    """Score the test split against the exact Bayes limit of a synthetic store
    (evaluate/oracle.py): minutes of CPU at a few hundred sensors, the same for every model of
    a store. benchmarks/peers.py turns it off; benchmarks/limit.py is where it is compared."""
    patience: int | None = Field(None, ge=1)
    """Early stopping: validations without improvement before stopping (None: never)."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the latest checkpoint of this run if there is one."""
    out_dir: str = "runs"
    """Outputs go to ``<out_dir>/<name>/`` (checkpoints, metrics.json, the exported model)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (``auto``: CUDA when available)."""


class TrackingConfig(_Section):
    """MLflow tracking and model registry (pipeline/tracking.py)."""

    enabled: bool = True
    """Track the run in MLflow (rank 0 only)."""
    uri: str | None = None
    """Tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``."""
    experiment: str = "sit"
    """Experiment name."""
    model_name: str | None = "sit-forecaster"
    """Registered model name (the trained model gets alias ``candidate``); None: no registry."""
    promote_metric: str = "test_crps"
    """Test metric (lower is better) that ``launch/promote.py`` compares."""
    log_model: bool = True
    """Log the trained model as an MLflow pyfunc."""


Distribution = dict[Literal["grid", "choice", "uniform", "loguniform", "randint"], list[Any]]


class TuneConfig(_Section):
    """Ray Tune sweeps (pipeline/tune.py, ``launch/tune.py``)."""

    space: dict[str, Distribution] = {}
    """Search space: dotted config keys -> one distribution, e.g.
    ``model.kernel: {grid: [matern32, none]}`` (every value, num_samples times each),
    ``model.kernel: {choice: [...]}`` (sampled), ``train.lr: {loguniform: [1e-4, 1e-2]}``,
    ``model.heads: {randint: [1, 8]}`` (upper bound exclusive), ``x: {uniform: [a, b]}``."""
    num_samples: int = Field(8, ge=1)
    """Samples of the space (with ``grid`` dimensions: repetitions of the grid)."""
    max_concurrent_trials: int = Field(2, ge=1)
    """Trials running at the same time."""
    metric: Literal["val_loss", "val_mae", "val_rmse", "val_crps", "val_mape"] = "val_crps"
    """Validation metric that ASHA and the ranking use."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) ``metric`` is better."""
    grace_period: int = Field(1, ge=1)
    """ASHA: evaluations a trial always gets before it may be stopped."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: keep the best 1/reduction_factor at each rung."""
    workers_per_trial: int = Field(1, ge=1)
    """Training processes per trial. 1: the trial is one process (a group of one). More: the
    trial is a Ray Train ``TorchTrainer`` of that many workers (one process group, on its own
    port, across the cluster's nodes), each running the same training function."""
    cpus_per_trial: float = Field(1.0, gt=0.01)
    """CPUs reserved per trial (with several workers: a hundredth for the trial's own process,
    which only drives them, and the rest split evenly among the workers)."""
    gpus_per_trial: float = Field(0.0, ge=0)
    """GPUs reserved per trial (split evenly among its workers: e.g. 4 workers, 4 GPUs)."""
    address: str | None = None
    """Ray cluster to join; default ``$RAY_ADDRESS``, else a local instance."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local instance (default: all)."""
    resume: bool = False
    """Resume the sweep of this name (completed trials are kept)."""
    seed: int = 0
    """Seed of the search."""


class DaskConfig(_Section):
    """The Dask cluster used by preprocessing."""

    scheduler: str | None = None
    """Address of an existing scheduler; default ``$DASK_SCHEDULER_ADDRESS`` or a LocalCluster."""
    workers: int = Field(2, ge=1)
    """Workers of the LocalCluster."""
    threads_per_worker: int = Field(1, ge=1)
    """Threads per LocalCluster worker."""


class Config(_Section):
    """Root of the configuration."""

    name: str = Field("small", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]*$", max_length=200)
    """Run name (outputs go to ``<train.out_dir>/<name>``): letters, digits, ``. _ = -``, not
    starting with a dot, so that it never names a folder outside ``train.out_dir``."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    dask: DaskConfig = DaskConfig()

    @model_validator(mode="after")
    def _peer(self) -> Config:
        peer = self.model.peer
        if (peer is None) != (self.train.loss != "mae"):
            raise ValueError(
                "train.loss=mae goes with model.peer (a point forecast), and a peer with "
                "train.loss=mae: our model's spread needs nll or crps"
            )
        if peer is not None and self.data.tile_size is not None:
            raise ValueError(f"model.peer={peer} reads the whole network: data.tile_size=null")
        if peer in ("graph_wavenet", "agcrn", "stid") and self.data.holdout_sensors:
            raise ValueError(
                f"model.peer={peer} learns an embedding per sensor and cannot forecast sensors "
                "it never saw: data.holdout_sensors=null"
            )
        return self


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, _known_keys(Config), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{source}: unknown key {key!r}{hint}"
    value = err.get("input")
    return f"{source}: {key} = {value!r} is not allowed: {err['msg']}"


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from a plain dict, raising :class:`ConfigError` on any problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without its implicit timestamps: ``start: 2024-01-01`` stays the
    string the source parses with its own format, not a ``datetime.date``."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
MAX_YAML_NODES = 100_000  # values in a config after aliases are expanded (an alias bomb stops)


def read_yaml(text: str, where: str) -> Any:
    """Parse config YAML; errors name ``where``, the line and column; aliases that expand to
    more than ``MAX_YAML_NODES`` values are refused before anything walks them."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        tab = " (YAML indents with spaces, not tabs)" if "\t" in text else ""
        where_at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(f"{where_at}: {exc.problem or exc.context}{tab}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    stack, count = [value], 0
    while stack:  # counts shared (aliased) values once per reference, as a walk would see them
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: more than {MAX_YAML_NODES} values once its aliases (*name) are "
                "expanded; write the values out or use fewer aliases"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return value


def read_yaml_file(path: Path) -> Any:
    """:func:`read_yaml` of a file, which must be UTF-8 (an error names the line otherwise)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    return read_yaml(text, str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to the raw dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = read_yaml(text, f"override {key}") if text.strip() else None
    except ConfigError as exc:
        raise ConfigError(f"{exc}; quote a plain string value ({key}='\"{text}\"')") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the embedded defaults when ``path`` is None) plus overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        raw = read_yaml_file(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = str(path)
    for override in overrides:
        apply_override(raw, override)
    if overrides:
        source += " + overrides"
    return validate(raw, source)


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The config as ``{"section.key": value}`` (for logging as parameters)."""
    out: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out
