"""Ray Tune sweeps over kernel families and hyperparameters (the only module that imports ray).

Each trial is the ordinary training function (pipeline/train.py) on the base config plus the
trial's sampled ``section.key`` values; it reports validation metrics at every evaluation, and
ASHA stops the poor ones early. A trial is one process, a group of one on its own rendezvous
port, or, with ``tune.workers_per_trial`` > 1, a Ray Train ``TorchTrainer`` whose workers form
one process group (gloo on CPU, NCCL on GPUs) on a port Ray Train picks for that trial. Each
trial logs a nested MLflow run under the sweep's parent run, and writes its outputs
under ``<out_dir>/<sweep>/trials/``. At the end: a table of the best trial per kernel family
(printed, logged with a plot) and ``<out_dir>/<sweep>/best.yaml``, a config that
``launch/train.py`` runs as it is. ``tune.resume: true`` continues a sweep whose driver died,
keeping its completed trials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipeline.config import Config, ConfigError, apply_override, validate
from pipeline.errors import UserError
from pipeline.track.ray_env import is_local, ray_address
from pipeline.track.tracking import SweepTracker, tracking_uri

# CPUs that a trial of several workers keeps for its own process, which only drives them
DRIVER_CPUS = 0.01
SAMPLERS = {
    "grid": lambda args: tune.grid_search(args),
    "choice": lambda args: tune.choice(args),
    "uniform": lambda args: tune.uniform(*args),
    "loguniform": lambda args: tune.loguniform(*args),
    "randint": lambda args: tune.randint(*args),
}


def trial_config(base: dict, values: dict[str, Any], source: str = "sweep") -> Config:
    """The base config (as a plain dict) with the trial's dotted values applied."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    for key, value in values.items():
        apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return validate(raw, source)


def check_space(cfg: Config) -> dict[str, Any]:
    """Validate every dimension of the space against the config before any trial starts
    (every choice and both ends of every range); returns Ray's search space."""
    base = cfg.model_dump(mode="json")
    space = {}
    for key, dist in cfg.tune.space.items():
        if len(dist) != 1:
            raise ConfigError(f"tune.space.{key}: give exactly one distribution, got {list(dist)}")
        ((kind, args),) = dist.items()
        if kind in ("grid", "choice"):
            if not args:
                raise ConfigError(f"tune.space.{key}: {kind} needs at least one value")
            probes = args
        else:
            if len(args) != 2 or not args[0] < args[1]:
                raise ConfigError(
                    f"tune.space.{key}: {kind} needs [low, high] with low < high, got {args}"
                )
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"tune.space.{key}: loguniform needs low > 0, got {args}")
            if kind == "randint":  # every integer of a small range, else both ends
                lo, hi = int(args[0]), int(args[1])
                probes = list(range(lo, hi)) if hi - lo <= 64 else [lo, hi - 1]
            else:
                probes = list(args)
        for value in probes:
            trial_config(base, {key: value}, f"tune.space.{key}")
        space[key] = SAMPLERS[kind](args)
    return space


def _trainable(params: dict[str, Any]) -> None:
    """One trial: the ordinary training run on one process or, with tune.workers_per_trial >
    1, on a Ray Train worker group; either way it reports each validation to Tune."""
    base, sweep, parent = params.pop("__base"), params.pop("__sweep"), params.pop("__parent")
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(
        base,
        {
            **params,
            "name": f"{sweep}-{trial_id}",
            "train.resume": "never",
            "train.out_dir": str(Path(base["train"]["out_dir"]) / sweep / "trials"),
            "tracking.log_model": False,
        },
    )
    done = Path(cfg.train.out_dir) / cfg.name / "metrics.json"
    if done.exists():
        # finished before the driver died but after Tune last saved its state (every 10 s):
        # replay its validations instead of training it again
        for row in json.loads(done.read_text())["validation"]:
            tune.report(row)
        return
    tags = {"trial": trial_id}
    workers = cfg.tune.workers_per_trial
    if workers == 1:
        _train_trial(cfg, parent, tags, tune.report, main=True)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # Ray Train starts the workers' process group (gloo, or NCCL with GPUs) on a port of its
    # own choosing per trial, so concurrent trials on one node never clash
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "parent": parent, "tags": tags},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.tune.gpus_per_trial > 0,
            resources_per_worker={
                "CPU": (cfg.tune.cpus_per_trial - DRIVER_CPUS) / workers,
                "GPU": cfg.tune.gpus_per_trial / workers,
            },
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(Path(cfg.train.out_dir).resolve() / "ray_train"),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a multi-process trial (Ray Train has joined its process group)."""
    from ray import train as ray_train

    cfg = validate(loop_config["cfg"], "sweep trial")
    main = ray_train.get_context().get_world_rank() == 0
    _train_trial(cfg, loop_config["parent"], loop_config["tags"], ray_train.report, main)


def _train_trial(cfg: Config, parent: str | None, tags: dict, send, main: bool) -> None:
    """The training run of a trial (or of one of its workers); ``send`` reports to Tune."""
    from pipeline.evaluate.metrics import validation_row
    from pipeline.track.tracking import Tracker
    from pipeline.train.loop import train

    def report(step: int, val: dict) -> None:
        send({"step": step, "val_loss": val["loss"], **validation_row(val)})

    train(cfg, report=report, tracker=Tracker(cfg, active=main, parent_run_id=parent, tags=tags))


def sweep(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg``; returns the results table and best config."""
    space = check_space(cfg)
    out = Path(cfg.train.out_dir).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    address = ray_address(cfg)
    local = is_local(address)
    # Ray read its multi-machine switch when it was imported: a new local instance started
    # after an import that came before ray_env.prepare would listen on every interface
    if not address and getattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False):
        raise UserError(
            "ray was imported before pipeline.track.ray_env.prepare: a local Ray instance "
            "would listen on every interface; call prepare(address) first (launch/tune.py does)"
        )
    env_vars = {
        k: os.environ[k]
        for k in (
            "DS_ACCELERATOR",
            "MLFLOW_DISABLE_TELEMETRY",
            "MLFLOW_TRACKING_URI",
            "OMP_NUM_THREADS",
        )
        if k in os.environ
    }
    env_vars["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    # a local instance, or a head on this machine, talks over loopback only
    ray.init(
        address=address or "local",  # "local": a new instance, never a stale one found on disk
        num_cpus=None if address else cfg.tune.num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
        log_to_driver=False,
        ignore_reinit_error=True,
        _node_ip_address="127.0.0.1" if local else None,
    )
    tracker = SweepTracker(cfg, out)
    try:
        parent = tracker.start()
        base = cfg.model_dump(mode="json")
        base["train"]["out_dir"] = str(Path(cfg.train.out_dir).resolve())
        base["data"]["store"] = str(Path(cfg.data.store).resolve())
        param_space = {**space, "__base": base, "__sweep": cfg.name, "__parent": parent}
        if cfg.tracking.enabled:  # one absolute URI: each trial runs in its own directory
            base["tracking"]["uri"] = tracking_uri(cfg)
        resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
        if cfg.tune.workers_per_trial > 1:  # the trial's own process only drives its workers
            resources = {"cpu": DRIVER_CPUS}
        trainable = tune.with_resources(_trainable, resources)
        storage = str(out / "ray")
        if cfg.tune.resume and tune.Tuner.can_restore(os.path.join(storage, cfg.name)):
            tuner = tune.Tuner.restore(
                os.path.join(storage, cfg.name),
                trainable,
                resume_errored=False,
                param_space=param_space,
            )
        else:
            # one report per evaluation; max_t beyond the last report, so that trials which
            # ASHA keeps finish their run (test evaluation, metrics.json) instead of being cut
            evaluations = -(-cfg.train.steps // cfg.train.eval_every)
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=evaluations + 1,
                grace_period=cfg.tune.grace_period,
                reduction_factor=cfg.tune.reduction_factor,
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric,
                    mode=cfg.tune.mode,
                    scheduler=scheduler,
                    num_samples=cfg.tune.num_samples,
                    max_concurrent_trials=cfg.tune.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=storage,
                    verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                ),
            )
        grid = tuner.fit()
        summary = _summarise(grid, cfg)
        (out / "trials.json").write_text(json.dumps(summary["trials"], indent=2))
        if summary["best"] is not None:
            best_cfg = trial_config(base, {**summary["best"]["params"], "name": f"{cfg.name}-best"})
            path = out / "best.yaml"
            path.write_text(yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))
            summary["best_yaml"] = str(path)
        tracker.finish(summary)
        return summary
    finally:
        tracker.close()
        ray.shutdown()


def _ratio_to_oracle(cfg: Config, trial_id: str | None) -> float | None:
    """The test CRPS of a finished trial as a ratio to the Bayes limit (synthetic stores; see
    pipeline/evaluate/oracle.py), from its metrics.json; None where there is none."""
    if trial_id is None:
        return None
    done = Path(cfg.train.out_dir) / cfg.name / "trials" / f"{cfg.name}-{trial_id}"
    path = done / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["test"].get("ratio_to_oracle", {}).get("mean")


def _summarise(grid, cfg: Config) -> dict[str, Any]:
    """Per trial: params, best validation metric, status, the test CRPS's ratio to the Bayes
    limit (synthetic stores); best trial per kernel family."""
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "min" else -1)
    trials = []
    for result in grid:
        params = {k: v for k, v in result.config.items() if not k.startswith("__")}
        row = {
            "params": params,
            "family": params.get("model.kernel", cfg.model.kernel),
            "status": "error" if result.error else "ok",
            "metric": None,
            "evaluations": 0,
            "val_mae": None,
            "val_crps": None,
            "ratio_to_oracle": _ratio_to_oracle(cfg, (result.metrics or {}).get("trial_id")),
            "trial": result.path.rsplit("/", 1)[-1],
        }
        df = result.metrics_dataframe
        if df is not None and metric in df:
            i = (sign * df[metric]).idxmin()
            row.update(
                metric=float(df[metric][i]),
                evaluations=int(len(df)),
                val_mae=float(df["val_mae"][i]),
                val_crps=float(df["val_crps"][i]),
            )
        trials.append(row)
    done = [t for t in trials if t["metric"] is not None]
    by_family: dict[str, dict] = {}
    for t in sorted(done, key=lambda t: sign * t["metric"]):
        by_family.setdefault(t["family"], t)
    best = min(done, key=lambda t: sign * t["metric"]) if done else None
    table = [
        f"| family | {metric} | val MAE | val CRPS | test CRPS / Bayes limit | evaluations | "
        "trials |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, t in sorted(by_family.items(), key=lambda kv: sign * kv[1]["metric"]):
        n = sum(1 for x in trials if x["family"] == family)
        ratio = "-" if t["ratio_to_oracle"] is None else f"{t['ratio_to_oracle']:.3f}"
        table.append(
            f"| {family} | {t['metric']:.4f} | {t['val_mae']:.4f} | "
            f"{t['val_crps']:.4f} | {ratio} | {t['evaluations']} | {n} |"
        )
    failed = [t for t in trials if t["status"] == "error"]
    return {
        "trials": trials,
        "by_family": by_family,
        "best": best,
        "table": "\n".join(table),
        "failed": failed,
    }
