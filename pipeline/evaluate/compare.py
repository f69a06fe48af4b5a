"""Statistical comparison of two finished runs on the same test windows (docs/design.md, section 4):
the Diebold-Mariano test, with the Harvey-Leybourne-Newbold correction, of run A against run B
on the per-window MAE and CRPS. The usual B is a baseline run, e.g. the same model with kernel
``none``; the last-value and train-mean baselines are tested inside every run's metrics.json.

Each run directory holds ``metrics.json`` and ``test_windows.npz`` (written at the end of
training by pipeline/train.py); both runs must come from the same store and horizon.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.evaluate.metrics import diebold_mariano
from pipeline.evaluate.report import dm_text


class CompareError(UserError, ValueError):
    """Two runs that cannot be compared, or a run directory without its results."""


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """metrics.json and the per-window test losses of a finished run."""
    run_dir = Path(run_dir)
    files = (run_dir / "metrics.json", run_dir / "test_windows.npz")
    for f in files:
        if not f.is_file():
            raise CompareError(
                f"{f} does not exist: give the directory of a finished training run "
                "(<train.out_dir>/<name>, written when the run ends)"
            )
    metrics = json.loads(files[0].read_text())
    with np.load(files[1]) as npz:
        windows = {k: npz[k] for k in npz.files}
    return metrics, windows


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """Pooled MAE and CRPS of both runs over their common test windows, and the
    Diebold-Mariano tests of A against B (negative statistic: A's loss is lower)."""
    (ma, wa), (mb, wb) = load_run(run_a), load_run(run_b)
    store_a, store_b = ma["store"], mb["store"]
    if store_a["fingerprint"] != store_b["fingerprint"]:
        raise CompareError(
            f"{run_a} was tested on store {store_a['path']} and {run_b} on "
            f"{store_b['path']}, which differ (fingerprints {store_a['fingerprint']} and "
            f"{store_b['fingerprint']}): compare runs on the same store"
        )
    horizon = len(ma["test"]["horizon_steps"])
    if len(mb["test"]["horizon_steps"]) != horizon:
        raise CompareError(
            f"{run_a} forecasts {horizon} steps and {run_b} "
            f"{len(mb['test']['horizon_steps'])} (data.horizon): compare runs of one horizon"
        )
    origins, ia, ib = np.intersect1d(wa["origin"], wb["origin"], return_indices=True)
    if len(origins) == 0:
        raise CompareError(f"{run_a} and {run_b} have no test window in common")
    out: dict = {"a": str(run_a), "b": str(run_b), "windows": int(len(origins))}
    for loss in ("mae", "crps"):
        la, lb = wa[loss][ia], wb[loss][ib]  # [windows], in origin order
        weights = wa["count"][ia]
        out[loss] = {
            "a": float(np.average(la, weights=weights)),
            "b": float(np.average(lb, weights=weights)),
            "dm": diebold_mariano(la - lb, horizon),
        }
    return out


def format_comparison(result: dict) -> str:
    lines = [f"A = {result['a']}", f"B = {result['b']}", f"{result['windows']} common test windows"]
    lines.append("loss   A         B         Diebold-Mariano (HLN)")
    for loss in ("mae", "crps"):
        r = result[loss]
        lines.append(f"{loss:<5} {r['a']:9.4f} {r['b']:9.4f} {dm_text(r['dm'])}")
    lines.append("negative statistic: A's loss is lower; p: two-sided, Student t on T - 1 dof")
    return "\n".join(lines)
