"""Training throughput on CPU: samples/s and the share of step time spent waiting for data,
for 1 and 2 DeepSpeed processes (gloo), on a synthetic store of the demo's size.

Usage: python benchmarks/train.py [--steps 40] [--config configs/small.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--store", default="stores/small.zarr")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sit-train-bench-"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}
    common = [
        "--config",
        args.config,
        f"data.store={args.store}",
        f"train.out_dir={out}",
        f"train.steps={args.steps}",
        "train.eval_every=100000",
        "train.eval_batches=1",
        "train.checkpoint_every=100000",
        "tracking.enabled=false",
        "train.resume=never",
    ]
    if not (ROOT / args.store / "COMPLETE").exists():
        subprocess.run(
            [
                sys.executable,
                "launch/preprocess.py",
                "--config",
                args.config,
                f"data.store={args.store}",
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; {args.config}, "
        f"{args.steps} steps"
    )
    print("| processes | samples/s | step s | data wait share of step time |")
    print("|---|---|---|---|")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    for procs in (1, 2):
        name = f"bench{procs}"
        launcher = (
            [sys.executable]
            if procs == 1
            else [deepspeed, "--num_gpus", str(procs), "--master_port", "29631"]
        )
        subprocess.run(
            [*launcher, "launch/train.py", *common, f"name={name}"],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        timing = json.loads((out / name / "metrics.json").read_text())["timing"]
        print(
            f"| {procs} | {timing['samples_per_s']:.1f} | {timing['step_s']:.3f} | "
            f"{timing['data_wait_fraction']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
