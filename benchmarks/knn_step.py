"""The knn backend's two paths in a real training step: gathered keys and values against all
pairs under the neighbour mask (pipeline/model/attention.py, ``MASKED_SCORES``), on a config's
store, measured in the same run.

Each path trains the config (one process, tracking, the oracle and the fitted GP off) for
``--steps`` steps in its own subprocess, the threshold set before the job starts; reported:
seconds per optimiser step and samples per second from the run's metrics.json, and the ratio.
Alternating repeats (``--repeats``) because the machine is shared.

Usage: python benchmarks/knn_step.py [--config configs/los_loop.yaml] [--steps 100]
       [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_runs import train_steps  # noqa: E402

PATHS = {"gathered": 0, "masked": 2**62}  # MASKED_SCORES: never / always all pairs


def measure(config: str, path: str, steps: int, out: Path, threads: int) -> dict:
    patch = ("pipeline.model.attention", "MASKED_SCORES", PATHS[path])
    return train_steps(config, f"knn-{path}", steps, out, threads, ["model.backend=knn"], patch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/los_loop.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {p: [] for p in PATHS}
    with tempfile.TemporaryDirectory(prefix="sit-knn-step-") as tmp:
        for _ in range(args.repeats):
            for path in PATHS:
                rows[path].append(measure(args.config, path, args.steps, Path(tmp), args.threads))
                print(path, rows[path][-1], flush=True)
    step = {p: statistics.median(r["step_s"] for r in rs) for p, rs in rows.items()}
    result = {
        "config": args.config,
        "steps": args.steps,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "runs": rows,
        "median_step_s": step,
        "masked_over_gathered": step["masked"] / step["gathered"],
    }
    print(
        f"{args.config}: s/step gathered {step['gathered']:.4f}, masked {step['masked']:.4f} "
        f"(masked / gathered {result['masked_over_gathered']:.2f}x; median of {args.repeats})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
