"""Deep variography: does the learned range recover the true range of the field?

For true range in {5, 10, 20} km x family in {matern32, exponential}: train the forecaster on a
synthetic field from a wrong initial range, and print the learned range per head beside the
range a classical GSTools variogram fit finds on the same training data, with the relative
error of each. Two settings:

- ``prior``: one head, kernel prior alone (no <q, k> residual), one-step input window, in the
  noise-dominated regime (nugget = 10 x sill) where kriging weights are proportional to the
  covariance (see docs/variography.md);
- ``full``: the default model (4 heads, <q, k> residual, 12-step window) on a field with a
  small nugget (0.1 x sill).

Usage: python benchmarks/variography.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.quickfit

from benchmarks.quickfit import fit_synthetic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.variography import empirical_variogram, fit_variogram  # noqa: E402

SETTINGS = {
    "prior": [
        "model.heads=1",
        "model.qk_residual=false",
        "model.knn=64",
        "data.time_in=1",
        "data.horizon=1",
        "data.synthetic.nugget=10",
        "train.kernel_lr=0.1",
    ],
    "full": ["model.knn=32", "data.synthetic.nugget=0.1"],
}


def run(family: str, true_range: float, setting: str, steps: int) -> dict:
    init = 4.0 * true_range
    cfg = load_config(
        None,
        [
            f"data.synthetic.family={family}",
            f"data.synthetic.range_km={true_range}",
            f"model.kernel={family}",
            f"model.init_range_km={init}",
            "model.layers=1",
            "data.synthetic.num_sensors=400",
            "data.synthetic.num_steps=1500",
            "data.synthetic.domain_km=100",
            f"train.steps={steps}",
            *SETTINGS[setting],
        ],
    )
    t0 = time.perf_counter()
    result = fit_synthetic(cfg, progress=False)
    learned = result.learned()[0]["range_km"]
    edges = np.linspace(0, 3 * true_range, 16)
    centres, gamma = empirical_variogram(result.coords, result.train_values, edges, snapshots=30)
    classical = fit_variogram(family, centres, gamma)["range_km"]
    return {
        "family": family,
        "setting": setting,
        "true": true_range,
        "init": init,
        "learned": learned,
        "classical": classical,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="one range, prior setting only")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is faster than two here
    ranges = [10.0] if args.quick else [5.0, 10.0, 20.0]
    settings = ["prior"] if args.quick else ["prior", "full"]
    print(
        f"# machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )
    print(
        "| setting | family | true km | init km | learned km per head | rel. err (best head) "
        "| GSTools fit km | rel. err | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        for family in ("matern32", "exponential"):
            for true_range in ranges:
                r = run(family, true_range, setting, args.steps)
                errs = [abs(x - r["true"]) / r["true"] for x in r["learned"]]
                heads = ", ".join(f"{x:.1f}" for x in r["learned"])
                print(
                    f"| {setting} | {family} | {r['true']:.0f} | {r['init']:.0f} | {heads} | "
                    f"{min(errs):.0%} | {r['classical']:.1f} | "
                    f"{abs(r['classical'] - r['true']) / r['true']:.0%} | {r['seconds']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
