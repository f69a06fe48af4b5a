"""The fitted Gaussian process against the Bayes limit, per synthetic regime (docs/limit.md).

The fitted GP (pipeline/evaluate/gp.py) is the classical baseline of every run: fitted to the
train split, it forecasts each test window by exact conditioning. On a synthetic store the
exact oracle (pipeline/evaluate/oracle.py) knows the field's true law; a GP whose fitted
parameters are right comes close to it, and then it is a fair baseline (issue 20: within
1.03x of the oracle's CRPS on ``noisy``, ``outages`` and ``unseen``). For each regime of
``configs/regimes/`` (stores made by ``launch/preprocess.py`` when missing), on the test
windows, both given the input window only (held-out sensors never conditioned on): CRPS of
each and their ratio, the held-out sensors' alone in ``unseen``, the fitted parameters beside
the truth, and the seconds of each. Deterministic: no training, no seeds.

Usage: python benchmarks/fitted_gp.py [--regimes noisy outages unseen ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import SyntheticConfig, load_config  # noqa: E402
from pipeline.data.store import open_store  # noqa: E402
from pipeline.data.stream import WindowStream  # noqa: E402
from pipeline.evaluate import gp  # noqa: E402
from pipeline.evaluate.kalman import score  # noqa: E402
from pipeline.evaluate.oracle import Oracle  # noqa: E402

REGIMES = ("noisy", "outages", "unseen", "anisotropic", "long_range", "clustered")


def regime(name: str) -> dict:
    path = ROOT / "configs" / "regimes" / f"{name}.yaml"
    cfg = load_config(path)
    if not (ROOT / cfg.data.store / "COMPLETE").exists():
        subprocess.run([sys.executable, "launch/preprocess.py", "--config", str(path)],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    store = open_store(ROOT / cfg.data.store)
    time_in, horizon = cfg.data.time_in, cfg.data.horizon
    stream = WindowStream(
        store, "test", time_in, horizon, 1, 1, shuffle=False,
        holdout=cfg.data.holdout_sensors, daily_profile=True,
    )  # fmt: skip
    hidden = stream.hidden
    t0 = time.perf_counter()
    fitted = gp.forecast(store, stream, time_in, horizon)
    gp_s = time.perf_counter() - t0
    origins = np.asarray(stream.origins)
    values, mask = store["values"][:, :, 0].astype(np.float64), store["mask"][:, :, 0]
    given = mask if hidden is None else mask & ~hidden[None]
    truth = SyntheticConfig(**store.attrs["synthetic"])
    t0 = time.perf_counter()
    mean, std = Oracle(truth, store["coords"][:]).forecast(values, given, origins, horizon, time_in)
    oracle_s = time.perf_counter() - t0
    steps = origins[:, None] + np.arange(horizon)
    args = (values[steps], mask[steps], store["std"][:, 0], store["neighbours"][:], hidden)
    best = score(mean, std, *args)
    ours = score(fitted["mean"], fitted["std"], *args)
    out = {
        "regime": name,
        "sensors": int(store.shape[1]),
        "test_windows": int(len(origins)),
        "truth": {
            "family": truth.family,
            "range_km": truth.range_km,
            "sill": truth.variance,
            "nugget": truth.nugget,
            "phi": truth.ar_coef,
        },
        "fit": fitted["fit"],
        "oracle_crps": best["mean"]["crps"],
        "gp_crps": ours["mean"]["crps"],
        "ratio": ours["mean"]["crps"] / best["mean"]["crps"],
        "gp_coverage_90": ours["mean"]["coverage_90"],
        "gp_s": gp_s,
        "oracle_s": oracle_s,
    }
    if hidden is not None:
        out["unseen_ratio"] = ours["unseen"]["crps"] / best["unseen"]["crps"]
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| regime | oracle CRPS | fitted GP CRPS | ratio | GP cover90 | fitted (truth): family, "
        "range km, nugget share (micro-scale part), AR(1) | GP s | oracle s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, t = r["fit"], r["truth"]
        share = (f["micro"] + f["nugget"]) / (f["sill"] + f["micro"] + f["nugget"])
        micro = f["micro"] / (f["sill"] + f["micro"] + f["nugget"])
        true_share = t["nugget"] / (t["sill"] + t["nugget"])
        ratio = f"{r['ratio']:.3f}"
        if "unseen_ratio" in r:
            ratio += f" (held out: {r['unseen_ratio']:.3f})"
        lines.append(
            f"| {r['regime']} | {r['oracle_crps']:.4f} | {r['gp_crps']:.4f} | {ratio} | "
            f"{r['gp_coverage_90']:.3f} | {f['family']} ({t['family']}), {f['range_km']:.1f} "
            f"({t['range_km']:g}), {share:.2f} ({micro:.2f}) ({true_share:.2f}), "
            f"{f['phi']:.2f} ({t['phi']:g}) | {r['gp_s']:.0f} | {r['oracle_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"# {platform.machine()}, {platform.processor() or 'cpu'}", flush=True)
    results = [regime(name) for name in tqdm(args.regimes, desc="regimes")]
    print(table(results))
    print("(nugget share: (micro + nugget) / total variance; the truth's nugget is white)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
