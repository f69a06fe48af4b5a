"""Training in three named steps: ``setup`` (store, model, engine, resume), ``fit`` (the
loop: steps, validation, early stopping, the best validation weights, checkpoints),
``finish`` (the best weights back, test metrics, export, metrics.json); one split's metrics
are pipeline/train/evaluation.py.

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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.data.geometry import positions_km
from pipeline.data.store import open_store
from pipeline.data.stream import target_features
from pipeline.evaluate import gp
from pipeline.evaluate.metrics import monitored, validation_row
from pipeline.evaluate.oracle import limit
from pipeline.model.export import export_model
from pipeline.model.forecaster import build_model
from pipeline.model.losses import LOSSES
from pipeline.train import checkpoint, engine
from pipeline.train.averaging import WeightAverage
from pipeline.train.evaluation import GROUPS, baseline_spreads, evaluate
from pipeline.train.guards import check_fits, pins, run_lock
from pipeline.train.optimizer import optimizer
from pipeline.train.run import (
    Run,
    Tracker,
    auxiliary_loss,
    forward,
    kernel_estimate,
    kernel_params,
    split_stream,
    to_device,
)

Reporter = Callable[[int, dict], None]  # (step, validation metrics) -> None (Ray Tune hook)


@dataclass
class Fitted:
    """How the loop ended and what it cost."""

    stopped_early: bool = False
    wait_s: float = 0.0
    compute_s: float = 0.0
    samples: int = 0
    wall_s: float = 0.0  # the loop's wall time in this process: steps, validations, checkpoints


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
        "best_step": 0,  # the step of the best validation (train.monitor)
        "bad_evals": 0,
        "history": [],
        "train_loss": [],
        "pins": pins(cfg, store),
        "ema": None,  # the weight average (train.ema_decay): name -> tensor
    }
    resumed = None
    if cfg.train.resume == "auto":
        resumed = checkpoint.load(
            eng, run_dir / "checkpoints", ctx, cfg.train.zero_stage, state["pins"]
        )
    if resumed is not None:
        state.update({k: resumed[k] for k in state if k != "pins" and k in resumed})
        if ctx.is_main:
            print(
                f"resumed from step {state['step']} ({run_dir / 'checkpoints'})"
                + (", data re-sharded for the new world size" if resumed["resharded"] else "")
            )
    average = None
    if cfg.train.ema_decay is not None:
        average = WeightAverage(model, cfg.train.ema_decay, state["ema"])
        state["ema"] = average.shadow  # saved with every checkpoint
    return Run(
        cfg,
        ctx,
        store,
        run_dir,
        model,
        eng,
        engine.engine_dtype(eng),
        tracker,
        state,
        resumed,
        average,
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
        split_stream(run, "train", start_step=state["micro_step"]),
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
    start = time.perf_counter()
    try:  # the bar ends its line also when a step raises: an error then starts a line
        while state["step"] < cfg.train.steps and not fitted.stopped_early:
            step = state["step"]
            run.model.set_qk(step >= cfg.train.kernel_warmup_steps)
            step_loss = 0.0
            for _ in range(cfg.train.grad_accum):
                t0 = time.perf_counter()
                batch = to_device(next(batches), ctx.device, run.dtype)
                t1 = time.perf_counter()
                mean, std, mask = forward(run.engine, batch)
                loss = loss_fn(mean, std, batch["y"], mask)
                aux = auxiliary_loss(run.engine)  # the field variogram's fit
                run.engine.backward(loss if aux is None else loss + aux)
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
            if run.average is not None:
                run.average.update(step - 1)
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
                with averaged(run):
                    val = evaluate(run, "val", cfg.train.eval_batches)  # sync: all-reduced
                    state["history"].append(
                        {"step": step, "val_loss": val["loss"], **validation_row(val)}
                    )
                    if run.tracker is not None:
                        run.tracker.log_validation(step, val)
                    if report is not None:
                        report(step, val)
                    value = monitored(val, cfg.train.monitor)
                    if value < state["best_val"] - 1e-6:
                        state["best_val"], state["best_step"], state["bad_evals"] = value, step, 0
                        if cfg.train.restore_best:  # the same on every rank (ZeRO-3: gathered)
                            weights = engine.full_weights(run.engine)
                            if ctx.is_main:
                                best_dir = run.run_dir / "checkpoints"
                                checkpoint.save_best(weights, best_dir, step, value)
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
                keep = cfg.train.keep_checkpoints
                checkpoint.save(run.engine, run.run_dir / "checkpoints", step, state, ctx, keep)
    finally:
        bar.close()
    fitted.wall_s = time.perf_counter() - start
    del batches  # stops the prefetch thread (or the loader workers) now, not at exit
    return fitted


def averaged(run: Run) -> AbstractContextManager:
    """The block sees the weight average (train.ema_decay), or the weights as trained."""
    return run.average.applied() if run.average is not None else nullcontext()


def restore_best(run: Run) -> int:
    """Load the weights of the best validation (train.restore_best) for the test and the
    export, or else the weight average if there is one; returns the step whose weights are
    tested (the last one without the best)."""
    cfg, state = run.cfg, run.state
    if not cfg.train.restore_best or not state["history"]:
        if run.average is not None:
            run.average.load()
        return state["step"]
    best = checkpoint.load_best(run.run_dir / "checkpoints")
    if best is None:  # validations ran but none was finite-better: should not happen
        raise ConfigError(
            f"no best-validation weights in {run.run_dir / 'checkpoints'} after "
            f"{len(state['history'])} validations: set train.restore_best=false to test the "
            "last weights, or train afresh (train.resume=never)"
        )
    weights = best["weights"]
    if any(k.startswith("variogram.") for k in weights):  # model.variography
        # the field's variogram is fitted to the whole run's statistics: its last values stand
        last = engine.full_weights(run.engine)
        weights = {k: last[k] if k.startswith("variogram.") else v for k, v in weights.items()}
    engine.set_weights(run.engine, weights)
    if run.ctx.is_main and best["step"] != state["step"]:
        print(
            f"testing the weights of step {best['step']} (best validation "
            f"{cfg.train.monitor} {best['value']:.4g}), not the last step's ({state['step']})"
        )
    return int(best["step"])


def finish(run: Run, fitted: Fitted) -> dict:
    """Test metrics, the exported model, tracking, metrics.json (written last, atomically)."""
    cfg, ctx, state, store = run.cfg, run.ctx, run.state, run.store
    tested_step = restore_best(run)
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
            ratio = test[group]["mean"]["crps"] / oracle["window"][group]["crps"]
            test[group]["ratio_to_oracle"] = ratio
    fitted_gp = None
    if ctx.is_main and cfg.train.fitted_gp:  # the geostatistician's baseline (evaluate/gp.py)
        stream = run.streams["test"]
        fitted_gp = gp.baseline(store, stream, cfg.data.time_in, cfg.data.horizon, windows, oracle)
        if "baseline" in fitted_gp:
            test["baselines"][gp.NAME] = fitted_gp.pop("baseline")
    busy = max(fitted.wait_s + fitted.compute_s, 1e-9)
    metrics = {
        "name": cfg.name,
        "steps": state["step"],
        "stopped_early": fitted.stopped_early,
        # the weights tested and exported: the best validation's (train.restore_best)
        "tested_step": tested_step,
        "monitor": {"metric": cfg.train.monitor, "best": state["best_val"]}
        if state["history"]
        else None,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "precision": cfg.train.precision,
        "test": test,
        "validation": state["history"],
        "train_loss": state["train_loss"],
        "kernel": kernel_params(run.model),
        # the field's covariance as the run estimates it (model.variography; README)
        "kernel_estimate": kernel_estimate(run.model),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "point_forecast": cfg.model.peer is not None,  # std 0: CRPS = MAE, no coverage
        "truth": store.attrs.get("truth"),
        "oracle": oracle,
        "fitted_gp": fitted_gp,
        "store": {"path": str(store.path), "fingerprint": store.fingerprint()},
        "timing": {
            "samples_per_s": fitted.samples / busy,
            "step_s": busy / max(1, state["micro_step"] - (run.resumed or {}).get("micro_step", 0)),
            "data_wait_fraction": fitted.wait_s / busy,
            "fit_wall_s": fitted.wall_s,  # this process's loop (not a resumed run's earlier part)
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
