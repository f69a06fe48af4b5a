"""Classical variography with GSTools: empirical variograms and fitted models.

The learned kernel of the transformer is compared with what a geostatistician would fit to the
same training data, with each family's GSTools model and rescale from pipeline/kernels.py.
"""

from __future__ import annotations

import gstools as gs
import numpy as np

from pipeline.data.geometry import positions_km
from pipeline.kernels import FAMILIES


def gstools_model(family: str, range_km: float = 1.0, variance: float = 1.0, nugget: float = 0.0):
    """The GSTools model of ``family`` in our conventions."""
    name, kwargs = FAMILIES[family].gstools
    return getattr(gs, name)(dim=2, len_scale=range_km, var=variance, nugget=nugget, **kwargs)


def empirical_variogram(
    coords: np.ndarray,
    values: np.ndarray,
    bin_edges: np.ndarray,
    snapshots: int = 20,
    pairs: int | None = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and semivariance, averaged over ``snapshots`` time steps spread evenly across
    ``values`` [T, N] (x/y km ``coords`` [N, 2]); each snapshot standardised by nothing but
    its own mean. NaN values are ignored. ``pairs`` caps GSTools' sampled point count."""
    t = values.shape[0]
    steps = np.linspace(0, t - 1, min(snapshots, t)).round().astype(int)
    gammas, counts = [], []
    for i, step in enumerate(steps):
        v = values[step]
        ok = np.isfinite(v)
        centres, gamma, count = gs.vario_estimate(
            (coords[ok, 0], coords[ok, 1]),
            v[ok] - v[ok].mean(),
            bin_edges,
            sampling_size=min(pairs, ok.sum()) if pairs else None,
            sampling_seed=seed + i,
            return_counts=True,
        )
        gammas.append(gamma)
        counts.append(count)
    counts = np.asarray(counts, dtype=float)
    gamma = (np.asarray(gammas) * counts).sum(0) / np.maximum(counts.sum(0), 1)
    return centres, gamma


def fit_variogram(
    family: str,
    centres: np.ndarray,
    gamma: np.ndarray,
    sill: float | None = None,
    weights: str | None = None,
) -> dict[str, float]:
    """Fit ``family`` (range, sill, nugget; with ``sill``, variance + nugget fixed at it) to
    an empirical variogram by GSTools' least squares (``weights="inv"``: 1 / distance, the
    short lags that kriging weighs most); the family's shape parameters (Matern's nu, the
    rational quadratic's alpha) stay ours. Returns the parameters and ``wsse``, the squared
    residuals weighted by 1 / distance (comparable between families)."""
    model = gstools_model(family)
    if sill is not None:  # a start inside GSTools' bounds for the fixed sill
        model = gstools_model(
            family, range_km=float(centres.max()) / 2, variance=sill / 2, nugget=sill / 2
        )
    fixed = {name: False for name in model.opt_arg}
    model.fit_variogram(centres, gamma, nugget=True, sill=sill, weights=weights, **fixed)
    resid = model.variogram(centres) - gamma
    return {
        "range_km": float(model.len_scale),
        "variance": float(model.var),
        "nugget": float(model.nugget),
        "wsse": float((resid * resid / np.maximum(centres, 1e-12)).sum()),
    }


def train_variogram(store, family: str) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """The empirical variogram of a store's train split (normalised values of up to 1,500
    sensors at 20 time steps, bins to a third of the network's extent) and its GSTools fit of
    ``family`` (None where GSTools cannot fit it: flat, too few pairs): the classical
    counterpart of the run's ``kernel_estimate``, on the same normalised values."""
    rng = np.random.default_rng(0)
    a, b = store.split("train")
    n = store.shape[1]
    nodes = np.sort(rng.choice(n, min(n, 1500), replace=False))
    steps = np.linspace(a, b - 1, min(20, b - a)).round().astype(int)
    vals = store["values"].oindex[steps, nodes, 0]  # [S, n]
    vals = (vals - store["mean"][:][nodes, 0]) / store["std"][:][nodes, 0]
    pos, frame = positions_km(store["coords"][:][nodes], store.attrs["crs"])
    plane = (pos @ frame.T)[:, :2]
    span = float(np.ptp(plane, axis=0).max())
    edges = np.linspace(0, span / 3 if span > 0 else 1.0, 16)
    centres, gamma = empirical_variogram(plane, vals, edges, snapshots=len(steps))
    try:
        fitted = {"family": family, **fit_variogram(family, centres, gamma)}
    except (RuntimeError, ValueError):
        return centres, gamma, None
    if not np.isfinite([fitted["range_km"], fitted["variance"], fitted["nugget"]]).all():
        return centres, gamma, None
    return centres, gamma, fitted
