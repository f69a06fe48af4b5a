"""dense vs knn geostatistical attention: forward + backward time and peak memory on CPU.

Each (backend, N) runs in its own subprocess (so peak memory is that case's own), with an
address-space limit so that dense attention fails cleanly instead of swapping, and a 60 s
budget: a case over it is reported as such, and larger N are skipped for that backend.
Memory is the peak resident set size during the call minus the size before it.

Usage: python benchmarks/attention.py [--sizes 1024 4096 16384 65536] [--k 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from pipeline.attention import GeoAttention
from pipeline.covariance import CovarianceBias
from pipeline.geometry import positions_km
from pipeline.neighbours import k_nearest
backend, n, k, limit_gb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
heads, d_head = 4, 32
torch.manual_seed(0)
pos, _ = positions_km(np.random.default_rng(0).uniform(0, 100 * (n / 1024) ** 0.5, (n, 2)), "xy")
nb = torch.from_numpy(k_nearest(pos, k)[0]) if backend == "knn" else None
pos = torch.tensor(pos, dtype=torch.float32)
attn = GeoAttention(heads * d_head, heads, CovarianceBias("matern32", heads, 10.0), backend)
x = torch.randn(1, n, heads * d_head, requires_grad=True)
observed = torch.ones(1, n, dtype=torch.bool)
def step():
    out = attn(x, pos, observed, nb)
    out.square().mean().backward()
step()  # warm-up
import psutil; rss0 = psutil.Process().memory_info().rss
t0 = time.perf_counter(); reps = 0
while True:
    step(); reps += 1
    if time.perf_counter() - t0 > 1.0 or reps >= 5: break
seconds = (time.perf_counter() - t0) / reps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_mb": max(peak - rss0, 0) / 2**20}))
"""


def measure(backend: str, n: int, k: int, limit_gb: float, timeout: float) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, backend, str(n), str(k), str(limit_gb)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"> {timeout:.0f} s"}
    if proc.returncode != 0:
        oom = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
        return {"status": "out of memory" if oom else f"failed: {proc.stderr.strip()[-200:]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 65536])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    import torch

    print(
        f"# machine: {platform.machine()} {platform.processor()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"4 heads x 32, batch 1, matern32, k = {args.k}"
    )
    print("| N | dense s | dense MB | knn s | knn MB | dense/knn time | dense/knn memory |")
    print("|---|---|---|---|---|---|---|")
    dense_dead = False
    for n in args.sizes:
        d = (
            {"status": "skipped"}
            if dense_dead
            else measure("dense", n, args.k, args.memory_limit_gb, args.timeout)
        )
        dense_dead = d["status"] != "ok"
        kn = measure("knn", n, args.k, args.memory_limit_gb, args.timeout)
        fmt = lambda r, key: f"{r[key]:.3f}" if r["status"] == "ok" else r["status"]  # noqa: E731
        ratio_t = ratio_m = "-"
        if d["status"] == kn["status"] == "ok":
            ratio_t = f"{d['seconds'] / kn['seconds']:.1f}x"
            ratio_m = f"{d['peak_mb'] / max(kn['peak_mb'], 1e-9):.1f}x"
        print(
            f"| {n} | {fmt(d, 'seconds')} | {fmt(d, 'peak_mb')} | {fmt(kn, 'seconds')} | "
            f"{fmt(kn, 'peak_mb')} | {ratio_t} | {ratio_m} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
