"""Two variants of a training step, measured in the same run (benchmarks/knn_step.py,
benchmarks/kriged_step.py): each trains the config for a few steps in its own process (one
validation, tracking, the oracle and the fitted GP off); its timing and the process's peak
resident memory."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


def compare(
    description: str,
    variants: dict[str, dict] | Callable[[argparse.Namespace], dict[str, dict]],
    label: str = "",
    options: dict[str, dict] | None = None,
) -> None:
    """The command line of a step benchmark: each of ``variants`` (name -> keyword arguments
    of :func:`train_steps` beyond the config and budget: ``overrides``, ``patch``; or a function
    of the parsed command line that gives them) trained in its own process, alternating over
    ``--repeats`` because the machine is shared; prints and (``--json``) writes the medians of
    seconds per step and peak memory, and the ratios of the second variant to the first.
    ``options``: the benchmark's own arguments (flag -> keyword arguments of add_argument)."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/los_loop.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    for flag, kw in (options or {}).items():
        parser.add_argument(flag, **kw)
    args = parser.parse_args()
    if callable(variants):
        variants = variants(args)
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="sit-step-") as tmp:
        for _ in range(args.repeats):
            for name, kw in variants.items():
                run = train_steps(
                    args.config, f"step-{name}", args.steps, Path(tmp), args.threads, **kw
                )
                rows[name].append(run)
                print(name, run, flush=True)
    median = {
        k: {name: statistics.median(r[k] for r in rs) for name, rs in rows.items()}
        for k in ("step_s", "peak_mb")
    }
    base, other = list(variants)
    ratio = {k: v[other] / v[base] for k, v in median.items()}
    result = {
        "config": args.config,
        "steps": args.steps,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "variants": variants,
        "runs": rows,
        "median": median,
        f"{other}_over_{base}": ratio,
    }
    step, peak = median["step_s"], median["peak_mb"]
    print(
        f"{args.config}{label}: s/step {base} {step[base]:.4f}, {other} {step[other]:.4f} "
        f"({ratio['step_s']:.2f}x); peak MB {base} {peak[base]:.0f}, {other} {peak[other]:.0f} "
        f"({ratio['peak_mb']:.2f}x); median of {args.repeats}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
