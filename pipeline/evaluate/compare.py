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


RunDirs = str | Path | list[str | Path]


def _runs(side: RunDirs) -> list[Path]:
    return [Path(d) for d in side] if isinstance(side, list) else [Path(side)]


def compare_runs(run_a: RunDirs, run_b: RunDirs) -> dict:
    """Pooled MAE and CRPS of both sides over their common test windows, and the
    Diebold-Mariano tests of A against B (negative statistic: A's loss is lower). A side is a
    run directory or several (seeds of one model): its per-window losses are then averaged
    over its runs, so that the test is over seeds, not of one run against one run."""
    side_a, side_b = _runs(run_a), _runs(run_b)
    loaded = [(d, *load_run(d)) for d in side_a + side_b]
    first, m0, w0 = loaded[0]
    for d, m, _ in loaded[1:]:
        if m["store"]["fingerprint"] != m0["store"]["fingerprint"]:
            raise CompareError(
                f"{first} was tested on store {m0['store']['path']} and {d} on "
                f"{m['store']['path']}, which differ (fingerprints "
                f"{m0['store']['fingerprint']} and {m['store']['fingerprint']}): compare runs "
                "on the same store"
            )
        if len(m["test"]["horizon_steps"]) != len(m0["test"]["horizon_steps"]):
            raise CompareError(
                f"{first} forecasts {len(m0['test']['horizon_steps'])} steps and {d} "
                f"{len(m['test']['horizon_steps'])} (data.horizon): compare runs of one horizon"
            )
    horizon = len(m0["test"]["horizon_steps"])
    origins = w0["origin"]
    for _, _, w in loaded[1:]:
        origins = np.intersect1d(origins, w["origin"])
    if len(origins) == 0:
        raise CompareError(f"{' '.join(map(str, side_a + side_b))} have no test window in common")

    def at_common(w: dict, loss: str) -> np.ndarray:  # [windows], in origin order
        return w[loss][np.searchsorted(w["origin"], origins)]

    out: dict = {
        "a": " ".join(map(str, side_a)),
        "b": " ".join(map(str, side_b)),
        "runs": [len(side_a), len(side_b)],
        "windows": int(len(origins)),
    }
    weights = at_common(w0, "count")
    for loss in ("mae", "crps"):
        la = np.mean([at_common(w, loss) for _, _, w in loaded[: len(side_a)]], axis=0)
        lb = np.mean([at_common(w, loss) for _, _, w in loaded[len(side_a) :]], axis=0)
        out[loss] = {
            "a": float(np.average(la, weights=weights)),
            "b": float(np.average(lb, weights=weights)),
            "dm": diebold_mariano(la - lb, horizon),
        }
    return out


def format_comparison(result: dict) -> str:
    lines = [f"A = {result['a']}", f"B = {result['b']}", f"{result['windows']} common test windows"]
    if result["runs"] != [1, 1]:
        na, nb = result["runs"]
        lines.append(f"per-window losses averaged over {na} and {nb} runs")
    lines.append("loss   A         B         Diebold-Mariano (HLN)")
    for loss in ("mae", "crps"):
        r = result[loss]
        lines.append(f"{loss:<5} {r['a']:9.4f} {r['b']:9.4f} {dm_text(r['dm'])}")
    lines.append("negative statistic: A's loss is lower; p: two-sided, Student t on T - 1 dof")
    return "\n".join(lines)
