"""Masked forecast metrics per horizon step (docs/design.md, section 4), accumulated over
batches and ranks: MAE, RMSE, MAPE, Gaussian CRPS, PIT histogram, and coverage of the central
50 % and 90 % intervals; and the statistical comparisons of the test split: the
Diebold-Mariano test (Harvey-Leybourne-Newbold correction) of the model against the baselines
``last_value``, ``train_mean`` and ``historical_average``, and Moran's I of the per-sensor
residuals over the neighbour graph.

The accumulators hold sums in float64 tensors, so ranks merge by an all-reduce sum.
"""

from __future__ import annotations

import math
import re

import numpy as np
import scipy.sparse
import scipy.stats
import torch
from torch import Tensor

from pipeline.model.losses import gaussian_crps

MAPE_EPS = 1e-6  # targets with |y| <= MAPE_EPS are left out of MAPE (and counted apart)
Z50 = 0.6744897501960817  # central 50 % interval: |z| <= Z50
Z90 = 1.6448536269514722  # central 90 % interval: |z| <= Z90
_COLS = ("n", "abs", "sq", "ape_n", "ape", "crps", "in50", "in90")


def standardised(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """(y - mean) / std; for a point forecast (std 0): 0 where y == mean, else +-inf."""
    err = y - mean
    point = std <= 0
    return torch.where(point, err * math.inf, err / torch.where(point, torch.ones_like(std), std))


def pit(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """Probability integral transform Phi((y - mean) / std) (a step for a point forecast)."""
    z = torch.nan_to_num(standardised(mean, std, y), nan=0.0)  # 0 * inf: y == mean
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


class MetricAccumulator:
    """Sums of the metrics per horizon step; ``state`` [horizon, 8 + bins] float64."""

    def __init__(self, horizon: int, bins: int = 10, device: torch.device | str = "cpu") -> None:
        self.horizon, self.bins = horizon, bins
        self.state = torch.zeros(horizon, len(_COLS) + bins, dtype=torch.float64, device=device)

    def update(self, mean: Tensor, std: Tensor, y: Tensor, mask: Tensor) -> None:
        """Add a batch: mean, std, y, mask [B, horizon, n, F] in the data's units."""
        mean, std, y = mean.double(), std.double(), y.double()
        m = mask.double()
        y = torch.where(mask, y, mean)  # masked cells contribute nothing (and no NaN)
        err = y - mean
        z = torch.nan_to_num(standardised(mean, std, y), nan=0.0)
        mape_ok = mask & (y.abs() > MAPE_EPS)
        dims = (0, 2, 3)  # sum over batch, node, feature -> [horizon]
        cols = [
            m.sum(dims),
            (err.abs() * m).sum(dims),
            (err * err * m).sum(dims),
            mape_ok.double().sum(dims),
            torch.where(mape_ok, err.abs() / y.abs().clamp_min(MAPE_EPS), 0.0).sum(dims),
            (gaussian_crps(mean, std, y) * m).sum(dims),
            ((z.abs() <= Z50).double() * m).sum(dims),
            ((z.abs() <= Z90).double() * m).sum(dims),
        ]
        u = pit(mean, std, y)
        idx = (u * self.bins).long().clamp(0, self.bins - 1)  # [B, H, n, F]
        hist = torch.zeros(self.horizon, self.bins, dtype=torch.float64, device=mean.device)
        idx_h = idx.transpose(0, 1).reshape(self.horizon, -1)
        hist.scatter_add_(1, idx_h, m.transpose(0, 1).reshape(self.horizon, -1))
        self.state += torch.cat([torch.stack(cols, dim=1), hist], dim=1).to(self.state.device)

    def result(self) -> dict:
        """Per-step lists (index 0 = first forecast step) and pooled means."""
        s = self.state.cpu()
        col = {name: s[:, i] for i, name in enumerate(_COLS)}
        n = col["n"].clamp_min(1)
        per_step = {
            "mae": col["abs"] / n,
            "rmse": (col["sq"] / n).sqrt(),
            "mape": col["ape"] / col["ape_n"].clamp_min(1),
            "crps": col["crps"] / n,
            "coverage_50": col["in50"] / n,
            "coverage_90": col["in90"] / n,
        }
        total = col["n"].sum().clamp_min(1)
        pooled = {
            "mae": col["abs"].sum() / total,
            "rmse": (col["sq"].sum() / total).sqrt(),
            "mape": col["ape"].sum() / col["ape_n"].sum().clamp_min(1),
            "crps": col["crps"].sum() / total,
            "coverage_50": col["in50"].sum() / total,
            "coverage_90": col["in90"].sum() / total,
        }
        hist = s[:, len(_COLS) :].sum(0)
        hist = hist / hist.sum().clamp_min(1)
        return {
            "horizon_steps": list(range(1, self.horizon + 1)),
            **{k: v.tolist() for k, v in per_step.items()},
            "mean": {k: float(v) for k, v in pooled.items()},
            "pit_histogram": hist.tolist(),
            # total-variation distance of the PIT histogram from uniform (0 = calibrated)
            "pit_uniform_distance": float(0.5 * (hist - 1 / self.bins).abs().sum()),
            "count": int(col["n"].sum()),
        }


# the baselines of every run: the last observed value and each sensor's train mean; and, where
# the time step divides a day, the historical average: each sensor's train mean at the target's
# time of day (pipeline/data/profile.py), the first baseline of traffic and air quality
BASELINES = ("last_value", "train_mean")
HISTORICAL = "historical_average"


class BaselineSpread:
    """The baselines as probabilistic forecasts: the root mean square error of each baseline
    per horizon step, in units of each sensor's train std, summed over train windows (float64,
    ranks merge by an all-reduce sum of ``state`` [baselines, horizon, 2])."""

    def __init__(
        self, horizon: int, names: tuple[str, ...] = BASELINES, device: torch.device | str = "cpu"
    ) -> None:
        self.names = names
        self.state = torch.zeros(len(names), horizon, 2, dtype=torch.float64, device=device)

    def update(self, y: Tensor, mask: Tensor, points: dict[str, Tensor]) -> None:
        """y, mask [B, horizon, n, F] normalised (train mean 0, std 1 per sensor); ``points``:
        each baseline's normalised forecast, broadcastable to y."""
        m = mask.double()
        for i, name in enumerate(self.names):
            err = (y.double() - points[name].double()) * m
            self.state[i, :, 0] += (err * err).sum((0, 2, 3))
            self.state[i, :, 1] += m.sum((0, 2, 3))

    def result(self) -> dict[str, Tensor]:
        """Per baseline, the spread per horizon step [horizon] (std units)."""
        rms = (self.state[..., 0] / self.state[..., 1].clamp_min(1)).sqrt()
        return {b: rms[i] for i, b in enumerate(self.names)}


def last_observed(x: Tensor, x_mask: Tensor, fallback: Tensor) -> Tensor:
    """The last observed input value per sensor and feature [B, n, F] (``fallback`` [n, F]
    where a sensor has no observation in the window); x, x_mask [B, time_in, n, F]."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    last = torch.where(x_mask, steps, -1).amax(dim=1)  # [B, n, F]
    value = x.gather(1, last.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(last >= 0, value, fallback.to(value.dtype))


class ComparisonAccumulator:
    """Sums for the test split's comparisons: per window (its origin), the observed cells and
    the absolute errors / CRPS of the model and the baselines; per sensor, the sum and count
    of the standardised residual (y - mean) / train std."""

    def __init__(
        self,
        origins: np.ndarray,
        num_nodes: int,
        horizon: int,
        device,
        spreads: dict[str, Tensor] | None = None,
        names: tuple[str, ...] = BASELINES,
    ) -> None:
        """``spreads``: per baseline, its Gaussian spread per horizon step in train-std units
        (:class:`BaselineSpread`); without it a baseline is a point forecast (CRPS = MAE).
        ``names``: the baselines, in the order of the columns."""
        self.origins, self.horizon, self.spreads = np.asarray(origins), horizon, spreads
        self.names = names
        # per window: observed cells, the model's absolute error and CRPS, then each
        # baseline's absolute error, then each baseline's CRPS
        self.cols = ("n", "model_abs", "model_crps")
        self.cols += tuple(f"{b}_abs" for b in names) + tuple(f"{b}_crps" for b in names)
        self.windows = torch.zeros(
            len(self.origins), len(self.cols), dtype=torch.float64, device=device
        )
        self.nodes = torch.zeros(num_nodes, 2, dtype=torch.float64, device=device)

    def update(
        self,
        origins: Tensor,
        nodes: Tensor,
        mean: Tensor,
        std: Tensor,
        y: Tensor,
        mask: Tensor,
        points: dict[str, Tensor],
        train_std: Tensor,
    ) -> None:
        """origins [B]; nodes [n] store indices; mean, std, y, mask [B, horizon, n, F] in the
        data's units; ``points``: each baseline's forecast in the data's units, broadcastable
        to y; train_std [n, F]."""
        mean, std, y = mean.double(), std.double(), y.double()
        m = mask.double()
        y = torch.where(mask, y, mean)
        err = y - mean
        dims = (1, 2, 3)  # sum over horizon, node, feature -> [B]
        base_abs, base_crps = [], []
        for name in self.names:
            point = points[name].double().expand_as(y)
            base_abs.append(((y - point).abs() * m).sum(dims))
            if self.spreads is None:
                base_crps.append(base_abs[-1])
                continue
            spread = self.spreads[name].to(y)[None, :, None, None] * train_std.double()
            crps = gaussian_crps(point, spread.expand_as(y), y)  # spread [1, H, n, F]
            base_crps.append((crps * m).sum(dims))
        cols = [
            m.sum(dims),
            (err.abs() * m).sum(dims),
            (gaussian_crps(mean, std, y) * m).sum(dims),
            *base_abs,
            *base_crps,
        ]
        rows = np.searchsorted(self.origins, origins.cpu().numpy())
        rows = torch.from_numpy(rows).to(self.windows.device)
        self.windows.index_add_(0, rows, torch.stack(cols, dim=1).to(self.windows.device))
        z = err / train_std.double()  # [B, horizon, n, F]
        per_node = torch.stack([(z * m).sum((0, 1, 3)), m.sum((0, 1, 3))], dim=1)  # [n, 2]
        self.nodes.index_add_(0, nodes.to(self.nodes.device), per_node.to(self.nodes.device))

    def window_losses(self) -> dict[str, np.ndarray]:
        """Per window with an observed target: its origin (time index), observed cells, and
        the model's MAE and CRPS; what ``launch/compare.py`` tests two runs on."""
        w = self.windows.cpu().numpy()
        seen = w[:, 0] > 0
        n = w[seen, 0]
        return {
            "origin": self.origins[seen],
            "count": n,
            "mae": w[seen, 1] / n,
            "crps": w[seen, 2] / n,
        }

    def result(self, neighbours: np.ndarray) -> dict:
        """Pooled MAE and CRPS of each baseline, Diebold-Mariano tests of the model against
        each (on the per-window MAE and CRPS), and Moran's I of the per-sensor mean residual
        over the k-nearest-neighbour graph ``neighbours`` [N, k] (itself first)."""
        w = self.windows.cpu().numpy()
        col = {name: w[:, i] for i, name in enumerate(self.cols)}
        seen = col["n"] > 0
        n = col["n"][seen]
        model_mae, model_crps = col["model_abs"][seen] / n, col["model_crps"][seen] / n
        out: dict = {}
        total = max(col["n"].sum(), 1)
        for b in self.names:
            out[b] = {
                "mae": float(col[f"{b}_abs"].sum() / total),
                "crps": float(col[f"{b}_crps"].sum() / total),
                "probabilistic": self.spreads is not None,
                "dm_mae": diebold_mariano(model_mae - col[f"{b}_abs"][seen] / n, self.horizon),
                "dm_crps": diebold_mariano(model_crps - col[f"{b}_crps"][seen] / n, self.horizon),
            }
        r = self.nodes.cpu().numpy()
        resid = np.where(r[:, 1] > 0, r[:, 0] / np.maximum(r[:, 1], 1), np.nan)
        return {"baselines": out, "morans_i": morans_i(resid, neighbours)}


def diebold_mariano(d: np.ndarray, horizon: int) -> dict:
    """Diebold-Mariano test of equal accuracy from the loss differential d_t = L_model,t -
    L_baseline,t of ``horizon``-step forecasts at successive origins.

    The variance of the mean differential counts autocovariances up to lag horizon - 1 (the
    overlap of h-step forecast errors); if that sum is not positive, the lag-0 variance alone
    is used. The statistic carries the Harvey-Leybourne-Newbold small-sample correction and is
    compared with Student's t on T - 1 degrees of freedom (two-sided p). A negative statistic
    means the model's loss is lower. Fewer than 2 * horizon + 1 windows, or a constant
    differential, give ``testable`` False with the ``reason`` (statistic and p None).
    """
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    t, h = len(d), horizon

    def untestable(reason: str) -> dict:
        mean = float(d.mean()) if t else None
        return {
            "statistic": None,
            "p_value": None,
            "mean_difference": mean,
            "T": t,
            "testable": False,
            "reason": reason,
        }

    if t < 2 * h + 1:
        return untestable(
            f"{t} test windows; the test at horizon {h} needs at least 2 x {h} + 1 = {2 * h + 1}"
        )
    mean = float(d.mean())
    dev = d - mean
    gamma = [float(dev[k:] @ dev[: t - k]) / t for k in range(h)]
    var = gamma[0] + 2 * sum(gamma[1:])
    if var <= 0:
        var = gamma[0]
    if var <= 0:
        return untestable("the loss differential is the same in every window")
    stat = mean / math.sqrt(var / t) * math.sqrt((t + 1 - 2 * h + h * (h - 1) / t) / t)
    p = float(2 * scipy.stats.t.sf(abs(stat), df=t - 1))
    return {
        "statistic": float(stat),
        "p_value": p,
        "mean_difference": mean,
        "T": t,
        "testable": True,
    }


def morans_i(values: np.ndarray, neighbours: np.ndarray) -> dict:
    """Moran's I of ``values`` [N] over the k-nearest-neighbour graph ``neighbours`` [N, k]
    (each row: the sensor itself, then its neighbours), with binary row-standardised weights.

    Sensors whose value is NaN (no observation) are left out with their edges. Expectation
    and variance are the moments under randomisation (Cliff and Ord), i.e. of I over all
    permutations of the values; the p-value is two-sided from the normal approximation.
    Positive I: residuals of neighbouring sensors agree (spatial structure left unexplained).
    """
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    n = int(keep.sum())

    def untestable(reason: str) -> dict:
        empty = dict.fromkeys(("I", "expected", "variance", "z", "p_value"))
        return {**empty, "n": n, "testable": False, "reason": reason}

    if n < 4:
        return untestable(f"{n} sensors with residuals; the test needs at least 4")
    index = np.full(len(values), -1, dtype=np.int64)
    index[keep] = np.arange(n)
    nb = index[np.asarray(neighbours)[keep][:, 1:]]  # [n, k - 1] kept rows, new indices
    if ((nb >= 0).sum(axis=1) >= n - 1).all():
        return untestable(
            f"the neighbour graph is complete ({n} sensors, {nb.shape[1]} neighbours each): I "
            "is -1/(N-1) whatever the residuals"
        )
    rows = np.repeat(np.arange(n), nb.shape[1])
    cols = nb.ravel()
    ok = cols >= 0
    adj = scipy.sparse.csr_matrix(
        (np.ones(int(ok.sum())), (rows[ok], cols[ok])), shape=(n, n)
    )  # duplicates (none expected) would add up
    degree = np.asarray(adj.sum(axis=1)).ravel()
    w = scipy.sparse.diags(1 / np.where(degree > 0, degree, 1)) @ adj
    z = values[keep] - values[keep].mean()
    s0 = float(w.sum())
    zz = float(z @ z)
    if s0 == 0:
        return untestable("no neighbour edges between sensors with residuals")
    if zz == 0:
        return untestable("every sensor has the same residual")
    moran = n / s0 * float(z @ (w @ z)) / zz
    s1 = 0.5 * float((w + w.T).power(2).sum())
    s2 = float(((np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()) ** 2).sum())
    b2 = n * float((z**4).sum()) / zz**2
    expected = -1 / (n - 1)
    second = (
        n * ((n * n - 3 * n + 3) * s1 - n * s2 + 3 * s0 * s0)
        - b2 * ((n * n - n) * s1 - 2 * n * s2 + 6 * s0 * s0)
    ) / ((n - 1) * (n - 2) * (n - 3) * s0 * s0)
    var = second - expected**2
    if var <= 0:
        return untestable("the graph leaves I no variance under randomisation")
    score = (moran - expected) / math.sqrt(var)
    p = float(2 * scipy.stats.norm.sf(abs(score)))
    return {
        "I": moran,
        "expected": expected,
        "variance": var,
        "z": score,
        "p_value": p,
        "n": n,
        "testable": True,
    }


def validation_row(val: dict) -> dict:
    """The flat view of a validation: its mean metrics as ``val_<metric>`` (what Tune ranks,
    tracking logs and metrics.json keeps), those at the sensors whose windows it hides as
    ``val_hidden_<metric>`` (train.val_hidden)."""
    row = {f"val_{k}": v for k, v in val["mean"].items()}
    if "hidden" in val:
        row.update({f"val_hidden_{k}": v for k, v in val["hidden"]["mean"].items()})
    return row


def monitored(val: dict, monitor: str) -> float:
    """The value of a validation that train.monitor names (lower is better)."""
    if monitor == "loss":
        return val["loss"]
    if monitor.startswith("hidden_"):
        return val["hidden"]["mean"][monitor.removeprefix("hidden_")]
    return val["mean"][monitor]


def test_row(test: dict) -> dict:
    """The flat view of the test metrics (tracking): pooled means (of seen and unseen sensors
    too, with held-out sensors; of each feature, with several), PIT distance, baselines and
    their Diebold-Mariano tests, Moran's I, and MAE / CRPS per horizon step."""
    flat = {f"test_{k}": v for k, v in test["mean"].items()}
    flat["test_pit_uniform_distance"] = test["pit_uniform_distance"]
    for group in ("seen", "unseen"):  # data.holdout_sensors
        if group in test:
            flat.update({f"test_{group}_{k}": v for k, v in test[group]["mean"].items()})
            if "ratio_to_oracle" in test[group]:
                flat[f"test_{group}_ratio_to_oracle"] = test[group]["ratio_to_oracle"]
    for name, f in test.get("per_feature", {}).items():  # MLflow keys: letters, _-. / only
        key = re.sub(r"[^\w\-. /]", "_", name)
        if f["count"]:
            flat.update({f"test_feature_{key}_{k}": v for k, v in f["mean"].items()})
    for name, base in test.get("baselines", {}).items():
        flat[f"test_{name}_mae"] = base["mae"]
        flat[f"test_{name}_crps"] = base["crps"]
        for loss in ("mae", "crps"):
            if base[f"dm_{loss}"]["testable"]:
                flat[f"test_dm_{loss}_vs_{name}"] = base[f"dm_{loss}"]["statistic"]
                flat[f"test_dm_{loss}_vs_{name}_p"] = base[f"dm_{loss}"]["p_value"]
    if test.get("morans_i", {}).get("testable"):
        flat["test_morans_i"] = test["morans_i"]["I"]
        flat["test_morans_i_p"] = test["morans_i"]["p_value"]
    for i, h in enumerate(test["horizon_steps"]):
        flat.update({f"test_mae_h{h}": test["mae"][i], f"test_crps_h{h}": test["crps"][i]})
    if "ratio_to_oracle" in test:
        flat["test_ratio_to_oracle"] = test["ratio_to_oracle"]["mean"]
        if test["dm_vs_oracle"]["testable"]:
            flat["test_dm_vs_oracle"] = test["dm_vs_oracle"]["statistic"]
            flat["test_dm_vs_oracle_p"] = test["dm_vs_oracle"]["p_value"]
    return flat
