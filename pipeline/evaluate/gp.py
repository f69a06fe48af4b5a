"""The fitted Gaussian-process baseline: what a geostatistician would forecast (NumPy, GSTools).

A separable space-time Gaussian process on the target's deviations z from what the run
normalises with (each sensor's train mean and std), minus the daily profile where the run's
test carries one and the train split holds at least ``PROFILE_DAYS`` days (a profile of fewer
days is mostly noise: subtracted in-sample, it shrinks the train deviations the GP is fitted
to):

    z_t(s) = f_t(s) + e_t(s),
    Cov(f_t(s), f_u(s')) = phi^|t-u| (sill rho(|s - s'| / range) + micro [s = s']),
    e ~ N(0, nugget) independent in space and time,

with rho a correlation family of pipeline/kernels.py, distances as the model measures them
(chordal km on latitude/longitude). The variogram's nugget is split in two: ``micro``, variation
at one sensor that its neighbours do not share but that persists in time (a detector on the
other carriageway), and ``nugget``, measurement noise. Its parameters come from the train split
only, by moments: GSTools' least-squares fit of the empirical variogram of z gives the range
and the split of z's variance between sill and the two nuggets together, for every family, and
the family that fits best is kept; the lag-one and lag-two autocovariances c1, c2 of z at a
sensor give phi = c2 / c1 and the persistent variance c1 / phi = sill + micro.

Each test window is forecast by exact conditioning on its input window's observations: f is
Markov (AR(1) in time), so that conditional law is the Kalman filter of kalman.py with
H = U sqrt(sill Lambda + micro) (rho's matrix = U Lambda U^T): the oracle's machinery with fitted
parameters instead of the true ones. Held-out sensors (data.holdout_sensors) are never
conditioned on, and their normalisation and profile are their seen neighbours', as for the
model. The cost is O(N^3) once and per dense filter step (a window with a missing value):
stores beyond ``MAX_SENSORS`` or ``MAX_DENSE_FLOPS`` are skipped, with the reason.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.spatial.distance import cdist

from pipeline.data.geometry import positions_km
from pipeline.data.profile import levels_at
from pipeline.data.store import Store
from pipeline.data.stream import WindowStream
from pipeline.evaluate.kalman import StateSpace, dense_steps, score
from pipeline.evaluate.metrics import diebold_mariano
from pipeline.evaluate.variography import empirical_variogram, fit_variogram, gstools_model
from pipeline.kernels import FAMILIES

NAME = "fitted_gp"  # its key among the test's baselines
MAX_SENSORS = 3000  # an [N, N] eigendecomposition and O(N^2) per filter step
MAX_DENSE_FLOPS = 1e12  # dense filter steps x N^3 (about a minute of this 2-core CPU)
FIT_STEPS = 5000  # the latest train steps read for the fit
SNAPSHOTS = 400  # time steps of the empirical variogram, at most
PAIRS = 3e7  # sensor pairs over all its time steps, at most (its cost)
BINS = 20  # its distance bins, up to a third of the network's extent
PROFILE_DAYS = 14  # train days from which the daily profile is subtracted


def deviations(
    store: Store, stream: WindowStream, rows: np.ndarray, feature: int, profile: bool
) -> np.ndarray:
    """z [rows, N] of ``feature`` at the store's ``rows`` (ascending): normalised as the
    stream normalises it, minus the stream's daily profile with ``profile``; NaN where
    unobserved."""
    values = store["values"].oindex[rows, :, feature].astype(np.float64)  # [T, N]
    mask = store["mask"].oindex[rows, :, feature]
    z = (values - stream.mean[:, feature]) / stream.std[:, feature]
    if profile:
        levels, step = stream.profile
        nodes = np.arange(store.shape[1])
        z -= levels_at(levels, step, stream.time[rows][:, None], nodes, np.array([feature]))[
            :, 0, :, 0
        ]  # [T, 1, N, 1] -> [T, N]
    return np.where(mask, z, np.nan)


def fit(z: np.ndarray, plane: np.ndarray) -> dict:
    """Parameters of the GP from deviations ``z`` [T, n] (NaN unobserved) at planar km
    positions ``plane`` [n, 2]: for each family, GSTools' variogram fit (range, nugget; sill +
    nugget = z's variance; weighted by 1 / distance, bins up to a third of the extent), the
    family with the least weighted residual kept; phi and the persistent part of the nugget
    from the lag-one and lag-two autocovariances."""
    total = float(np.nanmean(z * z))
    extent = float(cdist(plane, plane).max())
    edges = np.linspace(0.0, extent / 3, BINS + 1)
    rows = np.isfinite(z).sum(1) >= 3  # steps with pairs to difference
    snapshots = int(np.clip(PAIRS / (0.5 * len(plane) ** 2), 20, SNAPSHOTS))
    centres, gamma = empirical_variogram(plane, z[rows], edges, snapshots=snapshots)
    ok = np.isfinite(gamma) & (gamma > 0)
    best = None
    for family in FAMILIES:
        try:
            params = fit_variogram(family, centres[ok], gamma[ok], sill=total, weights="inv")
        except (RuntimeError, ValueError):  # GSTools could not fit this family
            continue
        if np.isfinite(params["wsse"]) and (best is None or params["wsse"] < best["wsse"]):
            best = {"family": family, **params}
    if best is None:
        raise ValueError("no covariance family fits the train split's variogram")
    best["sill"] = best.pop("variance")
    c1 = float(np.nanmean(z[1:] * z[:-1]))  # phi (sill + micro) under the model
    c2 = float(np.nanmean(z[2:] * z[:-2]))  # phi^2 (sill + micro)
    phi = float(np.clip(c2 / c1, 0.0, 0.999)) if c1 > 0 and c2 > 0 else 0.0
    noise = best.pop("nugget")  # micro + nugget
    persistent = c1 / phi if phi > 0 else best["sill"]
    best["micro"] = float(np.clip(persistent - best["sill"], 0.0, noise))
    best["nugget"] = max(noise - best["micro"], 1e-6 * total)  # the filter divides by it
    best["phi"] = phi
    return best


def state_space(params: dict, pos: np.ndarray) -> StateSpace:
    """The filter of the fitted GP at 3-D km positions ``pos`` [N, 3]."""
    model = gstools_model(params["family"], range_km=params["range_km"])
    corr = model.correlation(cdist(pos, pos))  # [N, N]
    lam, u = np.linalg.eigh(corr)
    var = params["sill"] * np.maximum(lam, 0.0) + params["micro"]
    root = u * np.sqrt(var)  # [N, N]: root root^T = sill C + micro I
    return StateSpace(root, params["phi"], params["nugget"])


def forecast(store: Store, stream: WindowStream, time_in: int, horizon: int) -> dict:
    """The fitted GP's Gaussian forecasts of the test windows of ``stream`` (the run's test
    stream, one target feature): ``fit`` (its parameters), ``mean`` and ``std`` [O, H, N] in the
    data's units, the targets ``y`` and where they are observed, ``seen`` [O, H, N]; or
    {"skipped": why}."""
    n = store.shape[1]
    if len(stream.targets) != 1:
        return {"skipped": f"{len(stream.targets)} target features: it forecasts one"}
    if n > MAX_SENSORS:
        return {"skipped": f"{n} sensors: beyond the exact GP's {MAX_SENSORS}"}
    feature = int(stream.targets[0])
    hidden = stream.hidden if stream.hidden is not None else np.zeros(n, bool)
    pos, frame = positions_km(store["coords"][:], store.attrs["crs"])
    plane = (pos @ frame.T)[:, :2]  # [N, 2] km in the network's tangent plane
    a, b = store.split("train")
    days = (stream.time[b - 1] - stream.time[a]) / 86_400e9
    profile = bool(stream.profile is not None and days >= PROFILE_DAYS)
    z = deviations(store, stream, np.arange(max(a, b - FIT_STEPS), b), feature, profile)
    try:
        params = fit(z[:, ~hidden], plane[~hidden])
    except ValueError as err:
        return {"skipped": str(err)}
    origins = np.asarray(stream.origins)
    lo, hi = int(origins.min()) - time_in, int(origins.max()) + horizon
    z = deviations(store, stream, np.arange(lo, hi), feature, profile)  # [span, N]
    given = np.isfinite(z) & ~hidden[None]
    flops = dense_steps(given, origins - lo, time_in) * float(n) ** 3
    if flops > MAX_DENSE_FLOPS:
        return {"skipped": f"{flops:.1e} flops of dense filter steps: beyond {MAX_DENSE_FLOPS:.0e}"}
    mean, std = state_space(params, pos).forecast(
        np.nan_to_num(z), given, origins - lo, horizon, time_in
    )  # [O, H, N] in z's units
    steps = origins[:, None] + np.arange(horizon)  # [O, H]
    if profile:
        levels, step = stream.profile
        when = stream.time[steps]  # [O, H]
        mean = mean + levels_at(levels, step, when, np.arange(n), np.array([feature]))[..., 0]
    m_s, s_s = stream.mean[:, feature], stream.std[:, feature]
    rows = steps - lo  # [O, H] into the span
    values = store["values"].oindex[lo:hi, :, feature].astype(np.float64)  # [span, N]
    return {
        "fit": {**params, "daily_profile": profile},
        "mean": mean * s_s + m_s,  # the data's units
        "std": std * s_s,
        "y": values[rows],
        "seen": store["mask"].oindex[lo:hi, :, feature][rows],
    }


def baseline(
    store: Store,
    stream: WindowStream,
    time_in: int,
    horizon: int,
    windows: dict[str, np.ndarray],
    oracle: dict | None = None,
) -> dict:
    """The fitted GP on the test windows of ``stream`` (:func:`forecast`): its parameters,
    scores (kalman.score, with each side of held-out sensors), seconds, ratio to the window
    oracle's CRPS where ``oracle`` has one, and the test's baseline entry (MAE, CRPS,
    Diebold-Mariano tests of the model's per-window losses ``windows`` against it); or
    {"skipped": why}."""
    t0 = time.perf_counter()
    out = forecast(store, stream, time_in, horizon)
    if "skipped" in out:
        return out
    feature = int(stream.targets[0])
    result = score(
        out["mean"], out["std"], out["y"], out["seen"], stream.std[:, feature],
        store["neighbours"][:], stream.hidden,
    )  # fmt: skip
    per_window = result.pop("_per_window")[np.searchsorted(stream.origins, windows["origin"])]
    result["fit"] = out["fit"]
    result["wall_s"] = time.perf_counter() - t0
    if oracle and "window" in oracle:
        result["ratio_to_oracle"] = result["mean"]["crps"] / oracle["window"]["mean"]["crps"]
    result["baseline"] = {
        "mae": result["mean"]["mae"],
        "crps": result["mean"]["crps"],
        "probabilistic": True,
        "dm_mae": diebold_mariano(windows["mae"] - per_window[:, 1], horizon),
        "dm_crps": diebold_mariano(windows["crps"] - per_window[:, 2], horizon),
    }
    return result
