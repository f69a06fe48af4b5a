"""Raw sensor data -> Zarr store, on a Dask cluster.

python launch/preprocess.py --config configs/los_loop.yaml [section.key=value ...]
"""

from pipeline.cli import run
from pipeline.data.preprocess import preprocess


def main(cfg) -> None:
    path = preprocess(cfg)
    print(f"store written: {path}")


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
