"""The spatial split (data.holdout_sensors): held-out sensors never reach a training or
validation batch, as input or as target; at test time they are forecast from their neighbours
alone and reported on their own.

The store is a real one (wide CSV through Dask) whose held-out sensors report values near
1e6 while the others report values near 50: a single held-out value in a training batch, or
their own statistics in its normalisation, would show as a number in the thousands."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import overrides, run_train

from pipeline.config import ConfigError
from pipeline.data.holdout import holdout_nodes
from pipeline.data.preprocess import preprocess
from pipeline.data.profile import daily_profile
from pipeline.data.store import open_store
from pipeline.data.stream import WindowStream

N, T = 40, 240
HELD = [f"s{i:02d}" for i in (3, 11, 17, 24, 30, 36)]
POISON = 1e6


@pytest.fixture(scope="module")
def poisoned_store(scheduler, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("holdout")
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(N)]
    values = rng.normal(50, 5, (T, N))
    held = np.isin(ids, HELD)
    values[:, held] += POISON
    frame = pd.DataFrame(values, columns=ids)
    frame.insert(0, "time", pd.date_range("2024-01-01", periods=T, freq="1h").astype(str))
    frame.to_csv(tmp / "data.csv", index=False, float_format="%.3f")
    lat, lon = 34 + rng.uniform(0, 0.3, N), -118 + rng.uniform(0, 0.3, N)
    pd.DataFrame({"sensor_id": ids, "latitude": lat, "longitude": lon}).to_csv(
        tmp / "loc.csv", index=False
    )
    from pipeline.config import load_config

    cfg = load_config(
        None,
        [
            f"dask.scheduler={scheduler}",
            "data.source.kind=wide_csv",
            f"data.source.path={tmp / 'data.csv'}",
            f"data.source.locations={tmp / 'loc.csv'}",
            "data.source.time_column=time",
            f"data.store={tmp / 'poisoned.zarr'}",
            "data.neighbours=8",
            "data.time_chunk=32",
            "data.node_chunk=16",
        ],
    )
    return preprocess(cfg, progress=False)


def _stream(path, split, **kw):
    return WindowStream(path, split, 6, 3, 4, 8, holdout=HELD, shuffle=split != "test", **kw)


@pytest.mark.parametrize("split", ["train", "val"])
def test_held_out_sensors_never_reach_a_training_or_validation_batch(poisoned_store, split):
    stream = _stream(poisoned_store, split, tile_size=16, hops=1)
    ids = open_store(poisoned_store)["sensor_id"][:]
    assert sorted(ids[stream.hidden]) == HELD
    # their normalisation comes from seen neighbours, not from their own history
    assert np.abs(stream.mean[stream.hidden] - 50).max() < 5
    batches = len(stream.shard_batches(0, 0, 1))  # one whole epoch
    seen_nodes = set()
    for _, batch in zip(range(batches), stream, strict=False):
        hidden = batch["hidden"]
        assert torch.equal(hidden, torch.from_numpy(np.isin(ids[batch["nodes"]], HELD)))
        for key in ("x", "y"):
            assert not batch[f"{key}_mask"][:, :, hidden].any()
            assert batch[key].abs().max() < 10, "a held-out value reached the batch"
        seen_nodes.update(batch["nodes"][hidden].tolist())
    # they are in the tiles (as positions their neighbours can see), only without values
    assert len(seen_nodes) == len(HELD)


def test_held_out_sensors_daily_profile_comes_from_their_neighbours(poisoned_store):
    """model.daily_profile: a held-out sensor's profile is its seen neighbours' average, not
    its own train history (which the model must never see)."""
    store = open_store(poisoned_store)
    stream = _stream(poisoned_store, "train", daily_profile=True)
    levels, _ = stream.profile
    own = daily_profile(store)
    nb = store["neighbours"][:]
    for j in np.flatnonzero(stream.hidden):
        seen = [i for i in nb[j, 1:] if not stream.hidden[i]]
        np.testing.assert_allclose(levels[:, j], own[:, seen].mean(1), rtol=1e-5, atol=1e-6)
        assert not np.allclose(levels[:, j], own[:, j], atol=1e-3)
    np.testing.assert_array_equal(levels[:, ~stream.hidden], own[:, ~stream.hidden])


def test_held_out_sensors_are_test_targets_without_history(poisoned_store):
    stream = _stream(poisoned_store, "test")
    targets = 0
    for batch in stream:
        hidden = batch["hidden"]
        assert not batch["x_mask"][:, :, hidden].any()
        assert batch["x"].abs().max() < 10
        assert batch["y_mask"][:, :, hidden].all()
        targets += int(batch["y_mask"][:, :, hidden].sum())
        assert (batch["y"][:, :, hidden].abs() > 1e3).all()  # the poison, as targets only
    assert targets > 0


def test_holdout_fraction_is_a_stable_choice_and_ids_are_checked():
    ids = np.array([f"sensor-{i}" for i in range(2000)])
    hidden = holdout_nodes(ids, 0.2, "here")
    assert 0.17 < hidden.mean() < 0.23
    order = np.random.default_rng(0).permutation(2000)
    assert np.array_equal(holdout_nodes(ids[order], 0.2, "here"), hidden[order])
    with pytest.raises(ConfigError, match="nope"):
        holdout_nodes(ids, ["sensor-1", "nope"], "here")
    with pytest.raises(ConfigError, match="at least one"):
        holdout_nodes(ids[:3], list(ids[:3]), "here")


def test_training_with_held_out_sensors_reports_them_apart(poisoned_store, tmp_path):
    """The real loop (one process, DeepSpeed on CPU): the training loss stays at the scale of
    the seen sensors, and the test metrics carry the seen and the unseen sensors apart."""
    args = overrides(
        poisoned_store,
        tmp_path,
        "holdout",
        8,
        [
            "tracking.enabled=false",
            "train.eval_every=8",
            "train.checkpoint_every=8",
            f"data.holdout_sensors=[{', '.join(HELD)}]",
            "train.val_hidden=0.25",
            "train.monitor=hidden_mae",
        ],
    )
    out = run_train(args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = json.loads((tmp_path / "holdout" / "metrics.json").read_text())
    # validation scores its own hidden sensors apart, and the best weights follow them
    rows = m["validation"]
    assert all(r["val_hidden_mae"] != r["val_mae"] for r in rows)
    assert m["monitor"]["best"] == min(r["val_hidden_mae"] for r in rows)
    assert max(loss for _, loss in m["train_loss"]) < 10
    test = m["test"]
    assert test["unseen"]["sensors"] == len(HELD) and test["seen"]["sensors"] == N - len(HELD)
    # the unseen sensors' targets are the poison: forecast from neighbours near 50, they miss
    assert test["unseen"]["mean"]["mae"] > 1e5 > 100 > test["seen"]["mean"]["mae"]
    # per window at the held-out sensors alone (benchmarks/holdout.py tests over them)
    with np.load(tmp_path / "holdout" / "test_windows.npz") as w:
        pooled = (w["unseen_mae"] * w["unseen_count"]).sum() / w["unseen_count"].sum()
        assert set(w["unseen_origin"]) <= set(w["origin"])
    assert pooled == pytest.approx(test["unseen"]["mean"]["mae"], rel=1e-5)


def test_sensor_dropout_hides_whole_input_windows_and_keeps_targets(poisoned_store):
    """train.sensor_dropout: per training batch, a share of the sensors loses its whole input
    window but keeps its targets (learning to forecast from neighbours); the same batches on
    a resumed stream; never outside the train split."""
    kw = dict(tile_size=None, sensor_dropout=0.3)
    stream = WindowStream(poisoned_store, "train", 6, 3, 4, 8, seed=1, **kw)
    batches = [b for _, b in zip(range(6), stream, strict=False)]
    shares = []
    for b in batches:
        gone = ~b["x_mask"].any(dim=(0, 1, 3))  # [n] no input at all
        assert (b["x"][:, :, gone] == 0).all()
        assert b["y_mask"][:, :, gone].any()  # their targets stay
        shares.append(float(gone.float().mean()))
    assert 0.15 < np.mean(shares) < 0.45
    again = WindowStream(poisoned_store, "train", 6, 3, 4, 8, seed=1, start_step=3, **kw)
    resumed = next(iter(again))
    assert torch.equal(resumed["x_mask"], batches[3]["x_mask"])
    for split in ("test", "train"):  # evaluation passes (and the baselines' fit) see it all
        one_pass = WindowStream(poisoned_store, split, 6, 3, 4, 8, shuffle=False, **kw)
        assert next(iter(one_pass))["x_mask"].any(dim=(0, 1, 3)).all()


def test_validation_hides_a_fixed_share_of_the_seen_sensors_windows(poisoned_store):
    """train.val_hidden: every validation batch hides the input windows of the same seen
    sensors (never held-out ones; the same for every seed), keeps their targets and marks
    them; training and test batches are untouched; monitoring them needs the share."""
    ids = open_store(poisoned_store)["sensor_id"][:]
    val = _stream(poisoned_store, "val", val_hidden=0.3)
    probe = val.val_hidden
    assert 0.1 < probe.mean() < 0.5 and not (probe & val.hidden).any()
    other = _stream(poisoned_store, "val", val_hidden=0.3, seed=5)
    assert np.array_equal(other.val_hidden, probe)
    for _, batch in zip(range(len(val.shard_batches(0, 0, 1))), val, strict=False):
        hidden = batch["val_hidden"]
        assert torch.equal(hidden, torch.from_numpy(probe[batch["nodes"]]))
        assert not batch["x_mask"][:, :, hidden].any()
        assert batch["y_mask"][:, :, hidden].all()
        seen = ~hidden & ~batch["hidden"]
        assert batch["x_mask"][:, :, seen].all()
    for split in ("train", "test"):
        stream = _stream(poisoned_store, split, val_hidden=0.3)
        assert stream.val_hidden is None and "val_hidden" not in next(iter(stream))
    assert sorted(ids[probe]) != sorted(HELD)
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="train.val_hidden"):
        load_config(None, ["train.monitor=hidden_mae"])


@pytest.mark.parametrize(
    "variant", ["plain", "node_embedding", "kriged_inputs", "kriged_smoothing"]
)
def test_a_query_at_a_held_out_sensor_is_its_held_out_forecast(poisoned_store, tmp_path, variant):
    """Forecast anywhere = forecast a held-out sensor: a query point at a held-out sensor's
    coordinates gets, to float32 tolerance, the forecast the test path makes for that sensor
    (its inputs removed, its statistics and daily profile from seen neighbours), though the
    exported model is asked only for a point. With model.node_embedding too: a sensor without
    an input window gets the unknown-sensor vector, not its own (untrained) embedding. With
    model.kriged_inputs (and model.kriged_smoothing): its window is kriged from the same
    neighbours on both paths."""
    from tiny import export_untrained

    from pipeline.model.export import Predictor

    extra = ["model.daily_profile=true", f"data.holdout_sensors={json.dumps(HELD)}"]
    extra += [] if variant == "plain" else [f"model.{variant}=true"]
    path, model, store = export_untrained(poisoned_store, tmp_path / "model", 2, extra)
    stream = WindowStream(
        store, "test", 6, 3, 1, 8, hops=2, shuffle=False, holdout=HELD, daily_profile=True
    )
    batch = next(iter(stream))
    with torch.no_grad():
        mean, std = model(
            batch["x"], batch["x_mask"], batch["calendar"], batch["pos"],
            batch["neighbours"], batch["nodes"], batch["profile"],
        )  # fmt: skip
    origin = int(batch["origins"][0])
    x = store["values"][origin - 6 : origin][None].astype(np.float32)  # [1, 6, N, 1]
    hidden = holdout_nodes(store["sensor_id"][:], HELD, "store")
    x[:, :, hidden] = np.nan  # the held-out sensors' inputs, as the test path removes them
    predictor = Predictor(path)
    coords = store["coords"][:]
    for s in np.flatnonzero(hidden):
        out = predictor.predict(x, store["time"][origin : origin + 1], query=coords[s : s + 1])
        expect_mean = mean[0, :, s].numpy() * stream.std[s] + stream.mean[s]  # [H, F]
        expect_std = std[0, :, s].numpy() * stream.std[s]
        np.testing.assert_allclose(out["query_mean"][0, :, 0], expect_mean, rtol=1e-4)
        np.testing.assert_allclose(out["query_std"][0, :, 0], expect_std, rtol=1e-4)
        assert np.abs(expect_mean).max() < 1e3  # nothing of the held-out sensor's own 1e6
