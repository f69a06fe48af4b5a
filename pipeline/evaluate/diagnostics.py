"""Diagnostic figures of a run (matplotlib, no display needed) and the data they need: the
learned correlation against the empirical variogram of the training data and the truth, the
PIT histogram, loss curves, a forecast fan chart from the exported model, sweep bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.data.store import Store  # noqa: E402
from pipeline.evaluate.maps import forecast_grid, map_figure  # noqa: E402
from pipeline.evaluate.variography import train_variogram  # noqa: E402
from pipeline.kernels import correlation  # noqa: E402
from pipeline.model.export import Predictor  # noqa: E402

MAP_GRID = 60  # cells per side of the run's forecast map
MAP_BACKENDS = ("knn", "dense")  # the backends that forecast at query points


def correlation_curves(
    kernels: list[dict],
    family: str,
    centres: np.ndarray,
    empirical: np.ndarray,
    truth: dict | None,
    fitted: dict | None = None,
    estimate: dict | None = None,
) -> plt.Figure:
    """Learned correlation c_h(d) per head against the empirical correlation of the training
    data (1 - semivariance / variance), its GSTools fit (``fitted``: family, range_km,
    variance, nugget), the run's estimate of the field's covariance (``estimate``: range_km,
    nugget; model.variography) and, when known, the true one. Anisotropic kernels are drawn
    along their major axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    d = np.linspace(0, max(float(centres.max()), 1e-3), 200)
    if family != "none":
        for layer in kernels:
            for h, (r, tau) in enumerate(zip(layer["range_km"], layer["nugget"], strict=True)):
                rho = correlation(family, torch.tensor(d / r)).numpy()
                ax.plot(
                    d, (1 - tau) * rho, lw=1, label=f"layer {layer['layer']} head {h}: {r:.1f} km"
                )
    ax.plot(centres, empirical, "ko", ms=4, label="empirical (train split)")
    if estimate:
        rho = correlation(family, torch.tensor(d / estimate["range_km"])).numpy()
        label = f"estimate (variogram in training): {estimate['range_km']:.1f} km"
        ax.plot(d, (1 - estimate["nugget"]) * rho, "r-", lw=2.5, alpha=0.7, label=label)
    if fitted:
        sill = fitted["variance"] + fitted["nugget"]
        rho = correlation(fitted["family"], torch.tensor(d / fitted["range_km"])).numpy()
        label = f"GSTools fit ({fitted['family']}): {fitted['range_km']:.1f} km"
        ax.plot(d, fitted["variance"] / sill * rho, "k:", label=label)
    if truth:
        sill = truth["variance"] + truth["nugget"]
        rho = correlation(truth["family"], torch.tensor(d / truth["range_km"])).numpy()
        ax.plot(d, truth["variance"] / sill * rho, "k--", label=f"truth: {truth['range_km']} km")
    ax.set(xlabel="distance (km)", ylabel="correlation", title="learned vs empirical covariance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pit_histogram(hist: list[float]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = len(hist)
    ax.bar(
        np.arange(bins) / bins, np.asarray(hist) * bins, width=1 / bins, align="edge", edgecolor="k"
    )
    ax.axhline(1.0, color="r", ls="--", label="calibrated")
    ax.set(xlabel="PIT", ylabel="density", title="PIT histogram (test)")
    ax.legend()
    fig.tight_layout()
    return fig


def fan_chart(
    history: np.ndarray, mean: np.ndarray, std: np.ndarray, truth: np.ndarray, names: list[str]
) -> plt.Figure:
    """Forecast fans for a few sensors: history [T_in, S], mean/std/truth [H, S]."""
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), squeeze=False)
    t_in, h = len(history), len(mean)
    past, future = np.arange(-t_in, 0), np.arange(h)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(past, history[:, i], "k-", lw=1)
        ax.plot(future, truth[:, i], "k.", ms=4, label="observed")
        ax.plot(future, mean[:, i], "b-", label="mean")
        for z, alpha in ((1.6449, 0.2), (0.6745, 0.35)):
            ax.fill_between(
                future,
                mean[:, i] - z * std[:, i],
                mean[:, i] + z * std[:, i],
                color="b",
                alpha=alpha,
                lw=0,
            )
        ax.set_title(f"sensor {names[i]}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def loss_curves(train: list[tuple[int, float]], val: list[dict]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o-", label="val loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    fig.tight_layout()
    return fig


def sweep_bars(by_family: dict[str, dict], metric: str) -> plt.Figure:
    """Best validation metric per kernel family of a sweep."""
    names = sorted(by_family, key=lambda k: by_family[k]["metric"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [by_family[k]["metric"] for k in names], edgecolor="k")
    ax.set(ylabel=metric, title="best trial per kernel family")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def close_figures() -> None:
    plt.close("all")


def run_figures(
    cfg: Config, metrics: dict, store: Store, model_dir: Path, train_losses: list
) -> dict[str, plt.Figure]:
    """The figures of a finished run, by name."""
    family = cfg.model.kernel if cfg.model.kernel != "none" else "matern32"
    centres, gamma, fitted = train_variogram(store, family)
    figures = {
        "correlation": correlation_curves(
            metrics["kernel"],
            cfg.model.kernel,
            centres,
            1 - gamma,
            metrics.get("truth"),
            fitted,
            metrics.get("kernel_estimate"),
        ),
        "pit": pit_histogram(metrics["test"]["pit_histogram"]),
        "loss": loss_curves(train_losses, metrics["validation"]),
    }
    c, _ = store.split("test")
    ti, h = cfg.data.time_in, cfg.data.horizon
    origin = c + ti
    x = store["values"][origin - ti : origin][None]  # [1, time_in, n, F]
    predictor = Predictor(model_dir)
    out = predictor.predict(x, store["time"][origin : origin + 1])
    n = store.shape[1]
    pick = [0, n // 2, n - 1]
    future = store["values"][origin : origin + h]  # [h, n, F]
    figures["fan_chart"] = fan_chart(
        x[0][:, pick, 0],
        out["mean"][0][:, pick, 0],
        out["std"][0][:, pick, 0],
        future[:, pick, 0],
        [str(store["sensor_id"][i]) for i in pick],
    )
    if cfg.model.backend in MAP_BACKENDS:
        grid = forecast_grid(predictor, store, origin, MAP_GRID)
        figures["map"] = map_figure(grid, store)
    return figures
