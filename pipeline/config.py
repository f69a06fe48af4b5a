"""The one typed configuration of the project.

Every entry point (`launch/*.py`) loads a YAML file with :func:`load_config` and applies
command-line overrides ``section.key=value``. Unknown keys and bad values raise
:class:`ConfigError`, which names the dotted key, the bad value and what is allowed (with the
nearest known key for a typo). The field docstrings below are the documentation of each key.
Reading the YAML files and overrides is pipeline/config_files.py.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline.config_files import apply_override, read_yaml_file
from pipeline.config_sources import Family, Section, SourceConfig, SyntheticConfig
from pipeline.errors import ConfigError


class DataConfig(Section):
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


class ModelConfig(Section):
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
    kernel_heads: int | None = Field(None, ge=1)
    """Heads of each layer that carry the kernel's bias (the first ones); the others are plain
    <q, k> heads with no spatial prior. None: every head."""
    variography: bool = True
    """Fit the field's variogram beside the forecast (pipeline/model/variogram.py): the run's
    range and nugget estimate, ``kernel_estimate`` in metrics.json. No effect on the forecast
    at observed sensors (``kriging_variance``: sensors without a window); needs a kernel family
    (not ``none``)."""
    kriging_variance: bool = True
    """Add the estimate's simple-kriging variance from the observed neighbours to the forecast
    variance of every sensor without an input window (held-out sensors, query points, outages;
    with ``model.variography``): the forecast std grows with the distance to the network, as a
    geostatistician's does. Observed sensors are unchanged."""
    kriged_inputs: bool = False
    """Fill every unobserved value of the input window (held-out sensors, query points,
    outages, ``train.sensor_dropout``, missing readings) by simple kriging from the neighbours
    observed at that step, under the run's field estimate (``model.variography``; no effect
    with kernel ``none``); the mask still tells the model which values were kriged, and a
    sensor without its own observation forecasts as a correction of its kriged last value."""
    kriged_smoothing: bool = False
    """Give the model, beside its window, the simple-kriging estimate of the field without its
    nugget at every sensor and step (from its own value and its nearest observed neighbours,
    under the run's field estimate; as ``kriged_inputs``), and forecast as a correction of its
    last one instead of the last observed value."""
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
    """Learn an embedding per sensor (its identity: what the daily profile and the inputs do
    not say about it). A sensor without an input window (held out, a query point, hidden by
    ``train.sensor_dropout``, a whole-window outage) gets one learned unknown-sensor vector
    instead, so held-out sensors and query points are forecast as without embeddings (train
    with ``train.sensor_dropout`` for them)."""
    temporal_layers: int = Field(0, ge=0)
    """Self-attention layers over the steps of each sensor's input window
    (pipeline/model/temporal.py), added to the flat window embedding; 0: the flat embedding
    alone."""
    temporal_width: int = Field(16, ge=4)
    """Width of the step tokens of ``temporal_layers`` (one head per 16; there are time_in
    times more step tokens than sensor tokens, so this width sets their cost)."""
    peer: Literal["graph_wavenet", "dcrnn", "agcrn", "stid"] | None = None
    """A published model from torch-spatiotemporal instead of ours (pipeline/model/peers.py,
    docs/peers.md; ``pip install --no-build-isolation -e ".[peers]"``): a point forecast,
    trained with ``train.loss: mae``."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if self.kernel_heads is not None and self.kernel_heads > self.heads:
            raise ValueError(
                f"kernel_heads={self.kernel_heads} is more than heads={self.heads}: lower it"
            )
        if self.block_size % 16:
            raise ValueError(f"block_size={self.block_size} must be a multiple of 16")
        if self.peer is not None and self.daily_profile:
            raise ValueError(f"the peer {self.peer} does not read model.daily_profile: set false")
        return self


class TrainConfig(Section):
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
    val_hidden: float = Field(0.0, ge=0, lt=1)
    """Share of the seen sensors whose input windows validation hides (targets kept, also in
    the pooled metrics; the same sensors in every run, a hash of their ids) and scores apart as
    ``val_hidden_<metric>``: forecasts from the neighbours alone, as for held-out sensors and
    query points (``train.monitor: hidden_mae`` follows it). 0: none."""
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
    fitted_gp: bool = True
    """Score the test split against a separable space-time Gaussian process fitted to the train
    split (evaluate/gp.py): exact conditioning on each window, up to a few thousand sensors
    (beyond: skipped, said); the same for every model of a store."""
    historical_average: bool = True
    """Score the historical average baseline in the test (each sensor's train mean at the
    target's time of day; where the time step divides a day): one pass over the train split
    and [steps per day, N, F] float32 in memory."""
    patience: int | None = Field(None, ge=1)
    """Early stopping: validations without improvement of ``monitor`` before stopping (None:
    never)."""
    monitor: Literal["mae", "crps", "loss", "hidden_mae", "hidden_crps"] = "mae"
    """The validation metric that early stopping and the best weights follow (lower is
    better): the pooled MAE, CRPS, the training loss on the validation split, or the MAE or
    CRPS at the sensors whose windows it hides (``train.val_hidden``)."""
    restore_best: bool = True
    """Test and export the weights of the best validation (``monitor``), not the last step's
    (they are kept beside the checkpoints, ``checkpoints/best.pt``, and survive a resume)."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Validate, test and export an exponential moving average of the weights, with this decay
    per optimiser step (pipeline/train/averaging.py; 0.99 averages about the last 100 steps);
    the optimiser steps the weights themselves. None: the weights as trained."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints."""
    keep_checkpoints: int | None = Field(3, ge=1)
    """Complete checkpoints kept (the newest); older ones are removed once a new one is
    complete (None: keep all). The best validation weights are kept apart."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the latest checkpoint of this run if there is one."""
    out_dir: str = "runs"
    """Outputs go to ``<out_dir>/<name>/`` (checkpoints, metrics.json, the exported model)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (``auto``: CUDA when available)."""

    @model_validator(mode="after")
    def _monitor(self) -> TrainConfig:
        if self.monitor.startswith("hidden_") and not self.val_hidden:
            raise ValueError(
                f"train.monitor={self.monitor} follows the sensors whose windows validation "
                "hides: set train.val_hidden (e.g. 0.2), or monitor mae"
            )
        if self.ema_decay is not None and self.zero_stage == 3:
            raise ValueError(
                "train.ema_decay averages the whole parameters on every rank, which ZeRO stage 3 "
                "partitions: use train.zero_stage 0-2, or train.ema_decay=null"
            )
        return self


class TrackingConfig(Section):
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
    serve_alias: str = "champion"
    """Alias of the registered model that ``launch/serve.py`` serves."""
    serve_host: str = "127.0.0.1"
    """Address ``launch/serve.py`` listens on (another: reachable beyond this machine)."""
    serve_port: int = Field(5001, ge=1, le=65535)
    """Port ``launch/serve.py`` listens on."""


Distribution = dict[Literal["grid", "choice", "uniform", "loguniform", "randint"], list[Any]]


class TuneConfig(Section):
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


class DaskConfig(Section):
    """The Dask cluster used by preprocessing."""

    scheduler: str | None = None
    """Address of an existing scheduler; default ``$DASK_SCHEDULER_ADDRESS`` or a LocalCluster."""
    workers: int = Field(2, ge=1)
    """Workers of the LocalCluster."""
    threads_per_worker: int = Field(1, ge=1)
    """Threads per LocalCluster worker."""


class Config(Section):
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
    if isinstance(value, dict):  # a check across a section's keys: the message names them
        return f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}"
    return f"{source}: {key} = {value!r} is not allowed: {err['msg']}"


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from a plain dict, raising :class:`ConfigError` on any problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


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
