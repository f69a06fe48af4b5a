"""Start a Dask cluster on SLURM (dask-jobqueue) and print its scheduler address.

    pip install dask-jobqueue
    python infra/dask/slurm_cluster.py --jobs 8 --cores 16 --memory 64GB &
    DASK_SCHEDULER_ADDRESS=tcp://... python launch/preprocess.py --config configs/large.yaml

Keep this process running while preprocessing uses the cluster; Ctrl-C stops the jobs.
"""

import argparse
import time

from dask_jobqueue import SLURMCluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--memory", default="64GB")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--walltime", default="04:00:00")
    args = parser.parse_args()
    cluster = SLURMCluster(cores=args.cores, processes=args.cores // 2, memory=args.memory,
                           queue=args.queue, walltime=args.walltime)
    cluster.scale(jobs=args.jobs)
    print(f"DASK_SCHEDULER_ADDRESS={cluster.scheduler_address}", flush=True)
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
