"""What ``model.kriged_inputs`` costs in a real training step: the same config trained with the
flag off and on, with held-out sensors and ``train.sensor_dropout`` (the setting of
docs/holdout.md, where most cells are kriged), measured in the same run.

Each variant trains the config (one process, tracking, the oracle and the fitted GP off) for
``--steps`` steps in its own subprocess; reported: seconds per optimiser step (the run's
metrics.json), the process's peak resident memory, and the ratios on / off. Alternating
repeats (``--repeats``) because the machine is shared.

Usage: python benchmarks/kriged_step.py [--config configs/los_loop.yaml] [--steps 100]
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

HELD_OUT = ["data.holdout_sensors=0.2", "train.sensor_dropout=0.2"]


def measure(config: str, kriged: bool, steps: int, out: Path, threads: int) -> dict:
    flag = str(kriged).lower()
    overrides = [*HELD_OUT, f"model.kriged_inputs={flag}"]
    return train_steps(config, f"kriged-{flag}", steps, out, threads, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/los_loop.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="sit-kriged-step-") as tmp:
        for _ in range(args.repeats):
            for name in rows:
                rows[name].append(
                    measure(args.config, name == "on", args.steps, Path(tmp), args.threads)
                )
                print(name, rows[name][-1], flush=True)
    med = {
        k: {name: statistics.median(r[k] for r in rs) for name, rs in rows.items()}
        for k in ("step_s", "peak_mb")
    }
    result = {
        "config": args.config,
        "steps": args.steps,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "runs": rows,
        "median": med,
        "on_over_off": {k: v["on"] / v["off"] for k, v in med.items()},
    }
    print(
        f"{args.config} (held out 0.2, sensor dropout 0.2): s/step off {med['step_s']['off']:.4f}"
        f", on {med['step_s']['on']:.4f} ({result['on_over_off']['step_s']:.2f}x); peak MB off "
        f"{med['peak_mb']['off']:.0f}, on {med['peak_mb']['on']:.0f} "
        f"({result['on_over_off']['peak_mb']:.2f}x); median of {args.repeats}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
