"""The published peers (torch-spatiotemporal) through our own training job, stream and metrics;
skipped where the peers' extra is not installed (CI: `pip install -e ".[peers]"` builds
torch-scatter and torch-sparse from source, about 17 minutes on 2 cores)."""

import json

import numpy as np
import pytest
import torch
from tiny import overrides, run_train

pytest.importorskip("tsl.nn.models", reason='the peers extra: pip install -e ".[peers]"')

from pipeline.evaluate.compare import compare_runs  # noqa: E402
from pipeline.model.peers import PEERS, gaussian_graph  # noqa: E402


def test_the_graph_follows_the_dcrnn_convention():
    pos = torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [100, 0, 0]])
    neighbours = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 2, -1]])
    edge_index, weight = gaussian_graph(pos, neighbours)
    pairs = {(int(s), int(t)): float(w) for (s, t), w in zip(edge_index.T, weight, strict=True)}
    assert all(s != t for s, t in pairs) and min(pairs.values()) >= 0.1
    d = torch.tensor([1.0, 3, 1, 2, 2, 3, 97])  # the neighbour distances, -1 and self left out
    sigma = float(d.std())
    assert pairs[(1, 0)] == pytest.approx(np.exp(-((1 / sigma) ** 2)), rel=1e-5)
    assert (2, 3) not in pairs  # 97 km: under the threshold


@pytest.mark.parametrize("peer", PEERS)
def test_each_peer_trains_and_is_scored_by_our_evaluation(synthetic_store, tmp_path, peer):
    extra = [f"model.peer={peer}", "train.loss=mae", "tracking.enabled=false"]
    extra += ["train.eval_every=3", "train.checkpoint_every=3"]
    proc = run_train(overrides(synthetic_store, tmp_path, peer, 3, extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / peer / "metrics.json").read_text())
    test = m["test"]
    assert np.isfinite(test["mae"]).all() and m["parameters"] > 0
    assert test["mean"]["crps"] == pytest.approx(test["mean"]["mae"], rel=1e-6)  # a point forecast
    assert m["point_forecast"] and m["timing"]["test_s_per_window"] > 0


def test_ours_against_a_peer_over_seeds(synthetic_store, tmp_path):
    """launch/compare.py's test over seeds: per-window losses averaged over each side's runs."""
    runs = {"ours": [], "stid": []}
    for seed in (0, 1):
        for name, extra in (("ours", []), ("stid", ["model.peer=stid", "train.loss=mae"])):
            run = f"{name}{seed}"
            extra = [*extra, f"train.seed={seed}", "tracking.enabled=false"]
            proc = run_train(overrides(synthetic_store, tmp_path, run, 2, extra))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name].append(tmp_path / run)
    result = compare_runs(runs["ours"], runs["stid"])
    single = compare_runs(runs["ours"][0], runs["stid"][0])
    assert result["windows"] == single["windows"] > 0
    for loss in ("mae", "crps"):
        assert result[loss]["dm"]["testable"]
        assert result[loss]["a"] != single[loss]["a"]  # two seeds averaged, not one
