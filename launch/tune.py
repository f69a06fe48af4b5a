"""Ray Tune sweep over kernel families and hyperparameters (local instance or a Ray cluster).

python launch/tune.py --config configs/sweep.yaml [section.key=value ...]
RAY_ADDRESS=ray://head:10001 python launch/tune.py --config configs/sweep.yaml
python launch/tune.py --config configs/sweep.yaml tune.resume=true   # after a crash
"""

from pipeline.cli import run


def main(cfg) -> None:
    from pipeline.track.ray_env import prepare, ray_address

    prepare(ray_address(cfg))  # before ray is imported (pipeline/track/ray_env.py)
    from pipeline.track.tune import sweep

    summary = sweep(cfg)
    print(summary["table"])
    for t in summary["failed"]:
        print(f"trial {t['trial']} failed ({t['params']})")
    if summary.get("best_yaml"):
        print(
            f"best config: {summary['best_yaml']} "
            f"(python launch/train.py --config {summary['best_yaml']})"
        )


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
