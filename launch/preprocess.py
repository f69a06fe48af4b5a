"""Raw sensor data -> Zarr store, on a Dask cluster.

python launch/preprocess.py --config configs/los_loop.yaml [section.key=value ...]
python launch/preprocess.py --verify stores/los_loop.zarr   # every file against its checksum
"""

import sys

from pipeline.cli import reporting_user_errors, run
from pipeline.data.preprocess import preprocess
from pipeline.data.store import verify_store


def main(cfg) -> None:
    path = preprocess(cfg)
    print(f"store written: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--verify"]:  # python launch/preprocess.py --verify STORE
        if len(sys.argv) != 3:
            sys.exit("usage: python launch/preprocess.py --verify STORE")
        count = reporting_user_errors(lambda: verify_store(sys.argv[2]))
        print(f"store {sys.argv[2]}: all {count} files match their checksums")
    else:
        run(__doc__.strip().splitlines()[0], main)
