"""Checkpoints that go bad after they were completed: a damaged newest one (bytes changed in
place, same size) or a completion marker that lists no files make resume fall back to the
previous complete checkpoint and say why; old checkpoints are pruned
(``train.keep_checkpoints``), never the newest complete one."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import overrides, run_train


def args(store, out, steps, extra=()):
    return overrides(
        store,
        out,
        "ck",
        steps,
        [
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=2",
            "train.warmup_steps=1",
            "train.oracle=false",
            "tracking.enabled=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")
    proc = run_train(args(synthetic_store, out, 8))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out


def copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "ck", tmp_path / "ck")
    (tmp_path / "ck" / "metrics.json").unlink()
    return tmp_path / "ck" / "checkpoints"


def test_old_checkpoints_are_pruned_keeping_the_newest(trained):
    tags = sorted(p.name for p in (trained / "ck" / "checkpoints").glob("step*"))
    assert tags == ["step00000006", "step00000008"]
    assert (trained / "ck" / "checkpoints" / "best.pt").is_file()  # kept apart


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(trained, synthetic_store, tmp_path):
    ckpt = copy(trained, tmp_path)
    newest = max((ckpt / "step00000008").glob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(newest.read_bytes())
    size = min(20_000, len(data) // 2)
    start = (len(data) - size) // 2
    data[start : start + size] = bytes(size)  # zeroed in place: the marker's sizes still match
    newest.write_bytes(bytes(data))
    proc = run_train(args(synthetic_store, tmp_path, 10))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"skipped checkpoint step00000008: {newest.name} is damaged" in out
    assert "resumed from step 6" in out
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text())["steps"] == 10


def test_a_marker_that_lists_no_files_falls_back_to_the_previous(
    trained, synthetic_store, tmp_path
):
    ckpt = copy(trained, tmp_path)
    marker = ckpt / "step00000008" / "COMPLETE"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "files": {}}))
    proc = run_train(args(synthetic_store, tmp_path, 10))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "skipped checkpoint step00000008: its completion marker lists no files" in out
    assert "resumed from step 6" in out


def test_resuming_with_another_neighbourhood_is_refused_naming_the_key(
    trained, synthetic_store, tmp_path
):
    copy(trained, tmp_path)
    proc = run_train(args(synthetic_store, tmp_path, 10, ["model.knn=4"]))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "model.knn: 8 then, 4 now" in out, out[-3000:]
    assert "Traceback" not in out
