"""A run killed while DeepSpeed JIT-builds its shared-memory op leaves the build's lock file in
the torch extensions cache; torch waits for it forever. The next run removes a lock that no
build is writing beside, says so, and trains."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tiny import child_env, overrides

ROOT = Path(__file__).resolve().parents[1]


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_run(synthetic_store, tmp_path):
    from torch.utils.cpp_extension import get_default_build_root

    ext = tmp_path / "torch_extensions"
    built = sorted(Path(get_default_build_root()).glob("*/deepspeed_shm_comm"))
    if built:  # the op built by earlier runs: copied with its times, so nothing rebuilds
        shutil.copytree(built[0], ext / "deepspeed_shm_comm")
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = time.time() - 600  # killed ten minutes ago: nothing in the folder changed since
    for path in lock.parent.iterdir():
        os.utime(path, (old, old))
    args = overrides(synthetic_store, tmp_path, "lk", 2, ["tracking.enabled=false"])
    proc = subprocess.run(
        [sys.executable, "launch/train.py", *args, "train.oracle=false"],
        cwd=ROOT,
        env={**child_env(), "TORCH_EXTENSIONS_DIR": str(ext)},
        capture_output=True,
        text=True,
        timeout=400,  # hung forever before the fix
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"removed {lock}: a build lock left by a run killed while building" in out
