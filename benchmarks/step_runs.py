"""One training job in its own process, for the benchmarks that compare variants of a training
step (benchmarks/knn_step.py, benchmarks/kriged_step.py): the config trained for a few steps
(one validation, tracking, the oracle and the fitted GP off), then its timing and the
process's peak resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import importlib, resource, runpy, sys
module, name, value = sys.argv[1:4]
if module:
    setattr(importlib.import_module(module), name, int(value))
sys.argv = ["launch/train.py", *sys.argv[4:]]
try:
    runpy.run_path("launch/train.py", run_name="__main__")
finally:
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def train_steps(
    config: str,
    run: str,
    steps: int,
    out: Path,
    threads: int,
    overrides: list[str],
    patch: tuple[str, str, int] | None = None,
) -> dict:
    """``step_s``, ``samples_per_s`` (the run's metrics.json) and ``peak_mb`` of ``config``
    trained ``steps`` steps with ``overrides``; ``patch``: (module, attribute, integer) set in
    the child before the job starts."""
    module, name, value = patch or ("", "", 0)
    cmd = [sys.executable, "-c", CHILD, module, name, str(value), "--config", config]
    cmd += [f"name={run}"]
    cmd += [f"train.out_dir={out}", f"train.steps={steps}", f"train.eval_every={steps}"]
    cmd += [f"train.checkpoint_every={steps}", "train.resume=never", "tracking.enabled=false"]
    cmd += ["train.oracle=false", "train.fitted_gp=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if "PEAK_KB" in line]
    timing = json.loads((out / run / "metrics.json").read_text())["timing"]
    return {
        "step_s": timing["step_s"],
        "samples_per_s": timing["samples_per_s"],
        "peak_mb": peak_kb[-1] / 1024,
    }
