"""Training, validation, early stopping, checkpoints and the final test evaluation.

One code path for one CPU process, many CPU processes (gloo), GPUs (NCCL) and nodes: the
DeepSpeed engine of pipeline/distributed.py steps the model; batches stream from the store
(pipeline/data.py), each rank its own share; only rank 0 prints and tracks. At the end:
``<out_dir>/<name>/metrics.json`` (schema in the README), the test split's per-window losses
(``test_windows.npz``, for ``launch/compare.py``), the exported model (``<out_dir>/<name>/model/``)
and, when tracking is on, the MLflow run and registered model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.data.geometry import positions_km
from pipeline.data.store import open_store
from pipeline.data.stream import WindowStream
from pipeline.evaluate.metrics import ComparisonAccumulator, MetricAccumulator, last_observed
from pipeline.model.export import export_model
from pipeline.model.forecaster import LOSSES, Forecaster
from pipeline.train import engine as distributed

if TYPE_CHECKING:
    from pipeline.track.tracking import Tracker

Reporter = Callable[[int, dict], None]  # (step, validation metrics) -> None (Ray Tune hook)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("x", "calendar") and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _forward(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean, std (float32, normalised units) and the loss mask (observed targets only)."""
    mean, std = engine(
        batch["x"], batch["x_mask"], batch["calendar"], batch["pos"], batch["neighbours"]
    )
    mask = batch["y_mask"] & batch["target"][None, None, :, None]
    return mean.float(), std.float(), mask


def _stream(cfg: Config, ctx, split: str, **kwargs) -> WindowStream:
    """This rank's share of ``split`` (see pipeline/data.py)."""
    return WindowStream(
        cfg.data.store,
        split,
        cfg.data.time_in,
        cfg.data.horizon,
        cfg.train.batch_size,
        cfg.model.knn,
        seed=cfg.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        tile_size=cfg.data.tile_size,
        hops=cfg.model.layers,  # the halo covers the model's receptive field
        **kwargs,
    )


def evaluate(
    engine, cfg: Config, split: str, ctx, max_batches: int | None = None, compare: bool = False
) -> dict:
    """Metrics of ``split`` in the data's units, over every rank's share (one pass); with
    ``compare``, also the Diebold-Mariano tests against the baselines and Moran's I of the
    residuals (pipeline/metrics.py)."""
    stream = _stream(cfg, ctx, split, shuffle=False)
    store = open_store(cfg.data.store)
    mean_s = torch.from_numpy(store["mean"][:]).to(ctx.device)
    std_s = torch.from_numpy(store["std"][:]).to(ctx.device)
    acc = MetricAccumulator(cfg.data.horizon, device=ctx.device)
    comparison = (
        ComparisonAccumulator(stream.origins, store.shape[1], cfg.data.horizon, ctx.device)
        if compare
        else None
    )
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    dtype = distributed.engine_dtype(engine)
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(stream):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, ctx.device, dtype)
            mean, std, mask = _forward(engine, batch)
            loss = LOSSES[cfg.train.loss](mean, std, batch["y"], mask)
            loss_sum += torch.stack([loss.double() * mask.sum(), mask.sum().double()])
            m, s = mean_s[batch["nodes"]], std_s[batch["nodes"]]  # [n, F]
            mean, std, y = mean * s + m, std * s, batch["y"] * s + m  # the data's units
            acc.update(mean, std, y, mask)
            if comparison is not None:
                last = last_observed(batch["x"].float(), batch["x_mask"], torch.zeros_like(m))
                comparison.update(
                    batch["origins"], batch["nodes"], mean, std, y, mask, last * s + m, m, s
                )
    engine.train()
    distributed.all_reduce_sum(acc.state)
    distributed.all_reduce_sum(loss_sum)
    result = acc.result()
    result["loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1))
    if comparison is not None:
        distributed.all_reduce_sum(comparison.windows)
        distributed.all_reduce_sum(comparison.nodes)
        result.update(comparison.result(store["neighbours"][:]))
        result["windows"] = comparison.window_losses()  # popped by the caller (not JSON)
    return result


def validation_row(val: dict) -> dict:
    """A validation's mean metrics as ``val_<metric>`` (what Tune ranks and metrics.json keeps)."""
    return {f"val_{k}": v for k, v in val["mean"].items()}


def kernel_params(model: Forecaster) -> list[dict]:
    return [{"layer": i, **k.describe()} for i, k in enumerate(model.kernels())]


def train(cfg: Config, report: Reporter | None = None, tracker: Tracker | None = None) -> dict:
    """Train ``cfg``; returns the content of metrics.json (on every rank)."""
    with distributed.process_group(cfg.train.device) as ctx:
        return _train(cfg, ctx, report, tracker)


def _train(
    cfg: Config, ctx: distributed.Context, report: Reporter | None, tracker: Tracker | None
) -> dict:
    if cfg.model.backend == "block" and ctx.device.type != "cuda":
        raise ConfigError(
            "model.backend=block trains on CUDA GPUs only (FlexAttention has no backward on "
            "CPU); use model.backend=knn here (the same math over each sensor's k nearest)"
        )
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir) / cfg.name
    ckpt_dir = run_dir / "checkpoints"
    store = open_store(cfg.data.store)
    t, n, f = store.shape
    if cfg.train.resume == "never" and ctx.is_main and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    distributed.barrier()
    if tracker is None and cfg.tracking.enabled:
        from pipeline.track.tracking import Tracker  # MLflow is needed only when tracking is on

        tracker = Tracker(cfg, ctx.is_main)
    if tracker is not None:
        tracker.start(store)  # fails early on an unreachable tracking server

    model = Forecaster(cfg.model, cfg.data.time_in, cfg.data.horizon, f, n)
    _, frame = positions_km(store["coords"][:], store.attrs["crs"])
    model.set_frame(torch.tensor(frame, dtype=torch.float32))
    if cfg.train.activation_checkpointing:
        model.checkpoint_blocks = True
    engine = distributed.build_engine(model.to(ctx.device), cfg)
    dtype = distributed.engine_dtype(engine)

    state = {
        "step": 0,
        "micro_step": 0,
        "best_val": math.inf,
        "bad_evals": 0,
        "history": [],
        "train_loss": [],
    }
    restored = None
    if cfg.train.resume == "auto":
        restored = distributed.load_checkpoint(engine, ckpt_dir, ctx, cfg.train.zero_stage)
    if restored is not None:
        state.update({k: restored[k] for k in state})
        if ctx.is_main:
            print(
                f"resumed from step {state['step']} ({ckpt_dir})"
                + (", data re-sharded for the new world size" if restored["resharded"] else "")
            )

    stream = _stream(cfg, ctx, "train", start_step=state["micro_step"])
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.train.loader_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=cfg.train.loader_workers > 0,
    )
    batches = iter(loader)
    loss_fn = LOSSES[cfg.train.loss]
    bar = tqdm(
        total=cfg.train.steps,
        initial=state["step"],
        desc=cfg.name,
        unit="step",
        disable=not ctx.is_main,
        dynamic_ncols=True,
    )
    wait_s = compute_s = 0.0
    samples = 0
    stopped_early = False
    while state["step"] < cfg.train.steps and not stopped_early:
        step = state["step"]
        model.set_qk(step >= cfg.train.kernel_warmup_steps)
        step_loss = 0.0
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = _to_device(next(batches), ctx.device, dtype)
            t1 = time.perf_counter()
            mean, std, mask = _forward(engine, batch)
            loss = loss_fn(mean, std, batch["y"], mask)
            engine.backward(loss)
            engine.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            wait_s += t1 - t0
            compute_s += time.perf_counter() - t1
            step_loss += loss.item() / cfg.train.grad_accum
            samples += batch["x"].shape[0] * ctx.world_size
            state["micro_step"] += 1
        state["step"] = step = step + 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            state["train_loss"].append([step, step_loss])
            kernels = kernel_params(model)
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                range=f"{kernels[0].get('range_km', [0])[0]:.1f}km",
                wait=f"{wait_s / max(wait_s + compute_s, 1e-9):.0%}",
            )
            if tracker is not None:
                tracker.log_step(step, step_loss, kernels, engine.get_lr()[0])
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            val = evaluate(engine, cfg, "val", ctx, cfg.train.eval_batches)
            state["history"].append({"step": step, "val_loss": val["loss"], **validation_row(val)})
            if tracker is not None:
                tracker.log_validation(step, val)
            if report is not None:
                report(step, val)
            if val["loss"] < state["best_val"] - 1e-6:
                state["best_val"], state["bad_evals"] = val["loss"], 0
            else:
                state["bad_evals"] += 1
            patience = cfg.train.patience
            stopped_early = patience is not None and state["bad_evals"] >= patience
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stopped_early:
            distributed.save_checkpoint(engine, ckpt_dir, step, state, ctx)
    bar.close()
    del batches  # stops the prefetch thread (or the loader workers) now, not at exit

    test = evaluate(engine, cfg, "test", ctx, compare=True)
    windows = test.pop("windows")
    metrics = {
        "name": cfg.name,
        "steps": state["step"],
        "stopped_early": stopped_early,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "precision": cfg.train.precision,
        "test": test,
        "validation": state["history"],
        "train_loss": state["train_loss"],
        "kernel": kernel_params(model),
        "truth": store.attrs.get("truth"),
        "store": {"path": str(store.path), "fingerprint": store.fingerprint()},
        "timing": {
            "samples_per_s": samples / max(wait_s + compute_s, 1e-9),
            "step_s": (wait_s + compute_s)
            / max(1, state["micro_step"] - (restored or {}).get("micro_step", 0)),
            "data_wait_fraction": wait_s / max(wait_s + compute_s, 1e-9),
        },
    }
    if ctx.is_main:
        model_dir = export_model(model, cfg, store, run_dir / "model")
        if tracker is not None:
            metrics["model_uri"] = tracker.finish(metrics, model_dir, store)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "test_windows.npz.tmp"  # per-window losses, for launch/compare.py
        with open(tmp, "wb") as f:
            np.savez(f, **windows)
        tmp.replace(run_dir / "test_windows.npz")
        tmp = run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(run_dir / "metrics.json")
    distributed.barrier()
    return metrics
