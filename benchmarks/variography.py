"""The range estimate on real networks beside classical variography (docs/variography.md).

For each data set (``configs/los_loop.yaml``, ``configs/aqi36.yaml``), several seeds of the
product's training job (``launch/train.py``, one process, tracking off, ``--steps`` steps)
with the config's model; per run, its ``kernel_estimate`` (the field's variogram fitted in
training, pipeline/model/variogram.py) beside two GSTools fits of the same train split: of the
normalised values (the estimate's data; the run's correlation figure) and of the fitted GP's
deviations from the daily profile (pipeline/evaluate/gp.py). No truth exists here: the table
shows whether the estimators agree and where they part.

Usage: python benchmarks/variography.py [--datasets los_loop aqi36] [--seeds 0 1 2]
       [--steps 400] [--out runs/variography] [--jobs 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import CONFIGS, Budget, plan, train_all  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.evaluate.compare import load_run  # noqa: E402
from pipeline.evaluate.variography import train_variogram  # noqa: E402


def summarise(name: str, runs: list[Path]) -> dict:
    cfg = load_config(ROOT / CONFIGS[name])
    store = open_store(ROOT / cfg.data.store)
    _, _, normalised = train_variogram(store, cfg.model.kernel)
    metrics = [load_run(run)[0] for run in runs]
    gp = next((m["fitted_gp"]["fit"] for m in metrics if "fit" in (m["fitted_gp"] or {})), None)
    return {
        "dataset": name,
        "family": cfg.model.kernel,
        "sensors": store.shape[1],
        "estimates": [m["kernel_estimate"] for m in metrics],
        "heads": [m["kernel"] for m in metrics],
        "test_mae": [m["test"]["mean"]["mae"] for m in metrics],
        "gstools_normalised": normalised,
        "fitted_gp": gp,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| data set | range estimate km (seeds) | nugget fraction | GSTools, normalised values: "
        "range km, nugget fraction | fitted GP, deviations: family, range km, nugget share |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ranges = ", ".join(f"{e['range_km']:.1f}" for e in r["estimates"])
        nuggets = ", ".join(f"{e['nugget']:.2f}" for e in r["estimates"])
        g = r["gstools_normalised"]
        gs_cell = (
            f"{g['range_km']:.1f}, {g['nugget'] / (g['nugget'] + g['variance']):.2f}" if g else "-"
        )
        f = r["fitted_gp"]
        gp_cell = "-"
        if f:
            share = (f["nugget"] + f["micro"]) / (f["sill"] + f["micro"] + f["nugget"])
            gp_cell = f"{f['family']}, {f['range_km']:.1f}, {share:.2f}"
        lines.append(f"| {r['dataset']} | {ranges} | {nuggets} | {gs_cell} | {gp_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["los_loop", "aqi36"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/variography")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    print(f"# {platform.machine()}; {args.steps} steps; seeds {args.seeds}", flush=True)
    results = []
    for name in args.datasets:
        runs, todo, _ = plan(name, ["ours"], args.seeds, Budget(steps=args.steps), out)
        train_all(todo, args.jobs)
        results.append(summarise(name, runs["ours"]))
    print(table(results))
    print("mean test MAE:", {r["dataset"]: float(np.mean(r["test_mae"])) for r in results})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
