"""DeepSpeed: process group, engine from the typed config, checkpoints (the only module that
imports deepspeed).

- ``process_group``: NCCL on CUDA, gloo on CPU, for the duration of a ``with`` block; works
  under ``deepspeed``, ``torchrun`` and plain ``python`` (one process: RANK/WORLD_SIZE/MASTER_*
  are filled in with a free local port); a group it created is destroyed on the way out.
- ``ds_config``: the DeepSpeed JSON generated from ``Config.train`` (ZeRO stage, precision,
  micro-batch, gradient accumulation and clipping).
- ``build_engine``: a client ``torch.optim.AdamW`` (no JIT-compiled fused ops) with the
  kernel parameters in their own group, and a warm-up + cosine schedule that DeepSpeed steps
  and checkpoints.
- checkpoints: DeepSpeed's engine state plus, per rank, the trainer state (step, data
  position, RNG states) saved with plain tensors/containers so everything loads with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.model.forecaster import parameter_groups


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(device: str = "auto") -> Iterator[Context]:
    """Join (or create) the process group for the duration of the block; yields this
    process's rank and device.

    A group this call created is destroyed on the way out (a gloo group left to the
    interpreter's exit aborts the process: "terminate called without an active exception"),
    and the environment of a group of one is restored, so the next run in the same process
    (a reused Ray Tune actor, a test) starts afresh on a new port.
    """
    import deepspeed
    import deepspeed.comm

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    filled: list[str] = []
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        one["MASTER_PORT"] = str(_free_port())
        filled = [k for k in one if k not in os.environ]
        os.environ.update({k: one[k] for k in filled})
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU processes sharing a node: split its cores instead of oversubscribing them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    created = not dist.is_initialized()
    try:
        if created:
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
        yield Context(
            dist.get_rank(),
            local_rank,
            dist.get_world_size(),
            torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        )
    finally:
        if created and dist.is_initialized():
            deepspeed.comm.destroy_process_group()
        for key in filled:
            os.environ.pop(key, None)


def ds_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed configuration generated from the typed config."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def lr_lambda(cfg: Config):
    """Multiplier of the peak learning rate: linear warm-up, then cosine to min_lr_ratio."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(model: torch.nn.Module, cfg: Config):
    """The DeepSpeed engine of ``model`` with AdamW and the warm-up + cosine schedule."""
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(parameter_groups(model, t.lr, t.kernel_lr, t.weight_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config(cfg)
    )
    return engine


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict[str, Any]:
    """RNG states of torch, NumPy and Python as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, trainer_state: dict, ctx: Context) -> None:
    """Engine state (DeepSpeed) + this rank's trainer state; ``latest`` moves last."""
    tag = f"step{step:08d}"
    # trainer state first: DeepSpeed writes `latest` at the end of save_checkpoint, so a
    # checkpoint that `latest` names is complete on every rank
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(
        {**trainer_state, "rng": rng_state(), "world_size": ctx.world_size},
        ckpt_dir / tag / f"trainer_rank{ctx.rank}.pt",
    )
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag)


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_checkpoint(engine, ckpt_dir: Path, ctx: Context, zero_stage: int) -> dict | None:
    """Restore the latest checkpoint; returns this rank's trainer state (None if none)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    own = ckpt_dir / tag / f"trainer_rank{ctx.rank}.pt"
    first = torch.load(ckpt_dir / tag / "trainer_rank0.pt", weights_only=True)
    saved_world = int(first["world_size"])
    if saved_world != ctx.world_size and zero_stage > 0:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was written by {saved_world} processes with ZeRO "
            f"stage {zero_stage}, whose optimizer state is partitioned per process: resume "
            f"with {saved_world} processes, or start a new run (train.resume=never)"
        )
    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    state = torch.load(own, weights_only=True) if own.is_file() else dict(first)
    if own.is_file() and saved_world == ctx.world_size:
        set_rng_state(state["rng"])
    state["resharded"] = saved_world != ctx.world_size
    return state


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place; returns it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
