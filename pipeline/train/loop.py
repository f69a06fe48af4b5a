"""Training in four named steps: ``setup`` (store, model, engine, resume), ``fit`` (the
loop: steps, validation, early stopping, checkpoints), ``evaluate`` (one split's metrics),
``finish`` (test metrics, export, metrics.json).

One code path for one CPU process, many CPU processes (gloo), GPUs (NCCL) and nodes: the
DeepSpeed engine of pipeline/train/engine.py steps the model; batches stream from the store
(pipeline/data/stream.py), each rank its own share; only rank 0 prints and tracks. The store
is opened once per run. At the end: ``<out_dir>/<name>/metrics.json`` (schema in the README),
the test split's per-window losses (``test_windows.npz``, for ``launch/compare.py``), the
exported model (``<out_dir>/<name>/model/``) and, with a tracker (pipeline/track/tracking.py,
created by the caller), the MLflow run and registered model.

Host-device synchronisation points of the loop are marked ``# sync``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.data.geometry import positions_km
from pipeline.data.store import Store, open_store
from pipeline.data.stream import WindowStream, target_features
from pipeline.evaluate.metrics import (
    BaselineSpread,
    ComparisonAccumulator,
    MetricAccumulator,
    last_observed,
    validation_row,
)
from pipeline.evaluate.oracle import limit
from pipeline.model.export import export_model
from pipeline.model.forecaster import build_model
from pipeline.model.losses import LOSSES
from pipeline.train import checkpoint, engine
from pipeline.train.guards import check_fits, pins, run_lock
from pipeline.train.optimizer import optimizer

Reporter = Callable[[int, dict], None]  # (step, validation metrics) -> None (Ray Tune hook)


class Tracker(Protocol):
    """What training asks of a tracker (pipeline/track/tracking.py implements it)."""

    def start(self, store: Store, resuming: bool) -> None: ...
    def log_step(self, step: int, loss: float, kernels: list[dict], lr: float) -> None: ...
    def log_validation(self, step: int, val: dict) -> None: ...
    def finish(self, metrics: dict, model_dir: Path, store: Store) -> str | None: ...
    def fail(self, exc: BaseException) -> None: ...


@dataclass
class Run:
    """What a training run holds from setup to finish."""

    cfg: Config
    ctx: engine.Context
    store: Store
    run_dir: Path
    model: nn.Module  # Forecaster, or a PeerForecaster (model.peer)
    engine: Any
    dtype: torch.dtype
    tracker: Tracker | None
    state: dict
    resumed: dict | None
    streams: dict[str, WindowStream] = field(default_factory=dict)


@dataclass
class Fitted:
    """How the loop ended and what it cost."""

    stopped_early: bool = False
    wait_s: float = 0.0
    compute_s: float = 0.0
    samples: int = 0


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("x", "calendar", "profile") and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _forward(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean, std (float32, normalised units) and the loss mask (observed targets only)."""
    mean, std = engine(
        batch["x"],
        batch["x_mask"],
        batch["calendar"],
        batch["pos"],
        batch["neighbours"],
        batch["nodes"],  # the sensors' store indices (model.node_embedding)
        batch.get("profile"),  # model.daily_profile
    )
    mask = batch["y_mask"] & batch["target"][None, None, :, None]
    return mean.float(), std.float(), mask


GROUPS = ("seen", "unseen")  # test metrics by side of data.holdout_sensors


def _stream(run: Run, split: str, **kwargs) -> WindowStream:
    """This rank's share of ``split`` (see pipeline/data/stream.py)."""
    cfg, ctx = run.cfg, run.ctx
    return WindowStream(
        run.store,
        split,
        cfg.data.time_in,
        cfg.data.horizon,
        cfg.train.batch_size,
        min(cfg.model.knn, run.store["neighbours"].shape[1]),  # check_fits: knn backend fits
        seed=cfg.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        tile_size=cfg.data.tile_size,
        hops=cfg.model.layers,  # the halo covers the model's receptive field
        holdout=cfg.data.holdout_sensors,
        sensor_dropout=cfg.train.sensor_dropout,
        daily_profile=cfg.model.daily_profile,
        target=cfg.data.target,
        **kwargs,
    )


def kernel_params(model: nn.Module) -> list[dict]:
    """Learned kernel parameters per layer; none for kernel ``none`` (nothing is learned)."""
    kernels = model.kernels()  # none for a peer
    if not kernels or kernels[0].family == "none":
        return []
    return [{"layer": i, **k.describe()} for i, k in enumerate(kernels)]


def train(cfg: Config, report: Reporter | None = None, tracker: Tracker | None = None) -> dict:
    """Train ``cfg``; returns the content of metrics.json (on every rank)."""
    run_dir = Path(cfg.train.out_dir) / cfg.name
    with engine.process_group(cfg.train.device) as ctx, run_lock(run_dir, ctx.is_main):
        try:
            run = setup(cfg, ctx, tracker)
            fitted = fit(run, report)
            return finish(run, fitted)
        except BaseException as exc:
            if tracker is not None:
                tracker.fail(exc)  # not FINISHED, which MLflow would record at exit
            raise


def setup(cfg: Config, ctx: engine.Context, tracker: Tracker | None = None) -> Run:
    """Open the store, build the model and its DeepSpeed engine, resume from a checkpoint."""
    if cfg.model.backend == "block" and ctx.device.type != "cuda":
        raise ConfigError(
            "model.backend=block trains on CUDA GPUs only (FlexAttention has no backward on "
            "CPU); use model.backend=knn here (the same math over each sensor's k nearest)"
        )
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir) / cfg.name
    store = open_store(cfg.data.store)
    check_fits(cfg, store)
    old = run_dir / "checkpoints"
    if cfg.train.resume == "never" and ctx.is_main and old.exists():
        # kept, not deleted: a run started afresh by mistake loses nothing
        aside = run_dir / f"checkpoints.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
        old.rename(aside)
        print(f"train.resume=never: the earlier checkpoints of {run_dir} moved to {aside}")
    engine.barrier()
    if tracker is not None:  # fails early on an unreachable tracking server
        resuming = cfg.train.resume == "auto" and checkpoint.newest_complete(old)[0] is not None
        tracker.start(store, resuming)

    _, frame = positions_km(store["coords"][:], store.attrs["crs"])
    model = build_model(
        cfg.model,
        cfg.data.time_in,
        cfg.data.horizon,
        store.shape[2],
        store.shape[1],
        frame=torch.tensor(frame, dtype=torch.float32),
        checkpoint_layers=cfg.train.activation_checkpointing,
        targets=target_features(store.attrs["features"], cfg.data.target, str(store.path)),
    ).to(ctx.device)
    eng = engine.build_engine(model, *optimizer(model, cfg), cfg)
    state = {
        "step": 0,
        "micro_step": 0,
        "best_val": math.inf,
        "bad_evals": 0,
        "history": [],
        "train_loss": [],
        "pins": pins(cfg, store),
    }
    resumed = None
    if cfg.train.resume == "auto":
        resumed = checkpoint.load(
            eng, run_dir / "checkpoints", ctx, cfg.train.zero_stage, state["pins"]
        )
    if resumed is not None:
        state.update({k: resumed[k] for k in state if k != "pins"})
        if ctx.is_main:
            print(
                f"resumed from step {state['step']} ({run_dir / 'checkpoints'})"
                + (", data re-sharded for the new world size" if resumed["resharded"] else "")
            )
    return Run(
        cfg, ctx, store, run_dir, model, eng, engine.engine_dtype(eng), tracker, state, resumed
    )


def _check_store(run: Run) -> None:
    """Stop when the store at ``data.store`` is no longer the one this run started on (replaced
    by a preprocess with data.overwrite=true): batches would mix two data sets."""
    now = run.store.fingerprint()
    changed = torch.tensor([float(now != run.state["pins"]["data.store"])], dtype=torch.float64)
    if engine.all_reduce_sum(changed.to(run.ctx.device)).item() > 0:  # sync
        raise ConfigError(
            f"store {run.store.path} was replaced while this run read it (fingerprint "
            f"{run.state['pins']['data.store']}, now {now}); the run stops at step "
            f"{run.state['step']} rather than mix two data sets: start it afresh "
            "(train.resume=never) on the new store, or restore the old one and resume"
        )


def fit(run: Run, report: Reporter | None = None) -> Fitted:
    """The training loop from the run's current step to ``train.steps`` or early stopping."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    loader = torch.utils.data.DataLoader(
        _stream(run, "train", start_step=state["micro_step"]),
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
    fitted = Fitted()
    while state["step"] < cfg.train.steps and not fitted.stopped_early:
        step = state["step"]
        run.model.set_qk(step >= cfg.train.kernel_warmup_steps)
        step_loss = 0.0
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = _to_device(next(batches), ctx.device, run.dtype)
            t1 = time.perf_counter()
            mean, std, mask = _forward(run.engine, batch)
            loss = loss_fn(mean, std, batch["y"], mask)
            run.engine.backward(loss)
            run.engine.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()  # sync: honest step timing
            fitted.wait_s += t1 - t0
            fitted.compute_s += time.perf_counter() - t1
            step_loss += loss.item() / cfg.train.grad_accum  # sync: the loss
            fitted.samples += batch["x"].shape[0] * ctx.world_size
            state["micro_step"] += 1
        finite = torch.tensor([float(math.isfinite(step_loss))], dtype=torch.float64)
        if engine.all_reduce_sum(finite.to(ctx.device)).item() < ctx.world_size:  # sync
            raise ConfigError(
                f"step {step + 1}: the training loss is not finite on some rank (this rank: "
                f"{step_loss}); check the store (python launch/preprocess.py --verify "
                f"{cfg.data.store}) and lower train.lr"
            )
        state["step"] = step = step + 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            state["train_loss"].append([step, step_loss])
            kernels = kernel_params(run.model)  # sync: kernel parameters to the host
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                range=f"{kernels[0]['range_km'][0]:.1f}km" if kernels else "none",
                wait=f"{fitted.wait_s / max(fitted.wait_s + fitted.compute_s, 1e-9):.0%}",
            )
            if run.tracker is not None:
                run.tracker.log_step(step, step_loss, kernels, run.engine.get_lr()[0])
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            _check_store(run)
            val = evaluate(run, "val", cfg.train.eval_batches)  # sync: all-reduced metrics
            state["history"].append({"step": step, "val_loss": val["loss"], **validation_row(val)})
            if run.tracker is not None:
                run.tracker.log_validation(step, val)
            if report is not None:
                report(step, val)
            if val["loss"] < state["best_val"] - 1e-6:
                state["best_val"], state["bad_evals"] = val["loss"], 0
            else:
                state["bad_evals"] += 1
            patience = cfg.train.patience
            fitted.stopped_early = patience is not None and state["bad_evals"] >= patience
        if (
            step % cfg.train.checkpoint_every == 0
            or step == cfg.train.steps
            or fitted.stopped_early
        ):
            _check_store(run)  # a checkpoint never records a run that read two data sets
            checkpoint.save(run.engine, run.run_dir / "checkpoints", step, state, ctx)
    bar.close()
    del batches  # stops the prefetch thread (or the loader workers) now, not at exit
    return fitted


def baseline_spreads(run: Run) -> dict[str, torch.Tensor]:
    """The Gaussian spread per horizon step of each baseline (pipeline/evaluate/metrics.py,
    BaselineSpread), fitted on ``train.eval_batches`` batches of train windows per rank."""
    cfg, ctx = run.cfg, run.ctx
    spread = BaselineSpread(cfg.data.horizon, device=ctx.device)
    stream = _stream(run, "train", shuffle=False)
    targets = torch.from_numpy(stream.targets).to(ctx.device)  # data.target
    for i, batch in enumerate(stream):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        x, x_mask = batch["x"].to(ctx.device), batch["x_mask"].to(ctx.device)
        mask = batch["y_mask"].to(ctx.device) & batch["target"].to(ctx.device)[None, None, :, None]
        last = last_observed(x, x_mask, torch.zeros_like(x[0, 0]))  # [B, n, F] normalised
        last = last[..., targets]  # [B, n, F_t]
        spread.update(batch["y"].to(ctx.device), mask, last)
    engine.all_reduce_sum(spread.state)
    return spread.result()


def evaluate(
    run: Run,
    split: str,
    max_batches: int | None = None,
    compare: bool = False,
    spreads: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Metrics of ``split`` in the data's units, over every rank's share (one pass); with
    ``compare``, also the Diebold-Mariano tests against the baselines and Moran's I of the
    residuals (pipeline/evaluate/metrics.py); ``spreads`` make the baselines Gaussian
    forecasts (:func:`baseline_spreads`)."""
    cfg, ctx, store = run.cfg, run.ctx, run.store
    if split not in run.streams:  # built once per run: tiles, positions, the split's windows
        run.streams[split] = _stream(run, split, shuffle=False)
    stream = run.streams[split]
    targets = torch.from_numpy(stream.targets).to(ctx.device)  # data.target
    mean_s = torch.from_numpy(stream.mean).to(ctx.device)[:, targets]  # [N, F_t]
    std_s = torch.from_numpy(stream.std).to(ctx.device)[:, targets]
    acc = MetricAccumulator(cfg.data.horizon, device=ctx.device)
    # held-out sensors (data.holdout_sensors): the test split reports each side on its own
    groups = {}
    if stream.hidden is not None and split == "test":
        groups = {g: MetricAccumulator(cfg.data.horizon, device=ctx.device) for g in GROUPS}
    # pooled metrics mix the features' units: with several, each is reported on its own too
    features = [store.attrs["features"][i] for i in stream.targets]
    per_feature = {}
    if len(features) > 1:
        per_feature = {f: MetricAccumulator(cfg.data.horizon, device=ctx.device) for f in features}
    comparison = (
        ComparisonAccumulator(stream.origins, store.shape[1], cfg.data.horizon, ctx.device, spreads)
        if compare
        else None
    )
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    run.engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(stream):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, ctx.device, run.dtype)
            mean, std, mask = _forward(run.engine, batch)
            loss = LOSSES[cfg.train.loss](mean, std, batch["y"], mask)
            loss_sum += torch.stack([loss.double() * mask.sum(), mask.sum().double()])
            m, s = mean_s[batch["nodes"]], std_s[batch["nodes"]]  # [n, F]
            mean, std, y = mean * s + m, std * s, batch["y"] * s + m  # the data's units
            acc.update(mean, std, y, mask)
            for j, feature in enumerate(per_feature.values()):
                pick = slice(j, j + 1)  # [B, horizon, n, 1]
                feature.update(mean[..., pick], std[..., pick], y[..., pick], mask[..., pick])
            if groups:
                hidden = batch["hidden"][None, None, :, None]  # [1, 1, n, 1]
                groups["unseen"].update(mean, std, y, mask & hidden)
                groups["seen"].update(mean, std, y, mask & ~hidden)
            if comparison is not None:
                x, x_mask = batch["x"][..., targets].float(), batch["x_mask"][..., targets]
                last = last_observed(x, x_mask, torch.zeros_like(m))  # [B, n, F_t]
                comparison.update(
                    batch["origins"], batch["nodes"], mean, std, y, mask, last * s + m, m, s
                )
    run.engine.train()
    engine.all_reduce_sum(acc.state)
    engine.all_reduce_sum(loss_sum)
    if float(acc.state[:, 0].sum()) == 0:  # column "n": observed targets
        raise ConfigError(
            f"the {split} split of {store.path} has no observed target in its windows: its "
            "scores would be empty, not perfect; check the timestamps (data.source.time_format) "
            "and data.train_fraction / data.val_fraction"
        )
    result = acc.result()
    for name, group in groups.items():
        engine.all_reduce_sum(group.state)
        result[name] = {"sensors": int((stream.hidden == (name == "unseen")).sum())}
        result[name].update(group.result())
    if per_feature:
        result["per_feature"] = {}
    for name, feature in per_feature.items():
        engine.all_reduce_sum(feature.state)
        result["per_feature"][name] = feature.result()
    result["loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1))
    bad = [k for k, v in {"loss": result["loss"], **result["mean"]}.items() if not math.isfinite(v)]
    if bad:
        raise ConfigError(
            f"the {split} split's {', '.join(bad)} are not finite: the model or the store "
            f"({store.path}) gives NaN or inf; check it with python launch/preprocess.py "
            "--verify and lower train.lr"
        )
    if comparison is not None:
        engine.all_reduce_sum(comparison.windows)
        engine.all_reduce_sum(comparison.nodes)
        result.update(comparison.result(store["neighbours"][:]))
        result["windows"] = comparison.window_losses()  # popped by the caller (not JSON)
    return result


def finish(run: Run, fitted: Fitted) -> dict:
    """Test metrics, the exported model, tracking, metrics.json (written last, atomically)."""
    cfg, ctx, state, store = run.cfg, run.ctx, run.state, run.store
    spreads = baseline_spreads(run)
    t0 = time.perf_counter()
    test = evaluate(run, "test", compare=True, spreads=spreads)
    test_s = time.perf_counter() - t0
    windows = test.pop("windows")
    oracle = None
    if ctx.is_main and cfg.train.oracle:  # a synthetic store's Bayes limit (evaluate/oracle.py)
        stream = run.streams["test"]
        oracle = limit(
            store, cfg.data.time_in, cfg.data.horizon, stream.origins, windows, test, stream.hidden
        )
    if oracle is not None and "ratio_to_oracle" in oracle:
        test["ratio_to_oracle"] = oracle.pop("ratio_to_oracle")
        test["dm_vs_oracle"] = oracle.pop("dm_vs_oracle")
        for group in GROUPS if "unseen" in test else ():
            ratio = test[group]["mean"]["crps"] / oracle["window"][f"{group}_crps"]
            test[group]["ratio_to_oracle"] = ratio
    busy = max(fitted.wait_s + fitted.compute_s, 1e-9)
    metrics = {
        "name": cfg.name,
        "steps": state["step"],
        "stopped_early": fitted.stopped_early,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "precision": cfg.train.precision,
        "test": test,
        "validation": state["history"],
        "train_loss": state["train_loss"],
        "kernel": kernel_params(run.model),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "point_forecast": cfg.model.peer is not None,  # std 0: CRPS = MAE, no coverage
        "truth": store.attrs.get("truth"),
        "oracle": oracle,
        "store": {"path": str(store.path), "fingerprint": store.fingerprint()},
        "timing": {
            "samples_per_s": fitted.samples / busy,
            "step_s": busy / max(1, state["micro_step"] - (run.resumed or {}).get("micro_step", 0)),
            "data_wait_fraction": fitted.wait_s / busy,
            # the test pass (forward, metrics, baselines) per window, this rank's share
            "test_s_per_window": test_s / max(1, len(run.streams["test"].origins)),
        },
    }
    if ctx.is_main:
        model_dir = export_model(run.model, cfg, store, run.run_dir / "model")
        if run.tracker is not None:
            metrics["model_uri"] = run.tracker.finish(metrics, model_dir, store)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run.run_dir / "test_windows.npz.tmp"  # per-window losses, for launch/compare.py
        with open(tmp, "wb") as f:
            np.savez(f, **windows)
        tmp.replace(run.run_dir / "test_windows.npz")
        tmp = run.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(run.run_dir / "metrics.json")
    engine.barrier()
    return metrics
