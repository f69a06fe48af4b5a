"""Geostatistical attention backends: forward + backward time and peak memory, one layer.

CPU (no CUDA): dense and knn, each (backend, N) in its own subprocess (peak memory is that
case's own) under an address-space limit and a time budget; knn up to N = 262,144.

GPU (``--device cuda``): dense (SDPA with a materialised bias, until it does not fit), knn and
block (FlexAttention) in bf16, 4 heads x 64, Matern-3/2 bias with learnable range, for N from
16,384 to 1,048,576; time is the median of CUDA-event-timed repetitions after warm-up (and
compilation), memory the peak allocated during the call minus what was allocated before. Each
block setting also reports its *recall*: the share of each sensor's true 32 nearest
neighbours (SciPy KD-tree) that its query block's selected key blocks hold. Ratios to knn are
measured in the same run.

Usage: python benchmarks/attention.py [--device cpu|cuda] [--sizes ...] [--json FILE]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS = 4
RECALL_K = 32

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from pipeline.model.attention import GeoAttention
from pipeline.model.covariance import CovarianceBias
from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import k_nearest
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


def measure_cpu(backend: str, n: int, k: int, limit_gb: float, timeout: float) -> dict:
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


def run_cpu(args) -> None:
    import torch

    print(
        f"# machine: {platform.machine()} {platform.processor()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"4 heads x 32, batch 1, matern32, k = {args.k}; fp32 forward + backward"
    )
    print("| N | dense s | dense MB | knn s | knn MB | dense/knn time | dense/knn memory |")
    print("|---|---|---|---|---|---|---|")
    dense_dead = False
    for n in args.sizes or [1024, 4096, 8192, 16384, 65536, 262144]:
        d = (
            {"status": "skipped"}
            if dense_dead
            else measure_cpu("dense", n, args.k, args.memory_limit_gb, args.timeout)
        )
        dense_dead = d["status"] != "ok"
        kn = measure_cpu("knn", n, args.k, args.memory_limit_gb, args.timeout)
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


# --------------------------------------------------------------------------------------------
# GPU


def sensors(n: int, curve: str) -> np.ndarray:
    """n sensors uniform in a square of constant density (1 per 0.1 km^2), in curve order,
    as 3-D positions in km [n, 3]."""
    from pipeline.data.geometry import positions_km
    from pipeline.data.neighbours import curve_order

    side = (n * 0.1) ** 0.5
    pos, frame = positions_km(np.random.default_rng(0).uniform(0, side, (n, 2)), "xy")
    return pos[curve_order(pos, frame, curve)]


def recall(pos: np.ndarray, key_index: np.ndarray, block_size: int, sample: int = 200_000):
    """Mean share of each sensor's true RECALL_K nearest neighbours inside its query block's
    selected key blocks (over a sample of sensors), and the share of sensors that keep all."""
    from scipy.spatial import cKDTree

    n = len(pos)
    who = np.random.default_rng(1).choice(n, min(n, sample), replace=False)
    _, nn = cKDTree(pos).query(pos[who], k=RECALL_K, workers=-1)  # [S, K]
    key_blocks = key_index[who // block_size]  # [S, KB]
    hit = (nn[:, :, None] // block_size == key_blocks[:, None, :]).any(-1)  # [S, K]
    share = hit.mean(axis=1)
    return float(share.mean()), float((share == 1).mean())


def measure_gpu(backend, n, pos_np, block_size=128, key_blocks=8, learn=True, reps=10) -> dict:
    import torch

    from pipeline.data.neighbours import k_nearest
    from pipeline.model.attention import GeoAttention
    from pipeline.model.block_attention import block_plan
    from pipeline.model.covariance import CovarianceBias

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    pos = torch.tensor(pos_np, dtype=torch.float32, device=dev)
    observed = torch.ones(1, n, dtype=torch.bool, device=dev)
    kernel = CovarianceBias("matern32", HEADS, 10.0, learnable=learn)
    attn = GeoAttention(HEADS * 64, HEADS, kernel, backend).to(dev, torch.bfloat16)
    attn.kernel.float()  # kernel parameters stay float32, as in bf16 training
    x = torch.randn(1, n, HEADS * 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    extra: dict = {}
    nb = None
    if backend == "knn":
        nb = torch.from_numpy(k_nearest(pos_np, RECALL_K)[0]).to(dev)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def step():
        plan = block_plan(pos, observed, block_size, key_blocks) if backend == "block" else nb
        out = attn(x, pos, observed, plan)
        out.float().square().mean().backward()
        return plan

    try:
        t0 = time.perf_counter()
        plan = step()  # warm-up (compiles FlexAttention)
        torch.cuda.synchronize()
        extra["first_call_s"] = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    if backend == "block":
        extra["recall"], extra["full"] = recall(pos_np, plan.key_index.cpu().numpy(), block_size)
    return {"status": "ok", "seconds": float(np.median(times)), "peak_gb": peak, **extra}


def run_gpu(args) -> None:
    import torch

    rows = []
    name = torch.cuda.get_device_name()
    print(
        f"# GPU: {name}; torch {torch.__version__}; one layer, 4 heads x 64, bf16, batch 1, "
        f"matern32 with learnable range, forward + backward; knn k = {RECALL_K}; "
        "block = FlexAttention (curve, block size, key blocks per query block)",
        flush=True,
    )

    def emit(row):
        rows.append(row)
        fmt = lambda key, f: f.format(row[key]) if key in row else "-"  # noqa: E731
        status = row["status"] if row["status"] != "ok" else ""
        print(
            f"| {row['N']} | {row['backend']} | {row.get('setting', '')} | "
            f"{fmt('ms', '{:.1f}')} | {fmt('peak_gb', '{:.2f}')} | {fmt('recall', '{:.4f}')} | "
            f"{fmt('time_vs_knn', '{:.2f}x')} | {fmt('mem_vs_knn', '{:.2f}x')} | {status} |",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"gpu": name, "rows": rows}, indent=2))

    print("| N | backend | setting | ms | peak GB | recall@32 | time / knn | memory / knn | |")
    print("|---|---|---|---|---|---|---|---|---|")
    positions: dict = {}
    dense_dead = False
    settings = [("hilbert", 128, 8, True)]
    big = max(args.sizes)
    for n in sorted(args.sizes, reverse=True) if args.largest_first else args.sizes:
        for curve in ("hilbert", "morton"):
            if curve == "hilbert" or n == big:
                positions[curve] = sensors(n, curve)
        knn = measure_gpu("knn", n, positions["hilbert"])
        emit({"N": n, "backend": "knn", **knn, **_ms(knn)})
        if not dense_dead:
            dense = measure_gpu("dense", n, positions["hilbert"])
            dense_dead = dense["status"] != "ok"
            emit({"N": n, "backend": "dense", **dense, **_ms(dense), **_ratio(dense, knn)})
        variants = settings
        if n == big:  # the settings worth comparing, at the size of the target
            variants = [
                ("hilbert", 128, 8, True),
                ("morton", 128, 4, True),
                ("hilbert", 128, 4, True),
                ("hilbert", 128, 8, False),
            ]
        for curve, bs, kb, learn in variants:
            res = measure_gpu("block", n, positions[curve], bs, kb, learn)
            setting = f"{curve} {bs} x {kb}" + ("" if learn else ", range frozen")
            emit(
                {"N": n, "backend": "block", "setting": setting, **res, **_ms(res)}
                | _ratio(res, knn)
            )
        torch.cuda.empty_cache()


def _ms(res: dict) -> dict:
    return {"ms": res["seconds"] * 1e3} if res.get("status") == "ok" else {}


def _ratio(res: dict, knn: dict) -> dict:
    if res.get("status") != "ok" or knn.get("status") != "ok":
        return {}
    return {
        "time_vs_knn": res["seconds"] / knn["seconds"],
        "mem_vs_knn": res["peak_gb"] / max(knn["peak_gb"], 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--largest-first", action="store_true", help="GPU: N = 1M first")
    parser.add_argument("--json", default=None, help="GPU: write the rows here as they come")
    args = parser.parse_args()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        args.sizes = args.sizes or [16384, 65536, 262144, 1048576]
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
