"""The summary of benchmarks/peers.py's runs (docs/peers.md): per data set, each model's
scores over seeds, its learning rate, epochs and wall time to convergence, the baselines
(the historical average and the fitted GP computed from the store), Diebold-Mariano tests of
ours against each model, the verdict per horizon against the best peer, the tables and the
plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.profile import daily_profile, slots, step_ns
from pipeline.data.store import open_store
from pipeline.data.stream import WindowStream
from pipeline.evaluate import gp
from pipeline.evaluate.compare import compare_runs, load_run
from pipeline.evaluate.kalman import score
from pipeline.evaluate.metrics import diebold_mariano
from pipeline.evaluate.report import dm_text

ROOT = Path(__file__).resolve().parents[1]  # store paths in metrics.json are relative to it


def historical_average(store_path: Path, origins: np.ndarray, horizon: int) -> dict:
    """Each sensor's train-split mean at the time of day of each target (its train mean where
    that slot was never observed), scored on the test windows at ``origins`` (targets
    origin .. origin + horizon - 1, observed cells only): per horizon step MAE [horizon] and
    per window MAE [windows] with its observed cells."""
    st = open_store(store_path)
    values, mask, time = st["values"][:], st["mask"][:], st["time"][:]  # [T, N, F], [T]
    step = step_ns(st.attrs["freq"], str(st.path))
    # the pipeline's own profile (what every run's historical_average baseline uses), in units
    profile = daily_profile(st) * st["std"][:] + st["mean"][:]  # [slot, N, F]
    slot = slots(time, step)  # [T] time-of-day slot
    targets = origins[:, None] + np.arange(horizon)  # [O, horizon] time indices
    y, m = np.nan_to_num(values[targets]), mask[targets]  # [O, horizon, N, F]
    err = np.abs(y - profile[slot[targets]]) * m
    return {
        "per_step": err.sum((0, 2, 3)) / m.sum((0, 2, 3)).clip(min=1),
        "per_window": err.sum((1, 2, 3)) / m.sum((1, 2, 3)).clip(min=1),
        "count": m.sum((1, 2, 3)),
        "mae_all": float(err.sum() / max(m.sum(), 1)),
    }


def fitted_gp(store_path: Path, time_in: int, horizon: int, origins: np.ndarray) -> dict:
    """The fitted Gaussian process (pipeline/evaluate/gp.py, what every run now reports) on
    the test windows at ``origins``: per horizon step MAE and CRPS [horizon], per window MAE
    and CRPS [windows], pooled MAE / CRPS, its parameters; or {"skipped": why}."""
    st = open_store(store_path)
    stream = WindowStream(st, "test", time_in, horizon, 1, 1, shuffle=False, daily_profile=True)
    out = gp.forecast(st, stream, time_in, horizon)
    if "skipped" in out:
        return out
    scores = score(
        out["mean"], out["std"], out["y"], out["seen"], stream.std[:, 0], st["neighbours"][:]
    )
    rows = np.searchsorted(stream.origins, origins)
    return {
        "per_step_mae": np.asarray(scores["mae"]),
        "per_step_crps": np.asarray(scores["crps"]),
        "per_window_mae": scores["_per_window"][rows, 1],
        "per_window_crps": scores["_per_window"][rows, 2],
        "mae_all": scores["mean"]["mae"],
        "crps_all": scores["mean"]["crps"],
        "fit": out["fit"],
    }


def run_lr(run: Path) -> float | None:
    """The learning rate in a run directory's name (None for runs named before it was)."""
    return float(run.name.split("-lr")[1].split("-s")[0]) if "-lr" in run.name else None


def summarise(
    name: str,
    runs: dict[str, list[Path]],
    horizons: dict[str, int],
    per_epoch: int,
    holdout: bool,
    time_in: int | None = None,
) -> dict:
    """One data set's rows (mean +- sd over seeds per model, the baselines) and the
    Diebold-Mariano tests of ours against each; ``horizons``: reporting name -> step;
    ``per_epoch``: optimiser steps per epoch; ``holdout``: scored at held-out sensors;
    ``time_in``: the input window, for the fitted GP (None: not computed)."""
    rows = {}
    for model, dirs in runs.items():
        ms = [load_run(d)[0] for d in dirs]
        test = [m["test"] for m in ms]

        def stat(values):
            a = np.asarray(values, dtype=float)
            return [float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0]

        rows[model] = {
            "mae": {h: stat([t["mae"][s - 1] for t in test]) for h, s in horizons.items()},
            "crps": {h: stat([t["crps"][s - 1] for t in test]) for h, s in horizons.items()},
            "rmse": {h: stat([t["rmse"][s - 1] for t in test]) for h, s in horizons.items()},
            "mae_all": stat([t["mean"]["mae"] for t in test]),
            "rmse_all": stat([t["mean"]["rmse"] for t in test]),
            "mape_all": stat([t["mean"]["mape"] for t in test]),
            "crps_all": stat([t["mean"]["crps"] for t in test]),
            "parameters": ms[0]["parameters"],
            "train_s_per_step": stat([m["timing"]["step_s"] for m in ms]),
            "infer_ms_per_window": stat([1e3 * m["timing"]["test_s_per_window"] for m in ms]),
            "seeds": len(ms),
            "lr": run_lr(dirs[0]),
            # epochs to the weights tested (the best validation's) and run (with the patience)
            "best_epoch": stat([m.get("tested_step", m["steps"]) / per_epoch for m in ms]),
            "epochs": stat([m["steps"] / per_epoch for m in ms]),
            "wall_s": stat([m["timing"].get("fit_wall_s", np.nan) for m in ms]),
            "device": ms[0]["device"],  # runs may come from another machine (--train-only)
        }
    for kind in ("last_value", "train_mean"):  # the same in every run: take the first
        base = load_run(runs["ours"][0])[0]["test"]["baselines"][kind]
        rows[kind] = {"mae_all": [base["mae"], 0.0], "crps_all": [base["crps"], 0.0]}
    tests = {
        model: compare_runs(runs["ours"], dirs) for model, dirs in runs.items() if model != "ours"
    }
    ours = [load_run(d) for d in runs["ours"]]
    metrics, windows = ours[0]
    if holdout:
        # scored on sensors never seen in training: a train-split profile of their own is
        # exactly what they lack
        return {"dataset": name, "horizons": horizons, "rows": rows, "dm_ours_vs": tests}
    horizon = len(metrics["test"]["horizon_steps"])
    ha = historical_average(ROOT / metrics["store"]["path"], windows["origin"], horizon)
    mae = {h: [float(ha["per_step"][s - 1]), 0.0] for h, s in horizons.items()}
    rows["historical_average"] = {
        "mae": mae,
        "crps": mae,
        "mae_all": [ha["mae_all"], 0.0],
        "crps_all": [ha["mae_all"], 0.0],
    }
    ours_mae = np.mean([w["mae"] for _, w in ours], axis=0)  # same origins in every run
    ours_crps = np.mean([w["crps"] for _, w in ours], axis=0)
    tests["historical_average"] = {
        loss: {"dm": diebold_mariano(o - ha["per_window"], horizon)}
        for loss, o in (("mae", ours_mae), ("crps", ours_crps))
    }
    if time_in is not None:  # the geostatistician's answer, deterministic (sd 0)
        gp_ = fitted_gp(ROOT / metrics["store"]["path"], time_in, horizon, windows["origin"])
        if "skipped" not in gp_:
            rows["fitted_gp"] = {
                "mae": {h: [float(gp_["per_step_mae"][s - 1]), 0.0] for h, s in horizons.items()},
                "crps": {h: [float(gp_["per_step_crps"][s - 1]), 0.0] for h, s in horizons.items()},
                "mae_all": [gp_["mae_all"], 0.0],
                "crps_all": [gp_["crps_all"], 0.0],
                "fit": gp_["fit"],
            }
            tests["fitted_gp"] = {
                loss: {"dm": diebold_mariano(o - gp_[f"per_window_{loss}"], horizon)}
                for loss, o in (("mae", ours_mae), ("crps", ours_crps))
            }
    return {"dataset": name, "horizons": horizons, "rows": rows, "dm_ours_vs": tests}


def pm(stat: list[float]) -> str:
    return f"{stat[0]:.3f} +- {stat[1]:.3f}"


def verdicts(result: dict, peer_names: tuple[str, ...]) -> dict[str, str]:
    """Per reporting horizon: ours against the best peer by mean MAE over seeds; a difference
    within one standard error (of the difference of two means over seeds) is a tie."""
    rows, out = result["rows"], {}
    peers = [m for m in rows if m in peer_names and "mae" in rows[m]]
    if not peers:
        return out
    for h in result["horizons"]:
        best = min(peers, key=lambda m: rows[m]["mae"][h][0])
        (a, sa), (b, sb) = rows["ours"]["mae"][h], rows[best]["mae"][h]
        n = rows["ours"]["seeds"]
        se = float(np.sqrt((sa**2 + sb**2) / n))
        word = "tie" if abs(a - b) <= se else ("ours lower" if a < b else f"{best} lower")
        gap = f"{(a - b) / b:+.1%}, SE {se:.3f}"
        out[h] = f"ours {a:.3f} vs best peer {best} {b:.3f} ({gap}): {word}"
    return out


def table(result: dict, peer_names: tuple[str, ...]) -> str:
    hs = list(result["horizons"])
    head = [
        "model",
        *(f"MAE {h}" for h in hs),
        "MAE all",
        "CRPS all",
        "lr",
        "epochs (best / run)",
        "wall s",
        "params",
        "s/step",
        "infer ms/window",
        "device",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in result["rows"].items():
        cells = [model]
        cells += [
            f"{r['mae'][h][0]:.3f} +- {r['mae'][h][1]:.3f}" if "mae" in r else "-" for h in hs
        ]
        cells += [pm(r["mae_all"]), pm(r["crps_all"])]
        cells += [f"{r['lr']:g}" if r.get("lr") else "-"]
        cells += [f"{r['best_epoch'][0]:.1f} / {r['epochs'][0]:.1f}" if "epochs" in r else "-"]
        cells += [f"{r['wall_s'][0]:.0f}" if "wall_s" in r else "-"]
        cells += [f"{r['parameters']:,}" if "parameters" in r else "-"]
        cells += [f"{r['train_s_per_step'][0]:.3f}" if "train_s_per_step" in r else "-"]
        cells += [f"{r['infer_ms_per_window'][0]:.2f}" if "infer_ms_per_window" in r else "-"]
        cells += [r.get("device", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    for model, why in result.get("cannot", {}).items():
        lines.append(f"| {model} | cannot: {why} |")
    lines.append("")
    head = ["model", *(f"RMSE {h}" for h in hs), *(f"CRPS {h}" for h in hs)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in result["rows"].items():
        if "rmse" in r:
            cells = [pm(r["rmse"][h]) for h in hs] + [pm(r["crps"][h]) for h in hs]
            lines.append("| " + " | ".join([model, *cells]) + " |")
    lines.append("")
    seeds = ", ".join(str(s) for s in result.get("lr_seeds", [0]))  # before lr_seeds: seed 0
    for model, grid in (result.get("lr_grid") or {}).items():
        scores = ", ".join(f"{lr}: {v:.3f}" for lr, v in grid.items())
        lines.append(f"{model}: best validation MAE by learning rate (seeds {seeds}): {scores}")
    lines.append("")
    for h, verdict in verdicts(result, peer_names).items():
        lines.append(f"{h}: {verdict}")
    lines.append("")
    sweep = result.get("family_sweep")
    if sweep:
        scores = ", ".join(
            f"{f} {v['val_mae']:.3f} ({v['test_mae']:.3f})" for f, v in sweep["scores"].items()
        )
        lines.append(
            f"family sweep, seed {sweep['seed']}, validation MAE (test): {scores}; "
            f"best: {sweep['best']}"
        )
        lines.append("")
    for model, t in result["dm_ours_vs"].items():
        lines.append(
            f"ours vs {model}: MAE {dm_text(t['mae']['dm'])}; CRPS {dm_text(t['crps']['dm'])}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}  # one per model
    cols = min(len(results), 2)
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results, strict=False):
        hs = list(result["horizons"])
        top = 0.0
        for model, r in result["rows"].items():
            if "mae" not in r:
                continue
            mean = [r["mae"][h][0] for h in hs]
            sd = [r["mae"][h][1] for h in hs]
            baseline = model in ("historical_average", "fitted_gp")
            ax.errorbar(
                hs,
                mean,
                yerr=sd,
                marker="o",
                capsize=3,
                label=model,
                color=colour[model],
                ls="--" if baseline else "-",
            )
            top = top if baseline else max(top, max(mean))
        bottom, upper = ax.get_ylim()
        ax.set_ylim(bottom, min(upper, top * 1.15))  # a far-off baseline leaves the frame
        budget = "converged" if result["steps"] is None else f"{result['steps']} steps"
        ax.set_title(f"{result['dataset']}, {budget}")
        ax.set_xlabel("horizon")
        ax.set_ylabel("test MAE (mean +- sd over seeds)")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
