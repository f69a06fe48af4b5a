"""The whole product on embedded defaults (make demo): a synthetic 2,000-sensor field with known
truth -> Dask -> Zarr -> DeepSpeed on 2 CPU processes -> evaluation -> MLflow (SQLite) ->
model registry, then a summary.

    python launch/demo.py [--config configs/small.yaml] [section.key=value ...]
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cli import run  # noqa: E402
from pipeline.preprocess import preprocess  # noqa: E402
from pipeline.report import summary  # noqa: E402
from pipeline.store import StoreError, open_store  # noqa: E402


def main(cfg) -> None:
    from pipeline.tracking import (
        tracking_uri,
    )  # here, not at the top: Dask workers import this file

    try:
        open_store(cfg.data.store)
        print(f"store {cfg.data.store} is ready")
    except StoreError:
        print(f"preprocessing the synthetic field into {cfg.data.store} (Dask)")
        preprocess(cfg.model_copy(update={"data": cfg.data.model_copy(update={"overwrite": True})}))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("--")]
    config = next((sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--config"), None)
    cmd = [
        launcher,
        "--num_gpus",
        "2",
        "launch/train.py",
        *(["--config", config] if config else []),
        "train.resume=never",
        *overrides,
    ]
    print("training:", " ".join(cmd), flush=True)
    env = {
        **os.environ,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    metrics = json.loads((Path(cfg.train.out_dir) / cfg.name / "metrics.json").read_text())
    print("\n" + summary(metrics, tracking_uri(cfg)))


if __name__ == "__main__":
    if "--config" not in sys.argv:
        sys.argv[1:1] = ["--config", str(ROOT / "configs" / "small.yaml")]
    run(__doc__.strip().splitlines()[0], main)
