"""The covariance prior on real data (docs/peers.md, "The prior on real data"): what the field
offers a kernel of distance, beside what the converged models learned.

For each data set's store: the sensors' distances (nearest neighbour, the model's k-th
neighbour), and the empirical variogram of the train split, on the values standardised per
sensor and with each sensor's daily profile removed (what is left for space to explain once
the model has the profile as an input), fitted with GSTools (the config's family, with a
nugget); then, from ``benchmarks/peers.py``'s converged runs of ours (``--runs``), the learned
range and nugget per seed and head, and how many heads end below the nearest-neighbour
distance (heads that attend to the sensor itself).

Usage: python benchmarks/real_prior.py [--datasets los_loop aqi36] [--runs runs/peers]
       [--json docs/real_prior.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import CONFIGS, Budget  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.geometry import positions_km  # noqa: E402
from pipeline.data.profile import daily_profile, slots, step_ns  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.evaluate.compare import load_run  # noqa: E402
from pipeline.evaluate.variography import empirical_variogram, fit_variogram  # noqa: E402


def anomalies(store, split: str) -> np.ndarray:
    """A split's first feature standardised per sensor, minus each sensor's daily profile
    (what is left for space to explain once the model has the profile): [T, N], NaN where
    missing."""
    a, b = store.split(split)
    values = store["values"][a:b, :, 0].astype(np.float64)  # [T, N]
    mask = store["mask"][a:b, :, 0]
    z = (values - store["mean"][:, 0]) / store["std"][:, 0]
    step = step_ns(store.attrs["freq"], str(store.path))
    profile = daily_profile(store)[:, :, 0]  # [slot, N] normalised
    return np.where(mask, z - profile[slots(store["time"][a:b], step)], np.nan)


def field(name: str, snapshots: int) -> dict:
    """Distances, the fitted variogram of the train split's profile-free anomalies, and the
    anomalies' correlation by distance (1 - semivariance / variance) in each split (is the
    spatial structure the kernel learns on train the one it meets on test?)."""
    cfg = load_config(ROOT / CONFIGS[name])
    store = open_store(ROOT / cfg.data.store)
    pos, frame = positions_km(store["coords"][:], store.attrs["crs"])
    xy = pos @ frame[:2].T  # [N, 2] km in the network's local east/north plane
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)  # [N, N] km
    np.fill_diagonal(d, np.inf)
    nearest = np.sort(d, axis=1)
    k = min(cfg.model.knn, len(xy) - 1)
    top = np.percentile(d[np.isfinite(d)], 50)  # bins to the median pair distance
    edges = np.linspace(0, top, 13)
    curves, correlation = {}, {}
    for split in ("train", "val", "test"):
        anomaly = anomalies(store, split)
        full = np.isfinite(anomaly).mean(1) >= 0.5  # time steps with most sensors observed
        curves[split] = empirical_variogram(xy, anomaly[full], edges, snapshots=snapshots)
        correlation[split] = (1 - curves[split][1] / np.nanvar(anomaly)).tolist()
    centres, gamma = curves["train"]
    fit = fit_variogram(cfg.model.kernel, centres, gamma)
    train = anomalies(store, "train")
    lag1 = np.nanmean(train[1:] * train[:-1]) / np.nanmean(train**2)  # per-step memory
    return {
        "sensors": len(xy),
        "nearest_km": float(np.median(nearest[:, 0])),
        "kth_nearest_km": float(np.median(nearest[:, k - 1])),
        "k": k,
        "family": cfg.model.kernel,
        "variogram": {"centres_km": centres.tolist(), "gamma": gamma.tolist()},
        "correlation_by_split": correlation,
        "fit": fit,
        "nugget_share": fit["nugget"] / (fit["nugget"] + fit["variance"]),
        "anomaly_lag1_autocorrelation": float(lag1),
    }


def learned(name: str, runs: Path, nearest_km: float) -> dict | None:
    """Learned range and nugget per seed, layer and head of the converged runs of ours at the
    config's learning rate, and how many heads per layer end with a range below the median
    nearest-neighbour distance (heads that attend to the sensor itself: the prior weight of
    its nearest neighbour is then a few percent of its own)."""
    lr = f"{load_config(ROOT / CONFIGS[name]).train.lr:g}"
    dirs = sorted(runs.glob(f"{name}-ours-{Budget().tag}-lr{lr}-s*"))  # the protocol's runs
    seeds = [d for d in dirs if (d / "metrics.json").exists()]
    if not seeds:
        return None
    kernels = [load_run(d)[0]["kernel"] for d in seeds]  # [seed][layer] -> per-head lists
    return {
        "lr": lr,
        "seeds": [
            {
                "run": d.name,
                "range_km": [layer["range_km"] for layer in k],
                "nugget": [layer["nugget"] for layer in k],
                "heads_below_nearest": [
                    int(sum(r < nearest_km for r in layer["range_km"])) for layer in k
                ],
            }
            for d, k in zip(seeds, kernels, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["los_loop", "aqi36"])
    parser.add_argument("--runs", default="runs/peers")
    parser.add_argument("--snapshots", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    for name in args.datasets:
        results[name] = {
            "field": field(name, args.snapshots),
        }
        results[name]["learned"] = learned(
            name, ROOT / args.runs, results[name]["field"]["nearest_km"]
        )
        f, l = results[name]["field"], results[name]["learned"]
        print(f"## {name}: {f['sensors']} sensors")
        print(
            f"nearest neighbour {f['nearest_km']:.2f} km, {f['k']}-th {f['kth_nearest_km']:.2f} km"
            f" (medians); anomaly lag-1 autocorrelation {f['anomaly_lag1_autocorrelation']:.3f}"
        )
        fit = f["fit"]
        print(
            f"variogram of the profile-free anomalies, {f['family']} fit: range "
            f"{fit['range_km']:.2f} km, sill {fit['variance']:.3f}, nugget {fit['nugget']:.3f} "
            f"(nugget share {f['nugget_share']:.2f})"
        )
        gamma = ", ".join(f"{c:.1f}:{g:.2f}" for c, g in zip(*f["variogram"].values(), strict=True))
        print(f"  empirical (km: semivariance): {gamma}")
        for split, corr in f["correlation_by_split"].items():
            at = ", ".join(
                f"{c:.0f}:{r:.2f}" for c, r in zip(f["variogram"]["centres_km"], corr, strict=True)
            )
            print(f"  correlation by distance, {split} (km: correlation): {at}")
        if l:
            for seed in l["seeds"]:
                for i, (ranges, nuggets) in enumerate(
                    zip(seed["range_km"], seed["nugget"], strict=True)
                ):
                    print(
                        f"{seed['run']} layer {i}: range "
                        + ", ".join(f"{r:.1f}" for r in ranges)
                        + " km; nugget "
                        + ", ".join(f"{n:.2f}" for n in nuggets)
                        + f"; {seed['heads_below_nearest'][i]} below the nearest neighbour"
                    )
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
