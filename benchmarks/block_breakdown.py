"""Where the block backend's time goes at one N: the plan (block selection + BlockMask), the
FlexAttention forward, and forward + backward, for head sizes and key-block counts, with the
bias on (matern32, learnable range) and off (family ``none``: the attention kernel alone).

CUDA: compiled FlexAttention in bf16, time the median of CUDA-event-timed repetitions after
warm-up, memory the peak allocated above what was allocated before. CPU: the plan and the
eager forward only (FlexAttention has no CPU backward), for a quick check of the script.

Usage: python benchmarks/block_breakdown.py [--n 1048576] [--device auto|cpu|cuda]
       [--head-dims 32 64] [--key-blocks 4 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import sensors  # noqa: E402
from pipeline.model.block_attention import block_attention, block_plan  # noqa: E402
from pipeline.model.covariance import CovarianceBias  # noqa: E402

HEADS = 4


def timed(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` after one warm-up call, and its peak memory (GB, CUDA)."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps, float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times)), (torch.cuda.max_memory_allocated() - base) / 2**30


def profile(fn, title: str, top: int = 12) -> None:
    """Print the CUDA kernels of one call of ``fn`` by total time (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"## {title}", flush=True)
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=top, max_name_column_width=70
    )
    print(table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1 << 20)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--key-blocks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--bias", nargs="+", default=["matern32", "none"])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument(
        "--kernel-options",
        type=json.loads,
        nargs="+",
        default=[None],
        help="CUDA: FlexAttention settings to compare, JSON each, e.g. '{\"BLOCK_M\": 64}'; "
        "null: the backend's choice (TUNED_KERNEL_OPTIONS); {}: FlexAttention's defaults",
    )
    parser.add_argument("--profile", action="store_true", help="CUDA: top kernels of each fwd+bwd")
    parser.add_argument(
        "--frozen",
        nargs="+",
        choices=["none", "nugget", "range", "both"],
        default=["none"],
        help="kernel parameters without gradient, each choice a row: what their backward costs",
    )
    args = parser.parse_args()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    where = torch.cuda.get_device_name() if cuda else "CPU (plan and forward only)"
    print(f"# {where}; torch {torch.__version__}; N = {args.n}, {HEADS} heads, batch 1", flush=True)
    pos = torch.tensor(sensors(args.n, "hilbert"), dtype=torch.float32, device=device)
    observed = torch.ones(1, args.n, dtype=torch.bool, device=device)
    rows = []
    print("| head dim | key blocks | bias | plan ms | forward ms | fwd+bwd ms | fwd+bwd peak GB |")
    print("|---|---|---|---|---|---|---|")
    for kb in args.key_blocks:
        plan_s, _ = timed(
            lambda kb=kb: block_plan(pos, observed, args.block_size, kb), device, args.reps
        )
        plan = block_plan(pos, observed, args.block_size, kb)
        for dh in args.head_dims:
            for family, opts, frozen in itertools.product(
                args.bias, args.kernel_options, args.frozen
            ):
                kernel = CovarianceBias(family, HEADS, 10.0).to(device)
                kernel.raw_nugget.requires_grad_(frozen not in ("nugget", "both"))
                kernel.log_range.requires_grad_(frozen not in ("range", "both"))
                qkv = [
                    torch.randn(1, HEADS, args.n, dh, device=device, dtype=dtype) for _ in range(3)
                ]

                def forward(qkv=qkv, kernel=kernel, plan=plan, opts=opts):
                    with torch.no_grad():
                        return block_attention(*qkv, pos, observed, kernel, plan, True, opts)

                fwd_s, _ = timed(forward, device, args.reps)
                both_s, peak = float("nan"), float("nan")
                if cuda and not args.forward_only:
                    leaves = [t.clone().requires_grad_(True) for t in qkv]

                    def both(leaves=leaves, kernel=kernel, plan=plan, opts=opts):
                        out = block_attention(*leaves, pos, observed, kernel, plan, True, opts)
                        out.float().square().mean().backward()

                    both_s, peak = timed(both, device, args.reps)
                    if args.profile:
                        profile(both, f"head dim {dh}, {kb} key blocks, bias {family}")
                row = {
                    "head_dim": dh,
                    "key_blocks": kb,
                    "bias": family,
                    "kernel_options": opts,
                    "frozen": frozen,
                    "plan_ms": plan_s * 1e3,
                    "forward_ms": fwd_s * 1e3,
                    "fwd_bwd_ms": both_s * 1e3,
                    "peak_gb": peak,
                }
                rows.append(row)
                print(
                    f"| {dh} | {kb} | {family} {opts or ''} frozen {frozen} | {row['plan_ms']:.1f} "
                    f"| {row['forward_ms']:.1f} "
                    f"| {row['fwd_bwd_ms']:.1f} | {peak:.2f} |",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps({"device": where, "rows": rows}))
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
