import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.profile import daily_profile, step_ns
from pipeline.data.store import open_store
from pipeline.data.stream import WindowStream, make_tiles


def stream(path, **kw):
    args = dict(store=str(path), split="train", time_in=6, horizon=3, batch_size=5, k=8, seed=3)
    args.update(kw)
    return WindowStream(**args)


def epoch_items(s, world, workers, epoch=0):
    shards = world * workers
    return [
        [(t, o) for t, origins in s.shard_batches(epoch, sh, shards) for o in origins]
        for sh in range(shards)
    ]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("tile_size", [None, 100])
def test_shards_are_disjoint_and_cover_the_epoch(synthetic_store, world, workers, tile_size):
    s = stream(synthetic_store, tile_size=tile_size)
    shards = epoch_items(s, world, workers)
    everything = [item for shard in shards for item in shard]
    expected = {(t, int(o)) for t in range(len(s.tiles)) for o in s.origins}
    assert len(everything) == len(expected)  # nothing twice
    assert {(t, int(o)) for t, o in everything} == expected  # nothing missed
    assert all(shards), "a shard got no windows"


def test_order_is_a_pure_function_of_seed_and_epoch(synthetic_store):
    a, b = stream(synthetic_store), stream(synthetic_store)
    assert epoch_items(a, 2, 1) == epoch_items(b, 2, 1)
    assert epoch_items(a, 2, 1, epoch=0) != epoch_items(a, 2, 1, epoch=1)
    assert epoch_items(a, 1, 1) != epoch_items(stream(synthetic_store, seed=4), 1, 1)


def _take(ds, n, workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(synthetic_store, workers):
    full = _take(stream(synthetic_store, rank=1, world_size=2), 40, workers)  # crosses epochs
    tail = _take(stream(synthetic_store, rank=1, world_size=2, start_step=23), 17, workers)
    assert [b["step"] for b in tail] == list(range(23, 40))
    assert full[-1]["epoch"] > 0
    for a, b in zip(full[23:], tail, strict=True):
        assert torch.equal(a["origins"], b["origins"])
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y_mask"], b["y_mask"])


def test_windows_are_normalised_store_values(synthetic_store):
    store = open_store(synthetic_store)
    batch = next(iter(stream(synthetic_store)))
    o = int(batch["origins"][0])
    values = store["values"][o - 6 : o + 3]
    norm = (values - store["mean"][:]) / store["std"][:]
    np.testing.assert_allclose(batch["x"][0].numpy(), norm[:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["y"][0].numpy(), norm[6:], rtol=1e-5, atol=1e-5)
    train_stop = store.split("train")[1]
    assert batch["origins"].max() + 3 <= train_stop  # windows stay inside the split


def test_daily_profile_is_the_train_mean_by_time_of_day(synthetic_store):
    """model.daily_profile: each sensor's train mean per 5-minute slot of the day (pandas'
    groupby on the store's train split), read a chunk of sensors at a time; each batch carries
    the level of every target's time of day."""
    store = open_store(synthetic_store)
    levels = daily_profile(store)
    assert levels.shape == (288, 300, 1)
    np.testing.assert_array_equal(daily_profile(store, chunk=7), levels)
    start, stop = store.split("train")
    time = pd.to_datetime(store["time"][start:stop])
    for j in (0, 123, 299):
        series = pd.Series(store["values"][start:stop, j, 0], index=time)
        series = series[store["mask"][start:stop, j, 0]]
        want = series.groupby(series.index.hour * 12 + series.index.minute // 5).mean()
        got = levels[want.index.to_numpy(), j, 0] * store["std"][j, 0] + store["mean"][j, 0]
        np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-4, atol=1e-4)
    batch = next(iter(stream(synthetic_store, daily_profile=True, tile_size=100)))
    nodes, origins = batch["nodes"].numpy(), batch["origins"].numpy()
    for b, o in enumerate(origins):
        at = pd.to_datetime(store["time"][o : o + 3])  # the 3 targets of the window
        want = levels[at.hour * 12 + at.minute // 5][:, nodes]  # [horizon, n, F]
        np.testing.assert_array_equal(batch["profile"][b].numpy(), want)


def test_daily_profile_needs_a_step_that_divides_a_day():
    assert step_ns("5min", "here") == 300 * 10**9
    for freq in ("7h", "MS", "W", "2D"):
        with pytest.raises(ConfigError, match="divides a day"):
            step_ns(freq, "store x")


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_tiles_cover_targets_once_with_their_halo(synthetic_store, hops):
    store = open_store(synthetic_store)
    nb = store["neighbours"][:, :8]
    tiles = make_tiles(nb, 8, 64, hops)
    targets = np.concatenate([t.nodes[t.target] for t in tiles])
    np.testing.assert_array_equal(np.sort(targets), np.arange(300))
    for t in tiles:
        assert np.all(np.diff(t.nodes) > 0), "tile nodes leave curve order"
        # every sensor within `hops` hops of a target is in the tile ...
        reach = t.nodes[t.target]
        for _ in range(hops):
            reach = np.union1d(reach, nb[reach])
        np.testing.assert_array_equal(t.nodes, reach)
        # ... and the neighbours of sensors within hops - 1 hops are all inside it
        inner = t.nodes[t.target]
        for _ in range(hops - 1):
            inner = np.union1d(inner, nb[inner])
        local = t.neighbours[np.searchsorted(t.nodes, inner)]
        assert (local >= 0).all(), "a neighbour inside the receptive field is missing"
        np.testing.assert_array_equal(t.nodes[local], nb[inner])
    batch = next(iter(stream(synthetic_store, tile_size=64)))
    assert batch["target"].sum() <= 64 and batch["x"].shape[2] == len(batch["nodes"])


def test_too_many_readers_is_a_clear_error(synthetic_store):
    s = stream(synthetic_store, world_size=100)
    with pytest.raises(ValueError, match="fewer than the 100 readers"):
        next(iter(s))
    with pytest.raises(ValueError, match="model.knn = 20 exceeds"):
        stream(synthetic_store, k=20)
