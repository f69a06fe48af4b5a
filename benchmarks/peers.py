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
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.data.timefeatures import DAY_NS  # noqa: E402
from pipeline.evaluate.compare import compare_runs, load_run  # noqa: E402
from pipeline.evaluate.metrics import diebold_mariano  # noqa: E402
from pipeline.evaluate.report import dm_text  # noqa: E402
from pipeline.kernels import FAMILIES  # noqa: E402

FLAT = "model.daily_profile=false"
MODELS = {
    "ours": [],  # the config's model: with each sensor's daily profile
    "none": ["model.kernel=none"],
    "ours_no_profile": [FLAT],  # what the profile adds
    "none_no_profile": ["model.kernel=none", FLAT],
    "ours_emb": ["model.node_embedding=true", FLAT],  # an embedding per sensor, as STID's
    "stid": ["model.peer=stid", "train.loss=mae", FLAT],
    "graph_wavenet": ["model.peer=graph_wavenet", "train.loss=mae", FLAT],
    "dcrnn": ["model.peer=dcrnn", "train.loss=mae", FLAT],
    "agcrn": ["model.peer=agcrn", "train.loss=mae", FLAT],
    # ours with another covariance family (--family-sweep)
    **{f"kernel_{family}": [f"model.kernel={family}"] for family in FAMILIES},
}
PEERS = ("stid", "graph_wavenet", "dcrnn", "agcrn")
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


def plan(name: str, models: list[str], seeds: list[int], steps: int, out: Path):
    """The run directories of each model on one data set, the training commands of those not
    yet finished, and the models the pipeline refuses there, with its reason (a peer with an
    embedding per sensor cannot forecast held-out sensors)."""
    config = ROOT / CONFIGS[name]
    cfg = load_config(config)
    if not (ROOT / cfg.data.store / "COMPLETE").exists():
        sh([sys.executable, "launch/preprocess.py", "--config", str(config)])
    runs: dict[str, list[Path]] = {}
    todo: list[list[str]] = []
    cannot: dict[str, str] = {}
    for model in models:
        try:
            load_config(config, MODELS[model])
        except ConfigError as err:
            cannot[model] = str(err).split("Value error, ")[-1]  # the reason, not the config
            continue
        for seed in seeds:
            run = f"{name}-{model}-{steps}-s{seed}"
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
                    f"train.steps={steps}",
                    f"train.seed={seed}",
                    f"train.eval_every={steps}",
                    f"train.checkpoint_every={steps}",
                    "train.resume=never",
                    "tracking.enabled=false",
                    "train.oracle=false",  # the synthetic stores' Bayes limit: docs/limit.md
                    *MODELS[model],
                ]
            )
    return runs, todo, cannot


def family_sweep(name: str, seed: int, steps: int, out: Path, jobs: int) -> dict:
    """A short sweep of our kernel family on one data set: one seed of ours with every family
    of pipeline/kernels.py (the config's is ``ours``), scored by the final validation MAE; the
    best, and each one's validation and test MAE."""
    own = load_config(ROOT / CONFIGS[name]).model.kernel
    models = ["ours", *(f"kernel_{f}" for f in FAMILIES if f != own)]
    runs, todo, _ = plan(name, models, [seed], steps, out)
    train_all(todo, jobs)
    scores = {}
    for model, (run,) in runs.items():
        metrics = load_run(run)[0]
        family = own if model == "ours" else model.removeprefix("kernel_")
        scores[family] = {
            "model": model,
            "val_mae": metrics["validation"][-1]["val_mae"],
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


def historical_average(store_path: Path, origins: np.ndarray, horizon: int) -> dict:
    """Each sensor's train-split mean at the time of day of each target (its train mean where
    that slot was never observed), scored on the test windows at ``origins`` (targets
    origin .. origin + horizon - 1, observed cells only): per horizon step MAE [horizon] and
    per window MAE [windows] with its observed cells."""
    st = open_store(store_path)
    values, mask, time = st["values"][:], st["mask"][:], st["time"][:]  # [T, N, F], [T]
    step = int(time[1] - time[0])
    slot = (time % DAY_NS) // step  # [T] time-of-day slot
    slots = max(DAY_NS // step, 1)
    start, stop = st.split("train")
    total = np.zeros((slots, *values.shape[1:]))  # [slot, N, F]
    count = np.zeros_like(total)
    seen = mask[start:stop]
    np.add.at(total, slot[start:stop], np.where(seen, values[start:stop], 0.0))
    np.add.at(count, slot[start:stop], seen)
    profile = np.where(count > 0, total / np.maximum(count, 1), st["mean"][:][None])
    targets = origins[:, None] + np.arange(horizon)  # [O, horizon] time indices
    y, m = np.nan_to_num(values[targets]), mask[targets]  # [O, horizon, N, F]
    err = np.abs(y - profile[slot[targets]]) * m
    return {
        "per_step": err.sum((0, 2, 3)) / m.sum((0, 2, 3)).clip(min=1),
        "per_window": err.sum((1, 2, 3)) / m.sum((1, 2, 3)).clip(min=1),
        "count": m.sum((1, 2, 3)),
        "mae_all": float(err.sum() / max(m.sum(), 1)),
    }


def summarise(name: str, runs: dict[str, list[Path]]) -> dict:
    horizons = HORIZONS[name]
    rows = {}
    for model, dirs in runs.items():
        ms = [load_run(d)[0] for d in dirs]
        test = [m["test"] for m in ms]

        def stat(values):
            a = np.asarray(values, dtype=float)
            return [float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0]

        rows[model] = {
            "mae": {h: stat([t["mae"][s - 1] for t in test]) for h, s in horizons.items()},
            "crps": {h: stat([t["crps"][s - 1] for t in test]) for h, s in horizons.items()},
            "mae_all": stat([t["mean"]["mae"] for t in test]),
            "rmse_all": stat([t["mean"]["rmse"] for t in test]),
            "mape_all": stat([t["mean"]["mape"] for t in test]),
            "crps_all": stat([t["mean"]["crps"] for t in test]),
            "parameters": ms[0]["parameters"],
            "train_s_per_step": stat([m["timing"]["step_s"] for m in ms]),
            "infer_ms_per_window": stat([1e3 * m["timing"]["test_s_per_window"] for m in ms]),
            "seeds": len(ms),
            "device": ms[0]["device"],  # runs may come from another machine (--train-only)
        }
    for kind in ("last_value", "train_mean"):  # the same in every run: take the first
        base = load_run(runs["ours"][0])[0]["test"]["baselines"][kind]
        rows[kind] = {"mae_all": [base["mae"], 0.0], "crps_all": [base["crps"], 0.0]}
    tests = {
        model: compare_runs(runs["ours"], dirs) for model, dirs in runs.items() if model != "ours"
    }
    ours = [load_run(d) for d in runs["ours"]]
    metrics, windows = ours[0]
    if load_config(ROOT / CONFIGS[name]).data.holdout_sensors:
        # scored on sensors never seen in training: a train-split profile of their own is
        # exactly what they lack
        return {"dataset": name, "horizons": horizons, "rows": rows, "dm_ours_vs": tests}
    horizon = len(metrics["test"]["horizon_steps"])
    ha = historical_average(ROOT / metrics["store"]["path"], windows["origin"], horizon)
    mae = {h: [float(ha["per_step"][s - 1]), 0.0] for h, s in horizons.items()}
    rows["historical_average"] = {
        "mae": mae,
        "crps": mae,
        "mae_all": [ha["mae_all"], 0.0],
        "crps_all": [ha["mae_all"], 0.0],
    }
    ours_mae = np.mean([w["mae"] for _, w in ours], axis=0)  # same origins in every run
    ours_crps = np.mean([w["crps"] for _, w in ours], axis=0)
    tests["historical_average"] = {
        loss: {"dm": diebold_mariano(o - ha["per_window"], horizon)}
        for loss, o in (("mae", ours_mae), ("crps", ours_crps))
    }
    return {"dataset": name, "horizons": horizons, "rows": rows, "dm_ours_vs": tests}


def pm(stat: list[float]) -> str:
    return f"{stat[0]:.3f} +- {stat[1]:.3f}"


def verdicts(result: dict) -> dict[str, str]:
    """Per reporting horizon: ours against the best peer by mean MAE over seeds; a difference
    within one standard error (of the difference of two means over seeds) is a tie."""
    rows, out = result["rows"], {}
    peers = [m for m in rows if m in PEERS and "mae" in rows[m]]
    if not peers:
        return out
    for h in result["horizons"]:
        best = min(peers, key=lambda m: rows[m]["mae"][h][0])
        (a, sa), (b, sb) = rows["ours"]["mae"][h], rows[best]["mae"][h]
        n = rows["ours"]["seeds"]
        se = float(np.sqrt((sa**2 + sb**2) / n))
        word = "tie" if abs(a - b) <= se else ("ours lower" if a < b else f"{best} lower")
        gap = f"{(a - b) / b:+.1%}, SE {se:.3f}"
        out[h] = f"ours {a:.3f} vs best peer {best} {b:.3f} ({gap}): {word}"
    return out


def table(result: dict) -> str:
    hs = list(result["horizons"])
    head = [
        "model",
        *(f"MAE {h}" for h in hs),
        "MAE all",
        "CRPS all",
        "params",
        "s/step",
        "infer ms/window",
        "device",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in result["rows"].items():
        cells = [model]
        cells += [
            f"{r['mae'][h][0]:.3f} +- {r['mae'][h][1]:.3f}" if "mae" in r else "-" for h in hs
        ]
        cells += [pm(r["mae_all"]), pm(r["crps_all"])]
        cells += [f"{r['parameters']:,}" if "parameters" in r else "-"]
        cells += [f"{r['train_s_per_step'][0]:.3f}" if "train_s_per_step" in r else "-"]
        cells += [f"{r['infer_ms_per_window'][0]:.2f}" if "infer_ms_per_window" in r else "-"]
        cells += [r.get("device", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    for model, why in result.get("cannot", {}).items():
        lines.append(f"| {model} | cannot: {why} |")
    lines.append("")
    for h, verdict in verdicts(result).items():
        lines.append(f"{h}: {verdict}")
    lines.append("")
    sweep = result.get("family_sweep")
    if sweep:
        scores = ", ".join(
            f"{f} {v['val_mae']:.3f} ({v['test_mae']:.3f})" for f, v in sweep["scores"].items()
        )
        lines.append(
            f"family sweep, seed {sweep['seed']}, validation MAE (test): {scores}; "
            f"best: {sweep['best']}"
        )
        lines.append("")
    for model, t in result["dm_ours_vs"].items():
        lines.append(
            f"ours vs {model}: MAE {dm_text(t['mae']['dm'])}; CRPS {dm_text(t['crps']['dm'])}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*MODELS, "historical_average"]
    colour = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}  # one per model
    cols = min(len(results), 2)
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results, strict=False):
        hs = list(result["horizons"])
        top = 0.0
        for model, r in result["rows"].items():
            if "mae" not in r:
                continue
            mean = [r["mae"][h][0] for h in hs]
            sd = [r["mae"][h][1] for h in hs]
            baseline = model == "historical_average"
            ax.errorbar(
                hs,
                mean,
                yerr=sd,
                marker="o",
                capsize=3,
                label=model,
                color=colour[model],
                ls="--" if baseline else "-",
            )
            top = top if baseline else max(top, max(mean))
        bottom, upper = ax.get_ylim()
        ax.set_ylim(bottom, min(upper, top * 1.15))  # a far-off baseline leaves the frame
        ax.set_title(f"{result['dataset']}, {result['steps']} steps per model")
        ax.set_xlabel("horizon")
        ax.set_ylabel("test MAE (mean +- sd over seeds)")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=list(HORIZONS), choices=list(HORIZONS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps, every model")
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
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps per model, seeds "
        f"{args.seeds}",
        flush=True,
    )
    t0 = time.perf_counter()
    out = ROOT / args.out
    sweeps, plans = {}, {}
    for name in args.datasets:
        models = list(args.models)
        if args.family_sweep:
            sweeps[name] = family_sweep(name, args.seeds[0], args.steps, out, args.jobs)
            if sweeps[name]["best_model"] not in models:
                models.append(sweeps[name]["best_model"])
        plans[name] = plan(name, models, args.seeds, args.steps, out)
    for name, (_, _, cannot) in plans.items():
        for model, why in cannot.items():
            print(f"{name}: {model} cannot run: {why}")
    train_all([cmd for _, todo, _ in plans.values() for cmd in todo], args.jobs)
    if args.train_only:
        print(f"\ntrained in {time.perf_counter() - t0:.0f} s")
        return
    results = [
        {
            **summarise(name, runs),
            "cannot": cannot,
            "family_sweep": sweeps.get(name),
            "steps": args.steps,
            "seeds": args.seeds,
        }
        for name, (runs, _, cannot) in plans.items()
    ]
    if args.keep and args.json and Path(args.json).exists():
        results = [
            r
            for r in json.loads(Path(args.json).read_text())
            if r["dataset"] not in args.datasets or r["steps"] != args.steps  # another budget
        ] + results
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"\n## {result['dataset']}, {result['steps']} steps\n")
        print(table(result))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
