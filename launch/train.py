"""Train the spatially-informed transformer (DeepSpeed), evaluate, track and register it.

deepspeed launch/train.py --config configs/large.yaml            # all local GPUs
deepspeed --num_gpus 2 launch/train.py --config configs/small.yaml  # 2 CPU processes
deepspeed --hostfile infra/deepspeed/hostfile launch/train.py --config configs/large.yaml
python launch/train.py --config configs/small.yaml [section.key=value ...]  # one process
"""

import os

from pipeline.cli import run
from pipeline.evaluate.report import summary
from pipeline.train.loop import train


def main(cfg) -> None:
    tracker = None
    if cfg.tracking.enabled:  # MLflow is imported only when tracking is on (GPU nodes need not)
        from pipeline.track.tracking import Tracker, tracking_uri

        tracker = Tracker(cfg, active=os.environ.get("RANK", "0") == "0")
    metrics = train(cfg, tracker=tracker)
    if os.environ.get("RANK", "0") == "0":
        print("\n" + summary(metrics, tracking_uri(cfg) if tracker is not None else None))


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
