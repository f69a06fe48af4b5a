"""Raw sensor data -> Zarr store, on a Dask cluster.

python launch/preprocess.py --config configs/los_loop.yaml [section.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import run  # noqa: E402
from pipeline.preprocess import preprocess  # noqa: E402


def main(cfg) -> None:
    path = preprocess(cfg)
    print(f"store written: {path}")


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
