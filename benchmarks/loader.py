"""Streaming throughput of the window loader against the raw read rate of the same files.

Builds (once) a synthetic store of SENSORS x STEPS, then measures on the warm page cache:
- raw: every chunk file of ``values`` and ``mask`` read as bytes (MB/s of files);
- decode: the whole ``values`` + ``mask`` arrays read through Zarr (MB/s of arrays);
- stream: ``WindowStream`` batches of the train split, whole network and spatial tiles:
  windows/s, and MB/s of store data read (the chunk cache's bytes).

Usage: python benchmarks/loader.py [--sensors 20000] [--steps 2000] [--batches 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.preprocess import preprocess
from pipeline.data.store import StoreError, open_store
from pipeline.data.stream import WindowStream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sensors", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--store", default=str(Path(tempfile.gettempdir()) / "sit-loader-bench.zarr")
    )
    args = parser.parse_args()
    try:
        store = open_store(args.store)
    except StoreError:
        preprocess(
            load_config(
                None,
                [
                    f"data.store={args.store}",
                    "data.overwrite=true",
                    f"data.synthetic.num_sensors={args.sensors}",
                    f"data.synthetic.num_steps={args.steps}",
                ],
            ),
            progress=False,
        )
        store = open_store(args.store)
    t, n, f = store.shape
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores; store {n} sensors x {t} "
        f"steps, chunks {store['values'].chunks}"
    )
    files = [
        p
        for name in ("values", "mask")
        for p in (Path(args.store) / name).rglob("*")
        if p.is_file()
    ]
    t0 = time.perf_counter()
    raw = sum(len(p.read_bytes()) for p in files)
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = store["values"][:].nbytes + store["mask"][:].nbytes
    dec_s = time.perf_counter() - t0
    print("| what | rate | MB/s |")
    print("|---|---|---|")
    print(
        f"| raw chunk files (compressed bytes) | {raw / 2**20:.0f} MB in {raw_s:.2f} s | "
        f"{raw / 2**20 / raw_s:.0f} |"
    )
    print(
        f"| Zarr decode of whole arrays | {decoded / 2**20:.0f} MB in {dec_s:.2f} s | "
        f"{decoded / 2**20 / dec_s:.0f} |"
    )
    for label, tile in (("whole network", None), ("tiles of 2,048 sensors", 2048)):
        stream = WindowStream(args.store, "train", 12, 12, args.batch_size, 16, tile_size=tile)
        it = iter(stream)
        next(it)  # open + first chunks
        t0 = time.perf_counter()
        windows = 0
        for _ in range(args.batches):
            windows += next(it)["x"].shape[0]
        secs = time.perf_counter() - t0
        mb = stream.cache.bytes_read / 2**20
        print(
            f"| stream, {label}, batch {args.batch_size} | {windows / secs:.0f} windows/s "
            f"({secs / args.batches * 1000:.1f} ms/batch) | {mb / secs:.0f} (store data read) |"
        )


if __name__ == "__main__":
    main()
