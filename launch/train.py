"""Train the spatially-informed transformer (DeepSpeed), evaluate, track and register it.

deepspeed launch/train.py --config configs/large.yaml            # all local GPUs
deepspeed --num_gpus 2 launch/train.py --config configs/small.yaml  # 2 CPU processes
deepspeed --hostfile infra/deepspeed/hostfile launch/train.py --config configs/large.yaml
python launch/train.py --config configs/small.yaml [section.key=value ...]  # one process
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import run  # noqa: E402
from pipeline.train import train  # noqa: E402


def main(cfg) -> None:
    metrics = train(cfg)
    if metrics is not None and metrics.get("world_size") and _is_main():
        uri = metrics.get("model_uri")
        print(
            f"test MAE {metrics['test']['mean']['mae']:.4f}  CRPS "
            f"{metrics['test']['mean']['crps']:.4f}"
            + (f"  model {uri}" if uri else "  (tracking off: no registered model)")
        )


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    # the DeepSpeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run(__doc__.strip().splitlines()[0], main)
