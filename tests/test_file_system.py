"""What the file system refuses (a full disk, a folder this user may not write, a symbolic
link loop) is one line naming the path and what to do, never a traceback, and nothing
half-written is published."""

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cases import run, write_case
from tiny import ROOT, child_env, overrides

from pipeline.data.store import StoreError


@contextlib.contextmanager
def full_disk(room_kb: int):
    """A 2 MB tmpfs with about ``room_kb`` left (skipped where this user may not mount)."""
    where = Path("/tmp") / f"sit-full-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (where / "filler").write_bytes(b"\0" * (2 * 1024 - room_kb) * 1024)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def one_error_line(proc: subprocess.CompletedProcess, *expect: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: "), errors[0]  # its own line, not after a progress bar
    for text in expect:
        assert text in errors[0], errors[0]
    return errors[0]


def test_a_store_path_that_is_a_symlink_loop_is_named(scheduler, tmp_path):
    (tmp_path / "a.zarr").symlink_to(tmp_path / "b.zarr")
    (tmp_path / "b.zarr").symlink_to(tmp_path / "a.zarr")
    ov = [o for o in write_case(tmp_path) if not o.startswith("data.store=")]
    with pytest.raises(StoreError, match="is a symbolic link .*leads nowhere"):
        run(scheduler, [*ov, f"data.store={tmp_path / 'a.zarr'}"])
    with pytest.raises(StoreError, match="a.zarr is in its path but is not a folder"):
        run(scheduler, [*ov, f"data.store={tmp_path / 'a.zarr' / 'inner.zarr'}"])


def test_a_full_disk_while_preprocessing_names_the_store_and_publishes_nothing(scheduler, tmp_path):
    ov = [o for o in write_case(tmp_path) if not o.startswith("data.store=")]
    with full_disk(room_kb=8) as disk:
        with pytest.raises(StoreError, match=r"out.zarr could not be written \(No space left"):
            run(scheduler, [*ov, f"data.store={disk / 'out.zarr'}"])
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_full_disk_at_a_checkpoint_is_one_line(synthetic_store):
    with full_disk(room_kb=40) as disk:
        args = overrides(synthetic_store, disk, "full", 6)
        args += ["train.checkpoint_every=3", "train.eval_every=3", "tracking.enabled=false"]
        proc = subprocess.run(
            [sys.executable, "launch/train.py", *args],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        one_error_line(proc, "could not be written (No space left on device)", "MB free there")
        # whatever was written has no completion marker: a resume never trusts it
        assert not list(disk.glob("full/checkpoints/step*/COMPLETE"))


def test_a_folder_this_user_may_not_write_is_one_line(tmp_path):
    """As an unprivileged user (root writes anywhere: the test drops to nobody)."""
    locked = Path("/tmp") / f"sit-locked-{uuid.uuid4().hex[:8]}"
    locked.mkdir(mode=0o755)
    try:
        command = [sys.executable, "launch/preprocess.py", "--config", "configs/small.yaml"]
        command += [f"data.store={locked / 'sub' / 'out.zarr'}", "data.synthetic.num_sensors=20"]
        command += ["data.synthetic.num_steps=100"]
        if os.getuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("root, and no setpriv to run as another user")
            command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        else:
            locked.chmod(0o555)
        env = {**child_env(), "HOME": str(tmp_path)}
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if "ModuleNotFoundError" in proc.stderr or "Permission denied: '/" + "work" in proc.stderr:
            pytest.skip("the checkout is not readable by the unprivileged user")
        one_error_line(proc, str(locked / "sub"), "permission denied")
    finally:
        shutil.rmtree(locked, ignore_errors=True)
