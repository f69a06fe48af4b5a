"""Preprocessing throughput and memory: the Dask pipeline against a single-process baseline.

1. A wide CSV of SENSORS x STEPS (default 20,000 x 10,000, 1 % empty cells) is generated.
   The Dask pipeline (``launch/preprocess.py``, LocalCluster of 2 workers x 1 thread) and a
   plain pandas -> numpy -> zarr baseline doing the same work (read, mask, curve order, train
   statistics, neighbours, the same Zarr layout and chunks) run on it in the same session.
2. Synthetic fields of 250,000 and 1,000,000 sensors x 2,000 steps go to a store.
3. With ``--long-rows R``: a long Parquet file of R rows (sensor_id, time, value; 10,000
   sensors, shuffled within each row group) is generated and preprocessed in partitions
   (``data.source.partition_mb``); its peak memory is compared with the file's size.

Each job runs in its own process tree; wall time and the peak of the summed resident memory
of the tree (sampled every 0.1 s) are printed, with the ratios.

Usage: python benchmarks/preprocess.py [--sensors 20000] [--steps 10000] [--synthetic N ...]
       [--long-rows 100000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys, numpy as np, pandas as pd, zarr
from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import k_nearest, morton_order
from pipeline.data.store import create_arrays
csv, loc, out = sys.argv[1:4]
frame = pd.read_csv(csv)
time = pd.to_datetime(frame.pop("time"), utc=True).astype("int64").to_numpy()
values = frame.to_numpy(np.float32)  # [T, N]
ids = frame.columns.to_numpy()
locs = pd.read_csv(loc, dtype={"sensor_id": str}).set_index("sensor_id").loc[ids]
pos, fr = positions_km(locs[["latitude", "longitude"]].to_numpy(), "latlon")
order = morton_order(pos, fr)
values = values[:, order]
mask = np.isfinite(values)
a = int(round(len(values) * 0.7))
train = np.where(mask[:a], values[:a], np.nan)
mean, std = np.nanmean(train, 0), np.nanstd(train, 0)
t, n = values.shape
root = create_arrays(out, t, n, 1, 16, 64, 4096)
root["values"][:] = values[..., None]
root["mask"][:] = mask[..., None]
nb, nd = k_nearest(pos[order], 16)
root["time"][:] = time
root["coords"][:] = locs.to_numpy()[order]
root["sensor_id"][:] = ids[order].astype(str)
root["order"][:] = order
root["neighbours"][:] = nb
root["neighbour_dist"][:] = nd
root["mean"][:] = mean[:, None]
root["std"][:] = std[:, None]
"""


def generate_csv(path: Path, loc: Path, sensors: int, steps: int) -> None:
    rng = np.random.default_rng(0)
    table = np.array([f"{v / 10:.1f}".encode() for v in range(1000)] + [b""], dtype=object)
    t0 = np.datetime64("2024-01-01T00:00")
    with open(path, "wb") as fh:
        fh.write(b"time," + b",".join(f"s{i}".encode() for i in range(sensors)) + b"\n")
        for r in range(steps):
            codes = rng.integers(0, 1000, sensors)
            codes[rng.random(sensors) < 0.01] = 1000  # 1 % missing
            stamp = str(t0 + np.timedelta64(5 * r, "m")).encode()
            fh.write(stamp + b"," + b",".join(table[codes].tolist()) + b"\n")
    lat = 34.0 + rng.random(sensors)
    lon = -118.5 + rng.random(sensors)
    with open(loc, "w") as fh:
        fh.write("sensor_id,latitude,longitude\n")
        fh.writelines(f"s{i},{lat[i]:.6f},{lon[i]:.6f}\n" for i in range(sensors))


def generate_long_parquet(path: Path, loc: Path, rows: int, sensors: int = 10_000) -> None:
    """``rows`` readings of ``sensors`` sensors every 5 minutes, written a row group at a
    time (memory flat), rows shuffled within each group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids = np.array([f"s{i}" for i in range(sensors)], dtype=object)
    steps_per_group = max(1, 1_000_000 // sensors)
    t0 = np.datetime64("2024-01-01T00:00", "ns")
    schema = pa.schema(
        [("sensor_id", pa.string()), ("time", pa.timestamp("ns")), ("value", pa.float32())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for s0 in range(0, rows // sensors, steps_per_group):
            steps = np.arange(s0, min(s0 + steps_per_group, rows // sensors))
            perm = rng.permutation(len(steps) * sensors)
            time = np.repeat(t0 + steps * np.timedelta64(5, "m"), sensors)[perm]
            table = pa.table(
                {
                    "sensor_id": pa.array(np.tile(ids, len(steps))[perm], pa.string()),
                    "time": pa.array(time, pa.timestamp("ns")),
                    "value": pa.array(rng.normal(size=len(perm)).astype(np.float32)),
                },
                schema=schema,
            )
            writer.write_table(table)
    lat, lon = 34.0 + rng.random(sensors), -118.5 + rng.random(sensors)
    with open(loc, "w") as fh:
        fh.write("sensor_id,latitude,longitude\n")
        fh.writelines(f"s{i},{lat[i]:.6f},{lon[i]:.6f}\n" for i in range(sensors))


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MB of the command's whole process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sensors", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--synthetic", type=int, nargs="*", default=[250_000, 1_000_000])
    parser.add_argument("--long-rows", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; work dir {work}"
    )
    csv, loc = work / "wide.csv", work / "loc.csv"
    if not csv.exists():
        t0 = time.perf_counter()
        generate_csv(csv, loc, args.sensors, args.steps)
        print(
            f"# generated {csv.stat().st_size / 2**20:.0f} MB CSV "
            f"({args.sensors} x {args.steps}) in {time.perf_counter() - t0:.0f} s"
        )
    dask_cmd = [
        sys.executable,
        "launch/preprocess.py",
        f"data.store={work / 'dask.zarr'}",
        "data.overwrite=true",
        "data.source.kind=wide_csv",
        f"data.source.path={csv}",
        f"data.source.locations={loc}",
        "data.source.time_column=time",
        "data.source.freq=5min",
        "dask.workers=2",
        "dask.threads_per_worker=1",
    ]
    base_cmd = [sys.executable, "-c", BASELINE, str(csv), str(loc), str(work / "base.zarr")]
    shutil.rmtree(work / "base.zarr", ignore_errors=True)
    dask_t, dask_m = measure(dask_cmd, env)
    base_t, base_m = measure(base_cmd, env)
    print("| job | wall s | peak MB |")
    print("|---|---|---|")
    print(f"| pandas -> numpy -> zarr baseline (1 process) | {base_t:.1f} | {base_m:.0f} |")
    print(f"| Dask pipeline (2 workers x 1 thread) | {dask_t:.1f} | {dask_m:.0f} |")
    print(
        f"| ratio baseline / Dask | {base_t / dask_t:.2f}x faster | "
        f"{dask_m / base_m:.2f} of the baseline's memory |",
        flush=True,
    )
    if args.long_rows:
        long, long_loc = work / f"long{args.long_rows}.parquet", work / "long_loc.csv"
        if not long.exists():
            t0 = time.perf_counter()
            generate_long_parquet(long, long_loc, args.long_rows)
            print(
                f"# generated {long.stat().st_size / 2**20:.0f} MB Parquet in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        store = work / "long.zarr"
        cmd = [
            sys.executable,
            "launch/preprocess.py",
            f"data.store={store}",
            "data.overwrite=true",
            "data.source.kind=parquet",
            f"data.source.path={long}",
            f"data.source.locations={long_loc}",
            "dask.workers=2",
            "dask.threads_per_worker=1",
        ]
        secs, mb = measure(cmd, env)
        print(
            f"| long Parquet, {args.long_rows:,} rows ({long.stat().st_size / 2**20:.0f} MB on "
            f"disk, {args.long_rows * 16 / 2**20:.0f} MB as id/time/value columns) | "
            f"{secs:.1f} | {mb:.0f} |",
            flush=True,
        )
        shutil.rmtree(store, ignore_errors=True)
    for n in args.synthetic:
        store = work / f"syn{n}.zarr"
        cmd = [
            sys.executable,
            "launch/preprocess.py",
            f"data.store={store}",
            "data.overwrite=true",
            f"data.synthetic.num_sensors={n}",
            "data.synthetic.num_steps=2000",
            "dask.workers=2",
            "dask.threads_per_worker=1",
        ]
        secs, mb = measure(cmd, env)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**30
        print(
            f"| synthetic {n:,} sensors x 2,000 steps | {secs:.1f} | {mb:.0f} | "
            f"(store {size:.1f} GiB)",
            flush=True,
        )
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
