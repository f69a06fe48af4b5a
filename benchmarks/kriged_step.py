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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ["data.holdout_sensors=0.2", "train.sensor_dropout=0.2"]

CHILD = """
import resource, runpy, sys
sys.argv = ["launch/train.py", *sys.argv[1:]]
try:
    runpy.run_path("launch/train.py", run_name="__main__")
finally:
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def measure(config: str, kriged: bool, steps: int, out: Path, threads: int) -> dict:
    run = f"kriged-{str(kriged).lower()}"
    cmd = [sys.executable, "-c", CHILD, "--config", config, f"name={run}"]
    cmd += [f"train.out_dir={out}", f"train.steps={steps}", f"train.eval_every={steps}"]
    cmd += [f"train.checkpoint_every={steps}", "train.resume=never", "tracking.enabled=false"]
    cmd += ["train.oracle=false", "train.fitted_gp=false", *HELD_OUT]
    cmd += [f"model.kriged_inputs={str(kriged).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if "PEAK_KB" in line]
    timing = json.loads((out / run / "metrics.json").read_text())["timing"]
    return {"step_s": timing["step_s"], "peak_mb": peak_kb[-1] / 1024}


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
