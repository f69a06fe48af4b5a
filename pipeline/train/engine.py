"""DeepSpeed: process group, engine from the typed config, collectives (the only module that
imports deepspeed; it knows nothing of the model).

- ``process_group``: NCCL on CUDA, gloo on CPU, for the duration of a ``with`` block; works
  under ``deepspeed``, ``torchrun`` and plain ``python`` (one process: RANK/WORLD_SIZE/MASTER_*
  are filled in with a free local port); a group it created is destroyed on the way out.
  A group on one machine (MASTER_ADDR on loopback) opens no port beyond 127.0.0.1: it meets
  through a file (torch's TCPStore listens on every interface and takes no bind address,
  pytorch/pytorch#173909), and gloo / NCCL sockets stay on ``lo``. A multi-node group keeps
  torch's ``env://`` rendezvous on MASTER_ADDR.
- ``ds_config``: the DeepSpeed JSON generated from ``Config.train`` (ZeRO stage, precision,
  micro-batch, gradient accumulation and clipping).
- ``build_engine``: the DeepSpeed engine of a model with the trainer's optimizer and schedule.
- ``full_weights``, ``set_weights``: the module's whole weights (ZeRO-3 gathered), for the
  best-validation weights that are tested and exported.
- ``all_reduce_sum``, ``barrier``: the collectives the trainer needs.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config, ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_meeting_file() -> Path | None:
    """Where the ranks of a one-machine group meet (torch's FileStore), or None to keep the
    ``env://`` TCP rendezvous: for a multi-node group, or for ranks that a launcher did not
    start together (they would not agree on the file: it is named by their parent process)."""
    env = os.environ
    if env.get("MASTER_ADDR", "127.0.0.1") not in LOOPBACK:
        return None
    world = env.get("WORLD_SIZE", "1")
    local = env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "1" if "RANK" not in env else None))
    if local != world:
        return None
    if "RANK" not in env:  # a group of one: a file of its own
        return Path(tempfile.mkdtemp(prefix="sit-meet-")) / "store"
    return Path(tempfile.gettempdir()) / f"sit-meet-{os.getppid()}-{env.get('MASTER_PORT')}"


BUILD_IDLE_S = 120  # a JIT build lock whose folder saw no write for this long is left over


def _build_locks() -> list[Path]:
    """The lock files of DeepSpeed's JIT-built shared-memory op in the torch extensions
    cache (``$TORCH_EXTENSIONS_DIR`` or its default, one folder per Python and accelerator)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    folders = [Path(root)] if root else list(Path(get_default_build_root()).glob("*"))
    return [f / "deepspeed_shm_comm" / "lock" for f in folders]


def clear_stale_build_lock(idle_s: float = BUILD_IDLE_S, poll_s: float = 2.0) -> None:
    """A run killed while DeepSpeed builds its op leaves the build's lock file, and torch then
    waits for it forever, silently. A lock whose folder has had no write for ``idle_s`` is
    removed (and said); one that a live build keeps writing is waited for, saying so."""
    said = False
    for lock in _build_locks():
        while lock.exists():
            try:
                newest = max(p.stat().st_mtime for p in lock.parent.iterdir())
            except (FileNotFoundError, ValueError):
                continue  # the build finished while we looked
            if time.time() - newest >= idle_s:
                lock.unlink(missing_ok=True)
                print(f"removed {lock}: a build lock left by a run killed while building")
                break
            if not said:
                print(f"waiting for {lock} (another process is building DeepSpeed's op)")
                said = True
            time.sleep(poll_s)


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

    clear_stale_build_lock()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible: set train.device=auto or cpu"
        )
    filled: dict[str, str] = {}
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        filled = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        filled["MASTER_PORT"] = str(_free_port())
    meeting = _local_meeting_file()
    if meeting is not None:
        filled.update({"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"})
    filled = {k: v for k, v in filled.items() if k not in os.environ}
    os.environ.update(filled)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU processes sharing a node: split its cores instead of oversubscribing them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    created = not dist.is_initialized()
    backend = "nccl" if use_cuda else "gloo"
    try:
        if created and meeting is not None:
            dist.init_process_group(
                backend,
                init_method=f"file://{meeting}",
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
            )
        if created:  # DeepSpeed adopts a group that exists
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        yield Context(
            dist.get_rank(),
            local_rank,
            dist.get_world_size(),
            torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        )
    finally:
        if created and dist.is_initialized():
            deepspeed.comm.destroy_process_group()
        if meeting is not None and created and os.environ.get("RANK") == "0":
            meeting.unlink(missing_ok=True)
            if meeting.parent.name.startswith("sit-meet-"):  # a group of one's own folder
                meeting.parent.rmdir()
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


def build_engine(model: torch.nn.Module, optimizer, schedule, cfg: Config):
    """The DeepSpeed engine of ``model``, stepping the trainer's optimizer and schedule."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config(cfg)
    )
    return engine


@contextmanager
def _whole(engine, modify: bool = False) -> Iterator[None]:
    """The engine's module with its full parameters in the block (ZeRO-3 gathers its
    partitions, and with ``modify`` scatters rank 0's values back; other stages hold them)."""
    import deepspeed

    params = list(engine.module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=0 if modify else None, enabled=stage3
    ):
        yield


def full_weights(engine) -> dict[str, torch.Tensor]:
    """A CPU copy of the engine module's full state dict (the best-validation weights that
    pipeline/train/loop.py keeps); the same on every rank."""
    with _whole(engine):
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def set_weights(engine, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (from :func:`full_weights`) into the engine's module on every rank."""
    with _whole(engine, modify=True):
        engine.module.load_state_dict(weights)


def checkpoint_globals() -> set[str]:
    """The classes that DeepSpeed's checkpoint files may hold besides tensors and containers
    (its loss scalers, the ZeRO stage enum, fragment addresses): the allow-list of
    pipeline/train/checkpoint.py's check that nothing else (no code) is pickled in them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    classes = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
    return {f"{c.__module__}.{c.__qualname__}" for c in classes}


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place; returns it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
