"""Forecast maps: the exported model's forecast on a regular grid over the network's extent
(query points, pipeline/model/export.py), as an xarray Dataset (NetCDF) and a figure.

The grid spans the sensors' bounding box (in the network's coordinates: longitude/latitude
degrees or x/y km) plus a margin; each cell centre is a query point, forecast as a sensor
without history from its nearest sensors. Per horizon step and forecast feature: ``mean`` and
``interval90``, the width of the central 90 % interval of the Gaussian forecast.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from pipeline.data.store import Store  # noqa: E402
from pipeline.model.export import Predictor  # noqa: E402

Z90 = 1.6448536269514722  # the standard normal's 95th percentile
MARGIN = 0.05  # of the network's extent, on each side


def grid_points(coords: np.ndarray, crs: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of a ``size`` x ``size`` grid over ``coords`` [N, 2] (+ the margin): the
    two axes, each [size], in (x, y) order: (x km, y km), or (longitude, latitude)."""
    xy = coords[:, ::-1] if crs == "latlon" else coords  # (lon, lat) or (x, y)
    lo, hi = xy.min(0), xy.max(0)
    pad = MARGIN * np.maximum(hi - lo, 1e-6)
    axes = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], size) for i in range(2)]
    return axes[0], axes[1]


def window_ending_at(store: Store, origin: int, time_in: int) -> np.ndarray:
    """The input window [1, time_in, N, F] (data units, NaN missing) of the forecast whose
    first step is time index ``origin``."""
    if not time_in <= origin < store.shape[0]:
        raise ValueError(
            f"origin index {origin} has no full input window of {time_in} steps in "
            f"{store.path} ({store.shape[0]} steps)"
        )
    values = store["values"][origin - time_in : origin]  # [time_in, N, F]
    mask = store["mask"][origin - time_in : origin]
    return np.where(mask, values, np.nan)[None].astype(np.float32)


def forecast_grid(predictor: Predictor, store: Store, origin: int, size: int) -> xr.Dataset:
    """The forecast from the window before time index ``origin`` on a ``size`` x ``size``
    grid over the store's network: ``mean`` and ``interval90`` [step, feature, y, x]."""
    meta, crs = predictor.meta, str(store.attrs["crs"])
    x = window_ending_at(store, origin, meta["time_in"])
    gx, gy = grid_points(store["coords"][:], crs, size)
    xx, yy = np.meshgrid(gx, gy)  # [y, x]
    cells = np.column_stack(
        [yy.ravel(), xx.ravel()] if crs == "latlon" else [xx.ravel(), yy.ravel()]
    )
    origin_time = store["time"][origin : origin + 1]
    out = predictor.predict(x, origin_time, query=cells)
    h, f = out["query_mean"].shape[1], out["query_mean"].shape[3]
    shape = (h, size, size, f)  # [step, y, x, feature]
    mean = out["query_mean"][0].reshape(shape).transpose(0, 3, 1, 2)  # [step, feature, y, x]
    width = (2 * Z90 * out["query_std"][0]).reshape(shape).transpose(0, 3, 1, 2)
    step = int(np.diff(store["time"][:2])[0]) if store.shape[0] > 1 else 0
    names = ("lon", "lat") if crs == "latlon" else ("x_km", "y_km")
    return xr.Dataset(
        {
            "mean": (("step", "feature", "y", "x"), mean),
            "interval90": (("step", "feature", "y", "x"), width),
        },
        coords={
            "step": np.arange(1, h + 1),
            "time": ("step", (origin_time[0] + np.arange(h) * step).astype("datetime64[ns]")),
            "feature": list(meta.get("targets", meta["features"])),
            names[0]: ("x", gx),
            names[1]: ("y", gy),
        },
        attrs={"units": meta.get("units", ""), "crs": crs, "store": str(store.path)},
    )


def map_figure(ds: xr.Dataset, store: Store, step: int = 1, feature: int = 0) -> plt.Figure:
    """The forecast ``mean`` and ``interval90`` at horizon ``step`` side by side, sensors
    drawn on both."""
    crs = ds.attrs["crs"]
    names = ("lon", "lat") if crs == "latlon" else ("x_km", "y_km")
    gx, gy = ds[names[0]].values, ds[names[1]].values
    coords = store["coords"][:]
    sx, sy = (coords[:, 1], coords[:, 0]) if crs == "latlon" else (coords[:, 0], coords[:, 1])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    units = f" ({ds.attrs['units']})" if ds.attrs.get("units") else ""
    for ax, name, cmap in zip(axes, ("mean", "interval90"), ("viridis", "magma"), strict=True):
        field = ds[name].isel(step=step - 1, feature=feature).values  # [y, x]
        mesh = ax.pcolormesh(gx, gy, field, shading="nearest", cmap=cmap)
        ax.scatter(sx, sy, s=3, c="white", edgecolors="black", linewidths=0.2, label="sensors")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        label = "forecast mean" if name == "mean" else "90 % interval width"
        ax.set_title(f"{label}, step {step}: {str(ds['time'].values[step - 1])[:16]}")
        fig.colorbar(mesh, ax=ax, label=f"{ds['feature'].values[feature]}{units}")
    return fig
