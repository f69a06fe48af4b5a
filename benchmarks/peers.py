"""Side by side with published models (docs/peers.md).

For each data set (``configs/los_loop.yaml``, ``configs/aqi36.yaml``, the synthetic regimes
``configs/regimes/noisy.yaml`` and ``unseen.yaml``; stores made by ``launch/preprocess.py``
when missing) and each model, several seeds of the ordinary training job (``launch/train.py``,
one process, tracking off) with the same budget of optimiser steps (``--steps``, the same for
every model) and batch: our spatially-informed transformer (the config's kernel, and with
``--family-sweep`` the best family of a one-seed sweep), ours with kernel ``none``, and the
peers of torch-spatiotemporal
(pipeline/model/peers.py: Graph WaveNet, DCRNN, AGCRN, STID; ``pip install
--no-build-isolation -e ".[peers]"``). Every model reads the same windows of the same store and
is scored by the same code: MAE, RMSE, MAPE and CRPS per horizon step (a point forecast's CRPS
is its MAE), parameters, training time per step and inference time per window. The last value
and train mean baselines come from the same runs' metrics; the historical average (each
sensor's train-split mean at the target's time of day) is computed here from the store, on
the same test windows and observed cells.

Reported per data set: mean +- sd over seeds at the reporting horizons, and Diebold-Mariano
tests (HLN) of ours against each other model on the per-window MAE and CRPS of the common test
windows, each averaged over seeds (pipeline/evaluate/compare.py).

A peer that the pipeline refuses on a data set (an embedding per sensor, with held-out
sensors) is reported as "cannot". ``--train-only`` trains and stops (a GPU machine), for a
later summary of the same run directories elsewhere.

Usage: python benchmarks/peers.py [--datasets los_loop aqi36] [--models ours none stid ...]
       [--seeds 0 1 2] [--steps 300] [--out runs/peers] [--jobs 1] [--family-sweep]
       [--train-only] [--json FILE] [--keep] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers_report import plot, summarise, table  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.data.stream import WindowStream  # noqa: E402
from pipeline.evaluate.compare import load_run  # noqa: E402
from pipeline.kernels import FAMILIES  # noqa: E402

FLAT = "model.daily_profile=false"
EMA = "train.ema_decay=0.998"  # about the last 500 steps
MODELS = {
    "ours": [],  # the config's model: with each sensor's daily profile
    "none": ["model.kernel=none"],
    "ours_no_profile": [FLAT],  # what the profile adds
    "none_no_profile": ["model.kernel=none", FLAT],
    "ours_emb": ["model.node_embedding=true", FLAT],  # an embedding per sensor, as STID's
    "ours_nemb": ["model.node_embedding=true"],  # the same, with the daily profile
    "ours_t1": ["model.temporal_layers=1"],  # attention over the window's steps
    "ours_kh2": ["model.kernel_heads=2"],  # the kernel in 2 heads of each layer, 2 plain
    "ours_kr": ["model.kriged_inputs=true"],  # missing inputs kriged under the field estimate
    "ours_ks": ["model.kriged_smoothing=true"],  # the window kriged without the nugget, beside it
    "ours_ema": [EMA],  # validated, tested and exported: the weights' moving average
    "none_ema": ["model.kernel=none", EMA],
    "stid": ["model.peer=stid", "train.loss=mae", FLAT],
    "graph_wavenet": ["model.peer=graph_wavenet", "train.loss=mae", FLAT],
    "dcrnn": ["model.peer=dcrnn", "train.loss=mae", FLAT],
    "agcrn": ["model.peer=agcrn", "train.loss=mae", FLAT],
    # ours with another covariance family (--family-sweep)
    **{f"kernel_{family}": [f"model.kernel={family}"] for family in FAMILIES},
}
PEERS = ("stid", "graph_wavenet", "dcrnn", "agcrn")
# the peers' papers' learning rates (STID: Shao et al. 2022; Graph WaveNet: Wu et al. 2019;
# DCRNN: Li et al. 2018; AGCRN: Bai et al. 2020); ours and its variants: the config's
PAPER_LR = {"stid": 2e-3, "graph_wavenet": 1e-3, "dcrnn": 1e-2, "agcrn": 3e-3}
LR_FACTORS = (0.5, 1.0, 2.0)  # the grid of every model: half, its reference, double
CONFIGS = {
    "los_loop": "configs/los_loop.yaml",
    "aqi36": "configs/aqi36.yaml",
    # the synthetic regimes of docs/limit.md (stores made here): noise at 1.5x the sill, and 20 %
    # of the sensors held out of training, scored at test time
    "noisy": "configs/regimes/noisy.yaml",
    "unseen": "configs/regimes/unseen.yaml",
}
# reporting horizons in steps of each data set: Los-loop (5 min) 15/30/60 min, AQI-36 (1 h)
# 1/3/6 h, the synthetic regimes (5 min) 15/30/60 min
HORIZONS = {
    "los_loop": {"15 min": 3, "30 min": 6, "60 min": 12},
    "aqi36": {"1 h": 1, "3 h": 3, "6 h": 6},
    "noisy": {"15 min": 3, "30 min": 6, "60 min": 12},
    "unseen": {"15 min": 3, "30 min": 6, "60 min": 12},
}


def sh(cmd: list[str]) -> str:
    """Run a job of the pipeline; its last lines on failure."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Budget:
    """How long every model trains: the protocol (``steps`` None: a validation every epoch or
    every ``eval_steps`` steps, whichever comes first; early stopping after ``patience``
    validations without a lower validation MAE; at most ``max_epochs``; the best validation
    weights tested), or a fixed number of ``steps`` (the short-budget appendix: one
    validation at the end, the last weights)."""

    steps: int | None = None
    max_epochs: int = 40
    patience: int = 10
    eval_steps: int = 100

    @property
    def tag(self) -> str:
        return f"conv{self.patience}x{self.eval_steps}" if self.steps is None else str(self.steps)

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps per model"
        return (
            f"to convergence: a validation every epoch or {self.eval_steps} steps, early "
            f"stopping after {self.patience} validations without a lower MAE, at most "
            f"{self.max_epochs} epochs"
        )

    def overrides(self, per_epoch: int) -> list[str]:
        if self.steps is not None:
            return [f"train.steps={self.steps}", f"train.eval_every={self.steps}"]
        return [
            f"train.steps={self.max_epochs * per_epoch}",
            f"train.eval_every={min(per_epoch, self.eval_steps)}",
            f"train.patience={self.patience}",
            "train.monitor=mae",
            "train.restore_best=true",
        ]


def steps_per_epoch(name: str) -> int:
    """Optimiser steps in one pass over a data set's train windows (one process, the config's
    batch and tiles)."""
    cfg = load_config(ROOT / CONFIGS[name])
    store = open_store(ROOT / cfg.data.store)
    stream = WindowStream(
        store,
        "train",
        cfg.data.time_in,
        cfg.data.horizon,
        cfg.train.batch_size,
        min(cfg.model.knn, store["neighbours"].shape[1]),
        tile_size=cfg.data.tile_size,
        hops=cfg.model.layers,
        holdout=cfg.data.holdout_sensors,
    )
    return len(stream.shard_batches(0, 0, 1))


# ours (and `none`): the reference of the grid; the real-data configs carry the rate this
# grid chose (configs/los_loop.yaml 4e-3; aqi36.yaml 1e-3, over 3 seeds), so the grid stays
# the documented one
OWN_LR = 2e-3


def reference_lr(name: str, model: str) -> float:
    """A model's reference learning rate: its paper's for a peer, :data:`OWN_LR` for ours."""
    return PAPER_LR.get(model, OWN_LR)


def plan(
    name: str,
    models: list[str],
    seeds: list[int],
    budget: Budget,
    out: Path,
    lr: dict[str, float] | None = None,
):
    """The run directories of each model on one data set (at learning rate ``lr[model]``, by
    default the reference one), the training commands of those not yet finished, and the
    models the pipeline refuses there, with its reason (a peer with an embedding per sensor
    cannot forecast held-out sensors)."""
    config = ROOT / CONFIGS[name]
    cfg = load_config(config)
    if not (ROOT / cfg.data.store / "COMPLETE").exists():
        sh([sys.executable, "launch/preprocess.py", "--config", str(config)])
    per_epoch = steps_per_epoch(name)
    runs: dict[str, list[Path]] = {}
    todo: list[list[str]] = []
    cannot: dict[str, str] = {}
    for model in models:
        try:
            load_config(config, MODELS[model])
        except ConfigError as err:
            cannot[model] = str(err).split("Value error, ")[-1]  # the reason, not the config
            continue
        rate = (lr or {}).get(model, reference_lr(name, model))
        for seed in seeds:
            run = f"{name}-{model}-{budget.tag}-lr{rate:g}-s{seed}"
            runs.setdefault(model, []).append(out / run)
            if (out / run / "metrics.json").exists():
                continue
            todo.append(
                [
                    sys.executable,
                    "launch/train.py",
                    "--config",
                    str(config),
                    f"name={run}",
                    f"train.out_dir={out}",
                    *budget.overrides(per_epoch),
                    f"train.checkpoint_every={budget.max_epochs * per_epoch}",
                    f"train.lr={rate}",
                    f"train.seed={seed}",
                    "train.resume=never",
                    "tracking.enabled=false",
                    "train.oracle=false",  # the synthetic stores' Bayes limit: docs/limit.md
                    *MODELS[model],
                ]
            )
    return runs, todo, cannot


def best_validation(run: Path) -> float:
    """The run's best validation MAE (the monitored metric of the protocol)."""
    return min(row["val_mae"] for row in load_run(run)[0]["validation"])


def choose_lr(name: str, models: list[str], seeds: list[int], budget: Budget, out: Path, jobs: int):
    """Each model's learning rate, chosen on validation from the same-size grid (its reference
    rate times LR_FACTORS) by the mean over ``seeds`` of each run's best validation MAE (one
    seed by default; docs/peers.md: on AQI-36 one seed's choice was noise); returns the chosen
    rates and every grid point's mean best validation MAE."""
    grid = {m: [reference_lr(name, m) * f for f in LR_FACTORS] for m in models}
    plans = [plan(name, models, seeds, budget, out, {m: g[i] for m, g in grid.items()}) for i in
             range(len(LR_FACTORS))]  # fmt: skip
    train_all([cmd for _, todo, _ in plans for cmd in todo], jobs)
    scores: dict[str, dict[str, float]] = {}
    for i, (runs, _, _) in enumerate(plans):
        for model, dirs in runs.items():
            mean = sum(best_validation(run) for run in dirs) / len(dirs)
            scores.setdefault(model, {})[f"{grid[model][i]:g}"] = mean
    chosen = {m: float(min(v, key=v.get)) for m, v in scores.items()}
    return chosen, scores


def family_sweep(name: str, seed: int, budget: Budget, out: Path, jobs: int) -> dict:
    """A short sweep of our kernel family on one data set: one seed of ours with every family
    of pipeline/kernels.py (the config's is ``ours``), scored by the final validation MAE; the
    best, and each one's validation and test MAE."""
    own = load_config(ROOT / CONFIGS[name]).model.kernel
    models = ["ours", *(f"kernel_{f}" for f in FAMILIES if f != own)]
    runs, todo, _ = plan(name, models, [seed], budget, out)
    train_all(todo, jobs)
    scores = {}
    for model, (run,) in runs.items():
        metrics = load_run(run)[0]
        family = own if model == "ours" else model.removeprefix("kernel_")
        scores[family] = {
            "model": model,
            "val_mae": best_validation(run),
            "test_mae": metrics["test"]["mean"]["mae"],
        }
    best = min(scores, key=lambda f: scores[f]["val_mae"])
    return {"seed": seed, "scores": scores, "best": best, "best_model": scores[best]["model"]}


def train_all(todo: list[list[str]], jobs: int) -> None:
    """Every training command, ``jobs`` at once (more than one on a GPU with room to spare:
    faster, but each run's seconds per step then include the others' load). A failed run does
    not stop the others; the failures are reported at the end."""
    failed = []
    with (
        ThreadPoolExecutor(max_workers=jobs) as pool,
        tqdm(total=len(todo), desc="training runs") as bar,
    ):
        for done in as_completed([pool.submit(sh, cmd) for cmd in todo]):
            try:
                done.result()
            except SystemExit as err:
                failed.append(str(err))
            bar.update(1)
    if failed:
        raise SystemExit("\n\n".join(failed))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=list(HORIZONS), choices=list(HORIZONS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a fixed budget of optimiser steps for every model, at its reference learning "
        "rate (the short-budget appendix); default: the protocol (to convergence)",
    )
    parser.add_argument("--max-epochs", type=int, default=Budget.max_epochs)
    parser.add_argument(
        "--patience", type=int, default=Budget.patience, help="validations without a lower MAE"
    )
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=Budget.eval_steps,
        help="steps between validations, "
        "at most (a validation every epoch where an epoch is shorter)",
    )
    parser.add_argument(
        "--lr-seeds",
        type=int,
        default=1,
        help="seeds (the first of --seeds) whose mean best validation MAE chooses each "
        "model's learning rate",
    )
    parser.add_argument("--out", default="runs/peers")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the other data sets' results already in --json"
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train the runs, no summary (runs made on another machine, summarised later)",
    )
    parser.add_argument(
        "--family-sweep",
        action="store_true",
        help="first one seed of ours with every kernel family; the best by validation MAE, "
        "if not the config's, then joins the models with every seed",
    )
    args = parser.parse_args()
    if "ours" not in args.models and not args.train_only:
        args.models.insert(0, "ours")  # everything is compared with it
    budget = Budget(args.steps, args.max_epochs, args.patience, args.eval_steps)
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs; {budget.describe()}; seeds {args.seeds}",
        flush=True,
    )
    t0 = time.perf_counter()
    out = ROOT / args.out
    sweeps, plans, grids = {}, {}, {}
    for name in args.datasets:
        models = list(args.models)
        if args.family_sweep:
            sweeps[name] = family_sweep(name, args.seeds[0], budget, out, args.jobs)
            if sweeps[name]["best_model"] not in models:
                models.append(sweeps[name]["best_model"])
        chosen = None
        if budget.steps is None:  # each model's learning rate, chosen on validation
            lr_seeds = args.seeds[: args.lr_seeds]
            chosen, grids[name] = choose_lr(name, models, lr_seeds, budget, out, args.jobs)
        plans[name] = plan(name, models, args.seeds, budget, out, chosen)
    for name, (_, _, cannot) in plans.items():
        for model, why in cannot.items():
            print(f"{name}: {model} cannot run: {why}")
    train_all([cmd for _, todo, _ in plans.values() for cmd in todo], args.jobs)
    if args.train_only:
        print(f"\ntrained in {time.perf_counter() - t0:.0f} s")
        return
    results = [
        {
            **summarise(
                name,
                runs,
                HORIZONS[name],
                steps_per_epoch(name),
                load_config(ROOT / CONFIGS[name]).data.holdout_sensors is not None,
                load_config(ROOT / CONFIGS[name]).data.time_in,
            ),
            "cannot": cannot,
            "family_sweep": sweeps.get(name),
            "budget": budget.describe(),
            "steps": budget.steps,  # None: the protocol
            "max_epochs": budget.max_epochs,
            "patience_validations": budget.patience,
            "eval_steps": budget.eval_steps,
            "steps_per_epoch": steps_per_epoch(name),
            "lr_grid": grids.get(name),
            "lr_seeds": args.seeds[: args.lr_seeds],
            "seeds": args.seeds,
        }
        for name, (runs, _, cannot) in plans.items()
    ]
    if args.keep and args.json and Path(args.json).exists():
        results = [
            r
            for r in json.loads(Path(args.json).read_text())
            if r["dataset"] not in args.datasets or r["steps"] != budget.steps  # another budget
        ] + results
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"\n## {result['dataset']}, {result.get('budget', result['steps'])}\n")
        print(table(result, PEERS))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot(results, Path(args.plot), [*MODELS, "historical_average", "fitted_gp"])


if __name__ == "__main__":
    main()
