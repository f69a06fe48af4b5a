"""Distance to the Bayes limit by regime (docs/limit.md): where does the spatial prior matter?

For each regime of ``configs/regimes/`` (a synthetic field with known truth), the product's
training job (``launch/train.py``, one process, tracking off, the regime config's steps) trains
three models over several seeds:

- ``kernel + knn``: the geostatistical prior over the k nearest sensors (the regime's model);
- ``none + knn``: no kernel, the same neighbourhoods (neighbourhoods are a spatial prior too);
- ``none + dense``: no kernel, every sensor attends to every other (a plain transformer).

Every figure comes from the runs' own ``metrics.json`` and ``test_windows.npz``: the exact
window oracle (pipeline/evaluate/oracle.py) and the fitted Gaussian process
(pipeline/evaluate/gp.py), computed once per regime (by the first run: the same store and
test windows for all), the last-value and train-mean baselines, the test CRPS, Moran's I of the
sensors' mean residuals and the run's estimate of the field's covariance (``kernel_estimate``,
model.variography). In the ``unseen`` regime (``data.holdout_sensors``) every method is scored
on the held-out sensors alone (baselines there: not reported). Reported per regime and method:
CRPS and its ratio to the oracle's (mean +- sd over seeds); Diebold-Mariano tests of
``kernel + knn`` against each control on the per-window CRPS averaged over seeds; the range
estimate against the truth. The field is the same for every seed: seeds vary the training.

``--lr-grid``: each method's learning rate is first chosen on validation, as in docs/peers.md:
seed 0 at the config's ``train.lr`` times ``LR_FACTORS`` (half, the config's, double; the
kernel parameters keep their ``train.kernel_lr``), the rate with the lowest best validation MAE
kept, then every seed at it. Without it every method trains at the config's rate.

Runs are resumable: a run directory with its ``metrics.json`` is not trained again.

Usage: python benchmarks/limit.py [--regimes noisy ...] [--seeds 0 1 2] [--steps N]
       [--lr-grid] [--out runs/limit] [--jobs 1] [--json FILE] [--keep] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import LR_FACTORS, best_validation, sh, train_all  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.compare import load_run  # noqa: E402
from pipeline.evaluate.metrics import diebold_mariano  # noqa: E402

MODELS = {
    "kernel + knn": [],
    "none + knn": ["model.kernel=none", "model.anisotropy=false"],
    "none + dense": ["model.kernel=none", "model.anisotropy=false", "model.backend=dense"],
}
CONTROLS = ("none + knn", "none + dense")
BASELINES = ("last_value", "train_mean", "fitted_gp")


def slug(method: str) -> str:
    return method.replace(" + ", "-")


def plan(
    regime: str,
    seeds: list[int],
    steps: int | None,
    out: Path,
    lr: dict[str, float] | None = None,
):
    """The run directories per method and the commands of the runs not yet finished (at
    learning rate ``lr[method]`` where given: the rate joins the run's name); the first run of
    the regime computes the oracle and the fitted GP."""
    config = ROOT / "configs" / "regimes" / f"{regime}.yaml"
    cfg = load_config(config)
    if not (ROOT / cfg.data.store / "COMPLETE").exists():
        sh([sys.executable, "launch/preprocess.py", "--config", str(config)])
    runs: dict[str, list[Path]] = {}
    todo = []
    for method in MODELS:
        rate = (lr or {}).get(method)
        for seed in seeds:
            tag = f"-lr{rate:g}" if rate is not None else ""
            run = out / f"{regime}-{slug(method)}{tag}-s{seed}"
            runs.setdefault(method, []).append(run)
            first = method == "kernel + knn" and seed == seeds[0]
            if (run / "metrics.json").exists():
                continue
            todo.append(
                [
                    sys.executable, "launch/train.py", "--config", str(config),
                    f"name={run.name}", f"train.out_dir={out}", f"train.seed={seed}",
                    "train.resume=never", "tracking.enabled=false",
                    f"train.oracle={str(first).lower()}", f"train.fitted_gp={str(first).lower()}",
                    *([f"train.steps={steps}"] if steps else []),
                    *([f"train.lr={rate}"] if rate is not None else []), *MODELS[method],
                ]
            )  # fmt: skip
    return runs, todo


def choose_lr(regime: str, seed: int, steps: int | None, out: Path, jobs: int):
    """Each method's learning rate on validation: ``seed`` at the config's rate times
    LR_FACTORS, the lowest best validation MAE kept; returns the chosen rates and every grid
    point's best validation MAE per method."""
    base = load_config(ROOT / "configs" / "regimes" / f"{regime}.yaml").train.lr
    grid = [base * f for f in LR_FACTORS]
    plans = [plan(regime, [seed], steps, out, dict.fromkeys(MODELS, rate)) for rate in grid]
    train_all([cmd for _, todo in plans for cmd in todo], jobs)
    scores: dict[str, dict[str, float]] = {}
    for rate, (runs, _) in zip(grid, plans, strict=True):
        for method in MODELS:
            scores.setdefault(method, {})[f"{rate:g}"] = best_validation(runs[method][0])
    chosen = {m: float(min(v, key=v.get)) for m, v in scores.items()}
    return chosen, scores


def summarise(regime: str, runs: dict[str, list[Path]]) -> dict:
    """The regime's table rows from its runs' metrics and per-window losses."""
    cfg = load_config(ROOT / "configs" / "regimes" / f"{regime}.yaml")
    held_out = bool(cfg.data.holdout_sensors)
    first = load_run(runs["kernel + knn"][0])[0]
    window = first["oracle"]["window"]
    oracle_crps = window["unseen"]["crps"] if held_out else window["mean"]["crps"]
    syn = cfg.data.synthetic
    truth = {
        "family": syn.family,
        "range_km": syn.range_km,
        "nugget_fraction": syn.nugget / (syn.variance + syn.nugget),
    }
    if syn.anisotropy_ratio < 1:
        truth |= {"angle_deg": syn.anisotropy_angle_deg, "axis_ratio": syn.anisotropy_ratio}
    out: dict = {
        "regime": regime,
        "sensors": syn.num_sensors,
        "scored": "held-out sensors" if held_out else "all sensors",
        "truth": truth,
        "oracle": {"crps": oracle_crps, "morans_i": window["morans_i"]},
        "methods": {},
    }
    gp = first["fitted_gp"] or {}
    for name in BASELINES if not held_out else ("fitted_gp",):
        if name == "fitted_gp":
            crps = gp.get("unseen" if held_out else "mean", {}).get("crps")
            if crps is None:
                continue
            out["fitted_gp_fit"] = gp["fit"]
        else:
            crps = first["test"]["baselines"][name]["crps"]
        out["methods"][name] = {"crps": [crps], "ratio": [crps / oracle_crps]}
    per_window = {}
    for method, dirs in runs.items():
        rows = [load_run(d) for d in dirs]
        tests = [m["test"]["unseen"] if held_out else m["test"] for m, _ in rows]
        crps = [t["mean"]["crps"] for t in tests]
        key = "unseen_crps" if held_out else "crps"
        per_window[method] = np.mean([w[key] for _, w in rows], axis=0)
        out["methods"][method] = {
            "crps": crps,
            "ratio": [c / oracle_crps for c in crps],
            "morans_i": [m["test"]["morans_i"]["I"] for m, _ in rows],
            "estimate": [m["kernel_estimate"] for m, _ in rows if m.get("kernel_estimate")],
            "steps": [m["steps"] for m, _ in rows],
            "fit_s": [m["timing"]["fit_wall_s"] for m, _ in rows],
        }
    out["dm_kernel_vs"] = {
        c: diebold_mariano(per_window["kernel + knn"] - per_window[c], cfg.data.horizon)
        for c in CONTROLS
    }
    est = out["methods"]["kernel + knn"]["estimate"]
    if est:
        errors = [abs(e["range_km"] / truth["range_km"] - 1) for e in est]
        out["range_error"] = {"per_seed": errors, "within_15pc": all(e <= 0.15 for e in errors)}
    return out


def pm(values: list[float], fmt: str = ".4f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} +- {np.std(values, ddof=1):{fmt}}"


def estimate_cell(res: dict, row: dict) -> str:
    if not row.get("estimate"):
        return ""
    truth = res["truth"]
    cell = ", ".join(f"{e['range_km']:.1f}" for e in row["estimate"])
    cell += f" ({truth['range_km']:g}); nugget " + ", ".join(
        f"{e['nugget']:.2f}" for e in row["estimate"]
    )
    cell += f" ({truth['nugget_fraction']:.2f})"
    if "angle_deg" in row["estimate"][0]:
        angles = ", ".join(f"{e['angle_deg']:.0f}" for e in row["estimate"])
        ratios = ", ".join(f"{e['axis_ratio']:.2f}" for e in row["estimate"])
        cell += f"; angle {angles} ({truth['angle_deg']:g}); ratio {ratios} "
        cell += f"({truth['axis_ratio']:g})"
    return cell


def table(results: list[dict]) -> str:
    lines = [
        "| regime | method | CRPS (mean +- sd) | ratio to oracle | Moran's I (oracle's) | "
        "range estimate km (truth); nugget fraction (truth) | s per fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        oi = res["oracle"]["morans_i"]
        oracle_i = f"{oi['I']:.3f}" if oi.get("testable") else "-"
        lines.append(
            f"| {res['regime']} ({res['scored']}) | oracle (window) | "
            f"{res['oracle']['crps']:.4f} | 1 | {oracle_i} | | |"
        )
        for name, row in res["methods"].items():
            moran = f"{np.mean(row['morans_i']):.3f} ({oracle_i})" if "morans_i" in row else ""
            fit_s = f"{np.mean(row['fit_s']):.0f}" if "fit_s" in row else ""
            lines.append(
                f"| | {name} | {pm(row['crps'])} | {pm(row['ratio'], '.3f')} | {moran} | "
                f"{estimate_cell(res, row)} | {fit_s} |"
            )
    lines += [
        "",
        "| regime | kernel + knn vs | DM statistic (seed-averaged per-window CRPS) | p |",
        "|---|---|---|---|",
    ]
    for res in results:
        for c, dm in res["dm_kernel_vs"].items():
            stat = f"{dm['statistic']:+.2f}" if dm["testable"] else dm["reason"]
            p = f"{dm['p_value']:.2g}" if dm["testable"] else "-"
            lines.append(f"| {res['regime']} | {c} | {stat} | {p} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*MODELS, "fitted_gp"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = np.arange(len(results)) + (i - (len(names) - 1) / 2) * width
        ratio = [np.mean(r["methods"].get(name, {"ratio": [np.nan]})["ratio"]) for r in results]
        sd = [
            np.std(r["methods"][name]["ratio"], ddof=1)
            if len(r["methods"].get(name, {}).get("ratio", [])) > 1
            else 0.0
            for r in results
        ]
        ax.bar(xs, ratio, width, yerr=sd, label=name, capsize=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.02, color="k", lw=0.8, ls="--", label="target 1.02")
    ax.set_xticks(np.arange(len(results)), [r["regime"] for r in results])
    ax.set_ylabel("CRPS / window oracle's")
    top = np.nanmax([np.mean(r["methods"][n]["ratio"]) for r in results for n in MODELS])
    ax.set_ylim(0.98, min(top * 1.03, 2.5))
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    every = sorted(p.stem for p in (ROOT / "configs" / "regimes").glob("*.yaml"))
    parser.add_argument("--regimes", nargs="+", default=every, choices=every)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (config's)")
    parser.add_argument(
        "--lr-grid", action="store_true", help="each method's learning rate chosen on validation"
    )
    parser.add_argument("--out", default="runs/limit")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the other regimes' results already in --json"
    )
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    print(
        f"# {platform.machine()}, {platform.processor() or '?'}; the product's training job, "
        f"{args.jobs} at once; seeds {args.seeds}; regimes {', '.join(args.regimes)}",
        flush=True,
    )
    t0 = time.perf_counter()
    kept = []
    if args.keep and args.json and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        kept = [r for r in previous if r["regime"] not in args.regimes]
    results = []
    for regime in args.regimes:
        lr, grid = None, None
        if args.lr_grid:
            lr, grid = choose_lr(regime, args.seeds[0], args.steps, out, args.jobs)
            print(f"{regime}: best validation MAE by learning rate (seed {args.seeds[0]}): "
                  f"{grid}; chosen {lr}", flush=True)  # fmt: skip
        runs, todo = plan(regime, args.seeds, args.steps, out, lr)
        train_all(todo, args.jobs)
        results.append(summarise(regime, runs) | ({"lr": lr, "lr_grid": grid} if lr else {}))
        if args.json:
            merged = sorted(kept + results, key=lambda r: r["regime"])
            Path(args.json).write_text(json.dumps(merged, indent=1))
    results = sorted(kept + results, key=lambda r: r["regime"])
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
