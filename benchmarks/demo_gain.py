"""What the kernel gains over ``none`` on the demo's field (docs/variography.md; printed by
``make demo``, which trains one model and so cannot measure it live in its time).

Seeds of the ordinary training job (``launch/train.py``, one process, the config's batch per
step, tracking, the oracle and the fitted GP off) on ``configs/small.yaml`` as shipped: ours
(the config's kernel) and the same model with ``model.kernel=none``; test CRPS and MAE, mean
+- sd over seeds, and Diebold-Mariano (HLN) tests over seeds on the per-window losses of the
common test windows (pipeline/evaluate/compare.py). Resumable: finished runs are kept.

Usage: python benchmarks/demo_gain.py [--seeds 0 1 2] [--jobs 2] [--json docs/demo_gain.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import train_all  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.compare import compare_runs, load_run  # noqa: E402

CONFIG = "configs/small.yaml"
MODELS = {"ours": [], "none": ["model.kernel=none"]}


def command(model: str, seed: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "launch/train.py",
        "--config",
        CONFIG,
        f"name={model}-s{seed}",
        f"train.out_dir={out}",
        f"train.seed={seed}",
        "train.resume=never",
        "tracking.enabled=false",
        "train.oracle=false",
        "train.fitted_gp=false",
        *MODELS[model],
    ]


def spread(runs: list[Path], metric: str) -> dict[str, float]:
    values = [load_run(run)[0]["test"]["mean"][metric] for run in runs]
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values), "seeds": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_gain")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default="docs/demo_gain.json")
    args = parser.parse_args()
    if len(args.seeds) < 3:
        raise SystemExit("--seeds: a comparison over seeds needs at least 3")
    out = ROOT / args.out
    runs = {m: [out / f"{m}-s{seed}" for seed in args.seeds] for m in MODELS}
    todo = [
        command(m, seed, out)
        for m in MODELS
        for seed, run in zip(args.seeds, runs[m], strict=True)
        if not (run / "metrics.json").exists()
    ]
    train_all(todo, args.jobs)
    dm = compare_runs(runs["ours"], runs["none"])
    cfg = load_config(ROOT / CONFIG)
    result = {
        "config": CONFIG,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "processes": 1,
        "batch": cfg.train.batch_size,
        "steps": cfg.train.steps,
        "seeds": args.seeds,
        **{m: {k: spread(r, k) for k in ("crps", "mae")} for m, r in runs.items()},
        "dm": {k: dm[k]["dm"] for k in ("crps", "mae")},
    }
    print(
        f"ours CRPS {result['ours']['crps']['mean']:.4f} +- {result['ours']['crps']['sd']:.4f}, "
        f"none {result['none']['crps']['mean']:.4f} +- {result['none']['crps']['sd']:.4f}; "
        f"DM over seeds on CRPS {result['dm']['crps']['statistic']:+.2f} "
        f"(p {result['dm']['crps']['p_value']:.2g}), on MAE "
        f"{result['dm']['mae']['statistic']:+.2f} (p {result['dm']['mae']['p_value']:.2g})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
