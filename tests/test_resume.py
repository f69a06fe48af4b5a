"""Resuming DeepSpeed training on CPU: after SIGKILL at any point, from the newest complete
checkpoint, with another world size; checkpoints that load with weights_only=True and refuse
tampered, reshaped or foreign state."""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from tiny import checkpointed, finish, launch, metrics

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_load_with_weights_only(reference):
    files = list((reference / "ref" / "checkpoints").rglob("*.pt"))
    assert len(files) >= 3
    for f in files:
        torch.load(f, weights_only=True)
    torch.load(reference / "ref" / "model" / "weights.pt", weights_only=True)


def test_killed_at_any_point_resume_loses_at_most_one_interval(
    reference, synthetic_store, tmp_path
):
    """Both processes SIGKILLed again and again: while a checkpoint's files are being written
    (before its marker), just after a marker, and mid-write again; each time the same command
    resumes. Never more than one checkpoint interval is lost, and the finished run equals the
    uninterrupted one."""
    every, steps = 2, 12
    args = checkpointed(
        synthetic_store, tmp_path, "ref", steps, [f"train.checkpoint_every={every}"]
    )
    ckpt = tmp_path / "ref" / "checkpoints"

    def writing(step):  # files of the checkpoint are there, its completion marker is not
        tag = ckpt / f"step{step:08d}"
        return lambda: any(tag.glob("*.pt")) and not (tag / "COMPLETE").exists()

    def completed(step):
        return lambda: (ckpt / f"step{step:08d}" / "COMPLETE").exists()

    out, reached, inside = "", [], []
    for trigger, step in [(writing, 4), (completed, 6), (writing, 10)]:
        proc = launch(args)  # resumes from the previous kill, after the first
        deadline, fired = time.time() + 300, trigger(step)
        while not fired() and not completed(step)():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("the run ended before the kill: " + proc.stdout.read()[-2000:])
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        out += proc.communicate()[0]
        inside.append(not completed(step)())
        reached.append(max(int(d.name[4:]) for d in ckpt.glob("step*")))
        assert not (tmp_path / "ref" / "metrics.json").exists()
    out += finish(launch(args))
    resumes = [int(m) for m in re.findall(r"resumed from step (\d+)", out)]
    assert len(resumes) == 3, resumes
    for got, seen in zip(resumes, reached, strict=True):
        assert seen - every <= got <= seen, (resumes, reached)
    print(f"kills inside a checkpoint write: {sum(inside)} of 2 attempted")
    want = torch.load(reference / "ref" / "model" / "weights.pt", weights_only=True)
    got = torch.load(tmp_path / "ref" / "model" / "weights.pt", weights_only=True)
    for key in want:
        if key.startswith("variogram."):  # its statistics restart on resume (not state)
            continue
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    ref_loss = dict(map(tuple, metrics(reference, "ref")["train_loss"]))
    new_loss = dict(map(tuple, metrics(tmp_path, "ref")["train_loss"]))
    for step in range(resumes[-1] + 1, steps + 1):
        assert new_loss[step] == pytest.approx(ref_loss[step], abs=1e-6), step


class _Trap:
    """Pickles as a call of os.system: what a tampered checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_before_any_code_runs(
    reference, synthetic_store, tmp_path
):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    ckpt = tmp_path / "ref" / "checkpoints"
    tag = ckpt / (ckpt / "latest").read_text().strip()
    target = tag / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Trap(marker)}, target)
    complete = json.loads((tag / "COMPLETE").read_text())  # the tamperer fixes the sizes too
    complete["files"][target.name] = target.stat().st_size
    (tag / "COMPLETE").write_text(json.dumps(complete))
    proc = launch(checkpointed(synthetic_store, tmp_path, "ref", 16), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "refused" in out and ("posix.system" in out or "os.system" in out), out[-2000:]
    assert not marker.exists(), "the pickled code ran"


def test_resume_never_moves_earlier_checkpoints_aside(reference, synthetic_store, tmp_path):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    before = sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir())
    args = checkpointed(synthetic_store, tmp_path, "ref", 4, ["train.resume=never"])
    out = finish(launch(args, procs=1))
    assert "resumed" not in out and "moved to" in out
    kept = list((tmp_path / "ref").glob("checkpoints.replaced-*"))
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == before
    assert metrics(tmp_path, "ref")["steps"] == 4


def test_resume_takes_the_newest_complete_checkpoint_and_says_what_it_skipped(
    reference, synthetic_store, tmp_path
):
    """A kill while saving leaves a checkpoint without its completion marker (and DeepSpeed's
    `latest` may already name it); a truncated file breaks another. Resume passes over both,
    says why, and continues from the newest complete one."""
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    ckpt = tmp_path / "ref" / "checkpoints"
    assert (ckpt / "step00000012" / "COMPLETE").is_file()
    partial = ckpt / "step00000016"
    shutil.copytree(ckpt / "step00000012", partial)
    (partial / "COMPLETE").unlink()
    (ckpt / "latest").write_text("step00000016")
    broken = ckpt / "step00000012" / "mp_rank_00_model_states.pt"
    broken.write_bytes(broken.read_bytes()[:100])
    out = finish(launch(checkpointed(synthetic_store, tmp_path, "ref", 12), procs=2))
    assert "skipped checkpoint step00000016: no completion marker" in out
    assert "skipped checkpoint step00000012: mp_rank_00_model_states.pt has 100 bytes" in out
    assert "resumed from step 8" in out
    assert metrics(tmp_path, "ref")["steps"] == 12


def test_resume_with_another_world_size(reference, synthetic_store, tmp_path):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    out = finish(launch(checkpointed(synthetic_store, tmp_path, "ref", 16), procs=1))
    assert "resumed from step 12" in out and "re-sharded" in out
    m = metrics(tmp_path, "ref")
    assert m["steps"] == 16 and m["world_size"] == 1


@pytest.fixture(scope="module")
def other_store(scheduler, tmp_path_factory):
    """A store of the same shape as the session's synthetic store, of another field (seed)."""
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess

    path = tmp_path_factory.mktemp("other") / "syn.zarr"
    keys = ["data.synthetic.num_sensors=300", "data.synthetic.num_steps=400"]
    keys += ["data.synthetic.seed=1", "data.time_chunk=32", "data.node_chunk=64"]
    keys += ["data.time_in=6", "data.horizon=3", "data.neighbours=8"]
    cfg = load_config(None, [f"dask.scheduler={scheduler}", f"data.store={path}", *keys])
    return preprocess(cfg, progress=False)


def test_resume_refuses_another_model_shape_or_store_naming_the_key(
    reference, other_store, synthetic_store, tmp_path
):
    shutil.copytree(reference / "ref", tmp_path / "ref")
    (tmp_path / "ref" / "metrics.json").unlink()
    wider = checkpointed(synthetic_store, tmp_path, "ref", 16, ["model.d_model=32"])
    proc = launch(wider, procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "model.d_model: 16 then, 32 now" in out, out[-3000:]
    assert "Traceback" not in out
    proc = launch(checkpointed(other_store, tmp_path, "ref", 16), procs=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "data.store (content fingerprint)" in out, out[-3000:]
    assert "Traceback" not in out


def test_a_store_replaced_mid_run_stops_it_before_the_next_checkpoint(
    other_store, synthetic_store, tmp_path
):
    from pipeline.config import ConfigError, load_config
    from pipeline.train.loop import train

    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store, store)

    def replace(step, val):  # another preprocess with data.overwrite=true, after step 4
        shutil.rmtree(store)
        shutil.copytree(other_store, store)

    cfg = load_config(None, checkpointed(store, tmp_path, "mixed", 12))
    with pytest.raises(ConfigError, match="replaced while this run read it.*at step 4"):
        train(cfg, report=replace)
    assert not (tmp_path / "mixed" / "checkpoints" / "step00000004").exists()
