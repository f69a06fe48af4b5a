"""Distance to the Bayes limit by regime (docs/limit.md): where does the spatial prior matter?

For each regime of ``configs/regimes/`` (a synthetic field with known truth), on its test
split: the exact window oracle (pipeline/evaluate/oracle.py, the best possible forecast given
the model's input window), two probabilistic baselines (the last observed value and the
train mean, each with a Gaussian spread fitted per horizon step on the train split), and
three models trained in memory (benchmarks/quickfit.py) over several seeds:

- ``kernel + knn``: the geostatistical prior over the k nearest sensors (the regime's model);
- ``none + knn``: no kernel, the same neighbourhoods (neighbourhoods are a spatial prior too);
- ``none + dense``: no kernel, every sensor attends to every other (a plain transformer).

In the ``unseen`` regime (``data.holdout_sensors``) every method, the oracle included, is
scored on the held-out sensors alone, which none of them has seen before the origin.
Reported per regime and method: CRPS and its ratio to the oracle's (mean +- sd over seeds);
Diebold-Mariano tests of ``kernel + knn`` against each control on the per-window CRPS averaged
over seeds; Moran's I of the sensors' mean residuals beside the oracle's; the learned range
and nugget of the head nearest the truth. The field is the same for every seed: seeds vary
the training (initialisation and batches).

Usage: python benchmarks/limit.py [--regimes noisy ...] [--seeds 0 1 2] [--steps N]
       [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quickfit import fit_synthetic, synthetic_source  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.geometry import positions_km  # noqa: E402
from pipeline.data.neighbours import k_nearest  # noqa: E402
from pipeline.evaluate.metrics import diebold_mariano, morans_i  # noqa: E402
from pipeline.evaluate.oracle import Oracle  # noqa: E402
from pipeline.model.losses import gaussian_crps  # noqa: E402

MODELS = {
    "kernel + knn": [],
    "none + knn": ["model.kernel=none", "model.anisotropy=false"],
    "none + dense": ["model.kernel=none", "model.anisotropy=false", "model.backend=dense"],
}
CONTROLS = ("none + knn", "none + dense")


def scores(mean, std, y, seen) -> dict:
    """Per-window CRPS [O] (over observed cells), pooled CRPS and the per-sensor mean
    residual [N] of a Gaussian forecast; arrays [O, horizon, N] in data units."""
    y = np.where(seen, y, mean)
    crps = gaussian_crps(*(torch.from_numpy(np.array(a, np.float64)) for a in (mean, std, y)))
    crps = crps.numpy() * seen
    cells = seen.sum((1, 2)).clip(min=1)
    resid = ((y - mean) * seen).sum((0, 1)) / seen.sum((0, 1)).clip(min=1)
    return {
        "per_window": crps.sum((1, 2)) / cells,
        "crps": float(crps.sum() / seen.sum()),
        "resid": np.where(seen.any((0, 1)), resid, np.nan),
    }


def spread_per_step(point, y, seen) -> np.ndarray:
    """The root mean square error per horizon step [horizon] of a point forecast, in units of
    each sensor's train std (so one spread serves every sensor)."""
    err = np.where(seen, y - point, 0.0)
    return np.sqrt((err * err).sum((0, 2)) / seen.sum((0, 2)).clip(min=1))


def baselines(src, train_origins, test_origins) -> dict[str, tuple]:
    """Last value and train mean as Gaussian forecasts [O, horizon, N] in data units, their
    spread fitted per horizon step on the train windows."""
    out = {}
    horizon, time_in = src.horizon, src.time_in
    scale, shift = src.std[:, 0], src.mean[:, 0]
    z = (src.values[..., 0] - shift) / scale  # [T, N] normalised (NaN where unobserved)
    seen = src.mask[..., 0]
    given = seen if src.hidden is None else seen & ~src.hidden  # inputs: no held-out history

    def point(origins, kind):
        if kind == "train_mean":
            return np.zeros((len(origins), horizon, z.shape[1]))
        steps = origins[:, None] + np.arange(-time_in, 0)  # [O, time_in]
        xs, ms = z[steps], given[steps]  # [O, time_in, N]
        last = np.where(ms, np.arange(time_in)[None, :, None], -1).max(1)  # [O, N]
        value = np.take_along_axis(xs, last.clip(min=0)[:, None], 1)[:, 0]
        value = np.where(last >= 0, value, 0.0)  # no observation in the window: the mean
        return np.repeat(value[:, None], horizon, axis=1)

    for kind in ("last_value", "train_mean"):
        ys = {}
        for name, origins in (("train", train_origins), ("test", test_origins)):
            steps = origins[:, None] + np.arange(horizon)
            ys[name] = (z[steps], seen[steps], point(origins, kind))
        y, s, p = ys["train"]
        sd = spread_per_step(p, np.nan_to_num(y), s)  # [horizon]
        _, _, p_test = ys["test"]
        mean = p_test * scale + shift
        std = np.broadcast_to(sd[None, :, None] * scale, mean.shape)
        out[kind] = (mean, std)
    return out


def run_regime(path: Path, seeds: list[int], steps: int | None, bar) -> dict:
    overrides = [f"train.steps={steps}"] if steps else []
    base = load_config(path, overrides)
    src, coords = synthetic_source(base)
    syn, t = base.data.synthetic, base.data.synthetic.num_steps
    n_train = int(t * base.data.train_fraction)
    n_val = int(t * base.data.val_fraction)
    test_origins = src.origins(n_train + n_val, t)
    steps_ = test_origins[:, None] + np.arange(base.data.horizon)
    y = np.nan_to_num(src.values[..., 0][steps_])  # [O, horizon, N]
    seen = src.mask[..., 0][steps_]
    given = src.mask[..., 0].copy()  # what the oracle conditions on
    if src.hidden is not None:  # regime `unseen`: scored on the held-out sensors alone
        seen = seen & src.hidden
        given[:, src.hidden] = False
    pos, _ = positions_km(coords, "xy")
    graph = k_nearest(pos, base.model.knn)[0]

    methods: dict[str, dict] = {}
    t0 = time.perf_counter()
    values = np.where(src.mask[..., 0], src.values[..., 0], np.nan)
    mean, std = Oracle(syn, coords).forecast(
        values, given, test_origins, base.data.horizon, base.data.time_in
    )
    oracle = scores(mean, std, y, seen)
    oracle_s = time.perf_counter() - t0
    for kind, (m, s) in baselines(src, src.origins(0, n_train), test_origins).items():
        methods[kind] = {"runs": [scores(m, s, y, seen)]}
    for name, extra in MODELS.items():
        runs = []
        for seed in seeds:
            cfg: Config = load_config(path, [*overrides, *extra, f"train.seed={seed}"])
            t0 = time.perf_counter()
            fit = fit_synthetic(cfg, progress=False)
            m, s = fit.predict(test_origins)
            run = scores(m, s, y, seen)
            run["seconds"] = time.perf_counter() - t0
            run["kernel"] = fit.learned() if cfg.model.kernel != "none" else []
            runs.append(run)
            bar.update(1)
        methods[name] = {"runs": runs}

    truth = {"range_km": syn.range_km, "nugget_fraction": syn.nugget / (syn.variance + syn.nugget)}
    out: dict = {
        "regime": path.stem,
        "sensors": syn.num_sensors,
        "test_windows": int(len(test_origins)),
        "observed_share": float(seen.mean()),
        "scored_sensors": int(seen.any((0, 1)).sum()),
        "truth": truth,
        "oracle": {"crps": oracle["crps"], "seconds": oracle_s},
        "oracle_morans_i": morans_i(oracle["resid"], graph),
        "methods": {},
    }
    for name, m in methods.items():
        crps = np.array([r["crps"] for r in m["runs"]])
        ratio = crps / oracle["crps"]
        row = {
            "crps_mean": float(crps.mean()),
            "crps_sd": float(crps.std(ddof=1)) if len(crps) > 1 else 0.0,
            "ratio_mean": float(ratio.mean()),
            "ratio_sd": float(ratio.std(ddof=1)) if len(ratio) > 1 else 0.0,
            "seeds": len(crps),
            "morans_i": morans_i(np.nanmean([r["resid"] for r in m["runs"]], 0), graph),
        }
        if "seconds" in m["runs"][0]:
            row["seconds_per_fit"] = float(np.mean([r["seconds"] for r in m["runs"]]))
        if m["runs"][0].get("kernel"):
            row["learned"] = [nearest_head(r["kernel"], truth) for r in m["runs"]]
        out["methods"][name] = row
    averaged = {
        name: np.mean([r["per_window"] for r in methods[name]["runs"]], 0) for name in MODELS
    }
    out["dm_kernel_vs"] = {
        c: diebold_mariano(averaged["kernel + knn"] - averaged[c], base.data.horizon)
        for c in CONTROLS
    }
    return out


def nearest_head(kernels: list[dict], truth: dict) -> dict:
    """Of every layer and head, the learned range nearest the truth (in log distance)."""
    heads = [
        (abs(np.log(r / truth["range_km"])), r, tau)
        for layer in kernels
        for r, tau in zip(layer["range_km"], layer["nugget"], strict=True)
    ]
    _, r, tau = min(heads)
    return {"range_km": r, "nugget": tau, "range_error": abs(r / truth["range_km"] - 1)}


def table(results: list[dict]) -> str:
    lines = [
        "| regime | method | CRPS (mean +- sd) | ratio to oracle | Moran's I (oracle's) | "
        "learned range km (truth) | s per fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        oi = res["oracle_morans_i"]
        oracle_i = f"{oi['I']:.3f}" if oi["testable"] else "-"
        lines.append(
            f"| {res['regime']} | oracle (window) | {res['oracle']['crps']:.4f} | 1 | "
            f"{oracle_i} | | |"
        )
        for name, row in res["methods"].items():
            mi = row["morans_i"]
            learned = ""
            if "learned" in row:
                ranges = ", ".join(f"{h['range_km']:.1f}" for h in row["learned"])
                learned = f"{ranges} ({res['truth']['range_km']:g})"
            lines.append(
                f"| | {name} | {row['crps_mean']:.4f} +- {row['crps_sd']:.4f} | "
                f"{row['ratio_mean']:.3f} +- {row['ratio_sd']:.3f} | "
                f"{mi['I']:.3f} ({oracle_i}) | {learned} | "
                f"{row.get('seconds_per_fit', 0):.0f} |"
                if mi["testable"]
                else f"| | {name} | {row['crps_mean']:.4f} | {row['ratio_mean']:.3f} | - | | |"
            )
    lines.append("")
    lines.append("| regime | kernel + knn vs | DM statistic (seed-averaged per-window CRPS) | p |")
    lines.append("|---|---|---|---|")
    for res in results:
        for c, dm in res["dm_kernel_vs"].items():
            stat = f"{dm['statistic']:+.2f}" if dm["testable"] else dm["reason"]
            p = f"{dm['p_value']:.2g}" if dm["testable"] else "-"
            lines.append(f"| {res['regime']} | {c} | {stat} | {p} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0]["methods"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = np.arange(len(results)) + (i - (len(names) - 1) / 2) * width
        ratio = [r["methods"][name]["ratio_mean"] for r in results]
        sd = [r["methods"][name]["ratio_sd"] for r in results]
        ax.bar(xs, ratio, width, yerr=sd, label=name, capsize=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.05, color="k", lw=0.8, ls="--", label="target 1.05")
    ax.set_xticks(np.arange(len(results)), [r["regime"] for r in results])
    ax.set_ylabel("CRPS / window oracle's")
    top = max(r["methods"][n]["ratio_mean"] for r in results for n in names)
    ax.set_ylim(0.95, min(top * 1.05, 2.5))
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    every = sorted(p.stem for p in (ROOT / "configs" / "regimes").glob("*.yaml"))
    parser.add_argument("--regimes", nargs="+", default=every, choices=every)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the other regimes' results already in --json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"seeds {args.seeds}; regimes {', '.join(args.regimes)}",
        flush=True,
    )
    t0 = time.perf_counter()
    kept = []
    if args.keep and args.json and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        kept = [r for r in previous if r["regime"] not in args.regimes]
    results = []
    with tqdm(total=len(args.regimes) * len(MODELS) * len(args.seeds), desc="fits") as bar:
        for name in args.regimes:
            results.append(
                run_regime(
                    ROOT / "configs" / "regimes" / f"{name}.yaml", args.seeds, args.steps, bar
                )
            )
            if args.json:
                merged = sorted(kept + results, key=lambda r: r["regime"])
                Path(args.json).write_text(json.dumps(merged, indent=1))
    results = sorted(kept + results, key=lambda r: r["regime"])
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
