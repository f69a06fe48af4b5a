"""One split's metrics over every rank's share (``evaluate``), with the test split's
comparisons against the baselines, and the baselines' spreads fitted on train windows
(``baseline_spreads``); pipeline/evaluate/metrics.py holds the scores."""

from __future__ import annotations

import math

import torch

from pipeline.config import ConfigError
from pipeline.data.profile import divides_day
from pipeline.evaluate.metrics import (
    BASELINES,
    HISTORICAL,
    BaselineSpread,
    ComparisonAccumulator,
    MetricAccumulator,
    last_observed,
)
from pipeline.model.losses import LOSSES
from pipeline.train import engine
from pipeline.train.run import Run, forward, split_stream, to_device

GROUPS = ("seen", "unseen")  # test metrics by side of data.holdout_sensors


def baselines(run: Run) -> tuple[str, ...]:
    """The baselines of this run's test (pipeline/evaluate/metrics.py): the historical average
    where train.historical_average is on and the time step divides a day."""
    freq = run.store.attrs["freq"]
    historical = run.cfg.train.historical_average and freq is not None and divides_day(freq)
    return (*BASELINES, HISTORICAL) if historical else BASELINES


def baseline_points(
    batch: dict, targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each baseline's forecast of ``batch`` (on the device), broadcastable to its targets
    [B, horizon, n, F_t], in the units of ``mean`` and ``std`` [n, F_t] (zeros and ones:
    normalised): the last observed input (the train mean where none), the train mean, and,
    where the batch carries the daily profile, the historical average."""
    x, x_mask = batch["x"][..., targets].float(), batch["x_mask"][..., targets]
    last = last_observed(x, x_mask, torch.zeros_like(mean))  # [B, n, F_t] normalised
    points = {"last_value": last[:, None] * std + mean, "train_mean": mean}
    if "profile" in batch:  # [B, horizon, n, F_t] normalised
        points[HISTORICAL] = batch["profile"].float() * std + mean
    return points


def baseline_spreads(run: Run) -> dict[str, torch.Tensor]:
    """The Gaussian spread per horizon step of each baseline (pipeline/evaluate/metrics.py,
    BaselineSpread), fitted on ``train.eval_batches`` batches of train windows per rank."""
    cfg, ctx = run.cfg, run.ctx
    names = baselines(run)
    spread = BaselineSpread(cfg.data.horizon, names, device=ctx.device)
    stream = split_stream(run, "train", shuffle=False, daily_profile=HISTORICAL in names)
    targets = torch.from_numpy(stream.targets).to(ctx.device)  # data.target
    for i, batch in enumerate(stream):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        batch = to_device(batch, ctx.device, torch.float32)
        mask = batch["y_mask"] & batch["target"][None, None, :, None]
        zero = torch.zeros(len(batch["nodes"]), len(targets), device=ctx.device)  # [n, F_t]
        spread.update(batch["y"], mask, baseline_points(batch, targets, zero, zero + 1))
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
    names = baselines(run) if compare else ()
    if split not in run.streams:  # built once per run: tiles, positions, the split's windows
        profile = cfg.model.daily_profile or HISTORICAL in names
        run.streams[split] = split_stream(run, split, shuffle=False, daily_profile=profile)
    stream = run.streams[split]
    targets = torch.from_numpy(stream.targets).to(ctx.device)  # data.target
    mean_s = torch.from_numpy(stream.mean).to(ctx.device)[:, targets]  # [N, F_t]
    std_s = torch.from_numpy(stream.std).to(ctx.device)[:, targets]
    acc = MetricAccumulator(cfg.data.horizon, device=ctx.device)
    # held-out sensors (data.holdout_sensors): the test split reports each side on its own
    groups = {}
    if stream.hidden is not None and split == "test":
        groups = {g: MetricAccumulator(cfg.data.horizon, device=ctx.device) for g in GROUPS}
    if stream.val_hidden is not None:  # train.val_hidden: validation's own hidden sensors
        groups = {"hidden": MetricAccumulator(cfg.data.horizon, device=ctx.device)}
    # pooled metrics mix the features' units: with several, each is reported on its own too
    features = [store.attrs["features"][i] for i in stream.targets]
    per_feature = {}
    if len(features) > 1:
        per_feature = {f: MetricAccumulator(cfg.data.horizon, device=ctx.device) for f in features}
    comparison = (
        ComparisonAccumulator(
            stream.origins, store.shape[1], cfg.data.horizon, ctx.device, spreads, names
        )
        if compare
        else None
    )
    # per window at the held-out sensors alone (test_windows.npz: benchmarks/holdout.py)
    unseen_windows = None
    if comparison is not None and groups:
        unseen_windows = ComparisonAccumulator(
            stream.origins, store.shape[1], cfg.data.horizon, ctx.device, names=()
        )
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    run.engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(stream):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, ctx.device, run.dtype)
            mean, std, mask = forward(run.engine, batch)
            loss = LOSSES[cfg.train.loss](mean, std, batch["y"], mask)
            loss_sum += torch.stack([loss.double() * mask.sum(), mask.sum().double()])
            m, s = mean_s[batch["nodes"]], std_s[batch["nodes"]]  # [n, F]
            mean, std, y = mean * s + m, std * s, batch["y"] * s + m  # the data's units
            acc.update(mean, std, y, mask)
            for j, feature in enumerate(per_feature.values()):
                pick = slice(j, j + 1)  # [B, horizon, n, 1]
                feature.update(mean[..., pick], std[..., pick], y[..., pick], mask[..., pick])
            if "unseen" in groups:
                hidden = batch["hidden"][None, None, :, None]  # [1, 1, n, 1]
                groups["unseen"].update(mean, std, y, mask & hidden)
                groups["seen"].update(mean, std, y, mask & ~hidden)
            if "hidden" in groups:
                probe = batch["val_hidden"][None, None, :, None]  # [1, 1, n, 1]
                groups["hidden"].update(mean, std, y, mask & probe)
            if comparison is not None:
                points = baseline_points(batch, targets, m, s)  # the data's units
                comparison.update(batch["origins"], batch["nodes"], mean, std, y, mask, points, s)
            if unseen_windows is not None:
                unseen = mask & batch["hidden"][None, None, :, None]
                unseen_windows.update(batch["origins"], batch["nodes"], mean, std, y, unseen, {}, s)
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
        sides = stream.val_hidden if name == "hidden" else stream.hidden == (name == "unseen")
        result[name] = {"sensors": int(sides.sum())}
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
    if unseen_windows is not None:
        engine.all_reduce_sum(unseen_windows.windows)
        unseen = unseen_windows.window_losses()
        result["windows"].update({f"unseen_{k}": v for k, v in unseen.items()})
    return result
