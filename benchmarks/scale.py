"""One full training step of the forecaster on the whole network (every layer, loss, backward,
AdamW step): time and peak memory as N grows, to show how cost scales.

The model is ``configs/large.yaml``'s (4 layers of d_model 128, 4 heads, Matern-3/2 with
learnable range, activation checkpointing per block), on windows [1, 12, N, 1] of random data
at sensors uniform in a square (constant density) sorted along the configured curve; bf16
autocast on GPU (fp32 weights and optimizer state), fp32 on CPU. Time: median of timed steps
after warm-up (which compiles FlexAttention); memory: peak allocated (GPU) or peak RSS growth
(CPU) during the steps.

Usage: python benchmarks/scale.py [--sizes 65536 262144 1048576] [--device auto|cpu|cuda]
       [--backend block|knn] [--config configs/large.yaml] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.geometry import positions_km  # noqa: E402
from pipeline.data.neighbours import curve_order, k_nearest  # noqa: E402
from pipeline.model.forecaster import Forecaster  # noqa: E402
from pipeline.model.losses import LOSSES  # noqa: E402
from pipeline.train.optimizer import parameter_groups  # noqa: E402


def one_size(cfg, n: int, device: torch.device, reps: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    side = (n * 0.1) ** 0.5
    pos, frame = positions_km(rng.uniform(0, side, (n, 2)), "xy")
    pos = pos[curve_order(pos, frame, cfg.data.curve)]
    nb = None
    if cfg.model.backend == "knn":
        nb = torch.from_numpy(k_nearest(pos, cfg.model.knn)[0]).to(device)
    pos_t = torch.tensor(pos, dtype=torch.float32, device=device)
    ti, hz = cfg.data.time_in, cfg.data.horizon
    model = Forecaster(
        cfg.model,
        ti,
        hz,
        1,
        frame=torch.tensor(frame, dtype=torch.float32),
        checkpoint_layers=cfg.train.activation_checkpointing,
    ).to(device)
    opt = torch.optim.AdamW(parameter_groups(model, 1e-3, 1e-2, 0.0))
    x = torch.randn(1, ti, n, 1, device=device)
    y = torch.randn(1, hz, n, 1, device=device)
    mask = torch.rand(1, ti, n, 1, device=device) > 0.05
    y_mask = torch.ones_like(y, dtype=torch.bool)
    cal = torch.randn(1, 4, device=device)
    loss_fn = LOSSES[cfg.train.loss]
    cuda = device.type == "cuda"

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            mean, std = model(x, mask, cal, pos_t, nb)
        loss = loss_fn(mean.float(), std.float(), y, y_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()  # warm-up: compiles FlexAttention, allocates optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    return {
        "N": n,
        "step_s": float(np.median(times)),
        "first_step_s": first,
        "peak_gb": peak,
        "loss_finite": bool(torch.isfinite(loss).item()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/large.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backend", choices=["block", "knn", "dense"], default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [f"model.backend={args.backend}"] if args.backend else []
    cfg = load_config(args.config, overrides)
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    m = cfg.model
    print(
        f"# {where}; torch {torch.__version__}; {m.layers} layers x d_model {m.d_model}, "
        f"{m.heads} heads, backend {m.backend}"
        + (f" ({cfg.data.curve} {m.block_size} x {m.key_blocks})" if m.backend == "block" else "")
        + f", {'bf16 autocast' if device == 'cuda' else 'fp32'}, activation checkpointing "
        f"{cfg.train.activation_checkpointing}; one window [1, {cfg.data.time_in}, N, 1]"
    )
    print("| N | step s | first step s | peak GB | step / N (us per sensor) |")
    print("|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        try:
            r = one_size(cfg, n, torch.device(device), args.reps)
        except torch.OutOfMemoryError:
            r = {"N": n, "status": "out of memory"}
            print(f"| {n} | out of memory | | | |", flush=True)
        else:
            print(
                f"| {n} | {r['step_s']:.3f} | {r['first_step_s']:.1f} | {r['peak_gb']:.2f} | "
                f"{r['step_s'] / n * 1e6:.3f} |",
                flush=True,
            )
        rows.append(r)
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            Path(args.json).write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
