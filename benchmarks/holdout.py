"""Forecasts at sensors held out of training, on real networks (docs/holdout.md).

For each data set (``configs/los_loop.yaml``, ``configs/aqi36.yaml``) with 20 % of its sensors
held out (``data.holdout_sensors=0.2``: the hash split, the same sensors in every run; never
seen in training, and at test time never in any input), on the test windows, scored at the
held-out sensors alone:

- ``ours``: the config's model with ``train.sensor_dropout=0.2`` (a fifth of the sensors'
  inputs hidden per batch, so that it learns to forecast a sensor from its neighbours);
- ``none``: the same without the covariance kernel;
- the fitted Gaussian process (pipeline/evaluate/gp.py: a separable space-time GP fitted to
  the train split of the seen sensors, exact conditioning on each window);
- inverse-distance weighting of the 8 nearest seen sensors (weights 1 / distance), of their
  last observed values and of their daily profiles (train mean by time of day): point
  forecasts, so their CRPS is their MAE.

Models train by the protocol of benchmarks/peers.py (early stopping on validation MAE, the
best validation weights tested) at the config's learning rate (chosen on validation without
held-out sensors, docs/peers.md), over several seeds; ``test_windows.npz`` holds each run's
per-window losses at the held-out sensors. Reported: MAE, CRPS and 90 % coverage at the
held-out sensors (mean +- sd over seeds), and Diebold-Mariano tests of ours (per-window
losses averaged over seeds) against each other method.

Usage: python benchmarks/holdout.py [--datasets los_loop aqi36] [--seeds 0 1 2]
       [--models ours none] [--out runs/holdout] [--json FILE] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import CONFIGS, Budget, sh, train_all  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.geometry import positions_km  # noqa: E402
from pipeline.data.profile import daily_profile, slots, step_ns  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.data.stream import WindowStream  # noqa: E402
from pipeline.evaluate import gp  # noqa: E402
from pipeline.evaluate.compare import load_run  # noqa: E402
from pipeline.evaluate.kalman import Z90  # noqa: E402
from pipeline.evaluate.metrics import diebold_mariano  # noqa: E402
from pipeline.model.losses import gaussian_crps  # noqa: E402

HOLDOUT = ["data.holdout_sensors=0.2"]
VAL_HIDDEN = ["train.val_hidden=0.2", "train.monitor=hidden_mae"]
MODELS = {
    "ours": ["train.sensor_dropout=0.2"],
    "none": ["train.sensor_dropout=0.2", "model.kernel=none"],
    # missing inputs kriged under the run's field estimate (model.kriged_inputs)
    "ours_kr": ["train.sensor_dropout=0.2", "model.kriged_inputs=true"],
    # the same two, validated at seen sensors whose windows validation hides (train.val_hidden):
    # early stopping, the best weights and the choice between them follow those sensors' MAE
    "ours_vh": ["train.sensor_dropout=0.2", *VAL_HIDDEN],
    "ours_kr_vh": ["train.sensor_dropout=0.2", "model.kriged_inputs=true", *VAL_HIDDEN],
}
IDW_NEIGHBOURS = 8


def test_stream(name: str) -> tuple:
    """The config, store and test stream of a data set with its held-out sensors."""
    cfg = load_config(ROOT / CONFIGS[name], HOLDOUT)
    store = open_store(ROOT / cfg.data.store)
    stream = WindowStream(
        store, "test", cfg.data.time_in, cfg.data.horizon, 1, 1, shuffle=False,
        holdout=cfg.data.holdout_sensors, daily_profile=True,
    )  # fmt: skip
    return cfg, store, stream


def runs_of(name: str, seeds: list[int], budget: Budget, out: Path, models: list[str]):
    """Each model's run directories and the commands of those not yet finished."""
    cfg, store, _ = test_stream(name)
    train = WindowStream(
        store, "train", cfg.data.time_in, cfg.data.horizon, cfg.train.batch_size,
        min(cfg.model.knn, store["neighbours"].shape[1]), tile_size=cfg.data.tile_size,
        hops=cfg.model.layers, holdout=cfg.data.holdout_sensors,
    )  # fmt: skip
    per_epoch = len(train.shard_batches(0, 0, 1))
    runs, todo = {}, []
    for model in models:
        for seed in seeds:
            run = f"{name}-{model}-holdout-{budget.tag}-s{seed}"
            runs.setdefault(model, []).append(out / run)
            if (out / run / "metrics.json").exists():
                continue
            todo.append([
                sys.executable, "launch/train.py", "--config", str(ROOT / CONFIGS[name]),
                f"name={run}", f"train.out_dir={out}", *budget.overrides(per_epoch),
                f"train.checkpoint_every={budget.max_epochs * per_epoch}",
                f"train.seed={seed}", "train.resume=never", "tracking.enabled=false",
                "train.fitted_gp=false",  # computed once below, the same for every run
                *HOLDOUT, *MODELS[model],
            ])  # fmt: skip
    return runs, todo


def idw(store, stream, horizon: int) -> dict[str, np.ndarray]:
    """Inverse-distance weighting of the nearest seen sensors: of their last observed value in
    each window (their profile where none is observed) and of their daily profile at each
    target's time, [O, horizon, N] (held-out columns filled; the data's units)."""
    hidden = stream.hidden
    pos, _ = positions_km(store["coords"][:], store.attrs["crs"])
    seen_idx = np.flatnonzero(~hidden)
    d = np.linalg.norm(pos[hidden][:, None] - pos[seen_idx][None], axis=-1)  # [H, S]
    near = np.argsort(d, axis=1)[:, :IDW_NEIGHBOURS]  # [H, k] into seen_idx
    w = 1.0 / np.maximum(np.take_along_axis(d, near, 1), 1e-6)  # [H, k]
    nb = seen_idx[near]  # [H, k] store indices
    values, mask = store["values"][:, :, 0].astype(np.float64), store["mask"][:, :, 0]
    origins = np.asarray(stream.origins)
    time_in = stream.time_in
    window = origins[:, None] + np.arange(-time_in, 0)  # [O, time_in]
    obs = mask[window][:, :, nb]  # [O, time_in, H, k]
    last_t = np.where(obs, np.arange(time_in)[None, :, None, None], -1).max(1)  # [O, H, k]
    last = np.take_along_axis(values[window][:, :, nb], last_t.clip(min=0)[:, None], 1)[:, 0]
    ok = last_t >= 0
    last = np.where(ok, last, 0.0)  # no observation in the window: no weight
    profile = daily_profile(store)[..., 0] * store["std"][:, 0] + store["mean"][:, 0]
    slot = slots(stream.time, step_ns(store.attrs["freq"], str(store.path)))
    targets = origins[:, None] + np.arange(horizon)  # [O, horizon]
    levels = profile[slot[targets]][..., nb]  # [O, horizon, H, k]
    by_profile = (levels * w).sum(-1) / w.sum(-1)  # [O, horizon, H]
    weights = w[None] * ok  # [O, H, k]
    total = weights.sum(-1)
    point = (last * weights).sum(-1) / np.maximum(total, 1e-12)  # [O, H]
    # no neighbour observed in the window: their profile at the first step
    point = np.where(total > 0, point, by_profile[:, 0])
    out = {}
    n = store.shape[1]
    for kind, value in (
        ("idw_last_value", np.repeat(point[:, None], horizon, 1)),  # [O, horizon, H]
        ("idw_profile", by_profile),
    ):
        full = np.zeros((len(origins), horizon, n))
        full[:, :, hidden] = value
        out[kind] = full
    return out


def per_window(mean, std, y, on) -> dict[str, np.ndarray]:
    """MAE, CRPS and 90 % coverage of each window over the cells ``on`` [O, H, N]."""
    y = np.where(on, y, mean)
    err = np.abs(y - mean)
    crps = gaussian_crps(*(torch.from_numpy(a) for a in (mean, std, y))).numpy()
    cells = on.sum((1, 2))
    return {
        "count": cells,
        "mae": (err * on).sum((1, 2)) / cells.clip(min=1),
        "crps": (crps * on).sum((1, 2)) / cells.clip(min=1),
        "inside": ((err <= Z90 * std) & on).sum((1, 2)),
    }


def summarise(name: str, runs: dict[str, list[Path]], reference: str = "ours") -> dict:
    """The rows (mean +- sd over seeds for models) and Diebold-Mariano tests of the
    ``reference`` model against every other."""
    cfg, store, stream = test_stream(name)
    horizon = cfg.data.horizon
    ours = [load_run(d)[1] for d in runs[reference]]
    origins = ours[0]["unseen_origin"]  # windows with an observed held-out target
    rows, losses = {}, {}
    for model, dirs in runs.items():
        loaded = [load_run(d) for d in dirs]
        for _, w in loaded:
            assert np.array_equal(w["unseen_origin"], origins), "runs tested different windows"
        unseen = [m["test"]["unseen"]["mean"] for m, _ in loaded]
        rows[model] = {
            k: [float(np.mean([u[k] for u in unseen])), float(np.std([u[k] for u in unseen],
                ddof=1)) if len(unseen) > 1 else 0.0]
            for k in ("mae", "crps", "coverage_90")
        }  # fmt: skip
        rows[model]["seeds"] = len(loaded)
        rows[model]["best_step"] = [m["tested_step"] for m, _ in loaded]
        losses[model] = {
            k: np.mean([w[f"unseen_{k}"] for _, w in loaded], 0) for k in ("mae", "crps")
        }
    hidden = stream.hidden
    rows_idx = np.searchsorted(stream.origins, origins)
    t0 = time.perf_counter()
    fitted = gp.forecast(store, stream, cfg.data.time_in, horizon)
    gp_s = time.perf_counter() - t0
    others = {}
    if "skipped" not in fitted:
        y, seen = fitted["y"], fitted["seen"] & hidden[None, None]
        others["fitted_gp"] = per_window(fitted["mean"], fitted["std"], y, seen)
        rows["fitted_gp_fit"] = fitted["fit"]
    else:
        rows["fitted_gp_fit"] = fitted
        steps = np.asarray(stream.origins)[:, None] + np.arange(horizon)
        y = store["values"][:, :, 0].astype(np.float64)[steps]
        seen = store["mask"][:, :, 0][steps] & hidden[None, None]
    for kind, point in idw(store, stream, horizon).items():
        others[kind] = per_window(point, np.zeros_like(point), y, seen)
    for kind, w in others.items():
        total = w["count"].sum()
        rows[kind] = {
            "mae": [float((w["mae"] * w["count"]).sum() / total), 0.0],
            "crps": [float((w["crps"] * w["count"]).sum() / total), 0.0],
            "coverage_90": [float(w["inside"].sum() / total), 0.0] if kind == "fitted_gp" else None,
        }
        losses[kind] = {k: w[k][rows_idx] for k in ("mae", "crps")}
    tests = {
        other: {loss: diebold_mariano(losses[reference][loss] - losses[other][loss], horizon)
                for loss in ("mae", "crps")}
        for other in losses if other != reference
    }  # fmt: skip
    return {
        "dataset": name,
        "held_out_sensors": int(hidden.sum()),
        "sensors": int(len(hidden)),
        "test_windows": int(len(origins)),
        "rows": rows,
        "reference": reference,
        "dm_ours_vs": tests,
        "fitted_gp_seconds": gp_s,
    }


def table(result: dict) -> str:
    def pm(stat):
        return "-" if stat is None else f"{stat[0]:.3f} +- {stat[1]:.3f}"

    ref = result.get("reference", "ours")
    lines = [
        f"{result['dataset']}: {result['held_out_sensors']} of {result['sensors']} sensors "
        f"held out, {result['test_windows']} test windows",
        "",
        f"| method | MAE | CRPS | 90 % coverage | DM on MAE ({ref} vs) | DM on CRPS ({ref} vs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        if name == "fitted_gp_fit":
            continue
        dm = result["dm_ours_vs"].get(name)
        cells = ["", ""]
        if dm:
            cells = [
                f"{d['statistic']:+.2f} (p {d['p_value']:.2g})" if d["testable"] else "-"
                for d in (dm["mae"], dm["crps"])
            ]
        lines.append(
            f"| {name} | {pm(row['mae'])} | {pm(row['crps'])} | {pm(row['coverage_90'])} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["los_loop", "aqi36"],
                        choices=["los_loop", "aqi36"])  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/holdout")
    parser.add_argument("--json", default=None)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    parser.add_argument(
        "--reference", default="ours", choices=list(MODELS), help="the model the tests compare"
    )
    args = parser.parse_args()
    if args.reference not in args.models and not args.train_only:
        args.models.insert(0, args.reference)  # everything is compared with it
    budget = Budget()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {budget.describe()}", flush=True)
    results = []
    for name in args.datasets:
        cfg = load_config(ROOT / CONFIGS[name])
        if not (ROOT / cfg.data.store / "COMPLETE").exists():
            sh([sys.executable, "launch/preprocess.py", "--config", str(ROOT / CONFIGS[name])])
        runs, todo = runs_of(name, args.seeds, budget, ROOT / args.out, args.models)
        train_all(todo, args.jobs)
        if args.train_only:
            continue
        results.append(summarise(name, runs, args.reference))
        print("\n" + table(results[-1]), flush=True)
    if args.json and results:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        keep = [r for r in old if r["dataset"] not in args.datasets]
        path.write_text(json.dumps(keep + results, indent=1, default=float))


if __name__ == "__main__":
    main()
