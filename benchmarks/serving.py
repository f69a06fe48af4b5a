"""Serving under load: the registered demo model behind ``launch/serve.py`` (MLflow's scoring
server on 127.0.0.1), driven by a bounded client loop; and the exported model in-process.

    1. trains the demo config briefly (configs/small.yaml, 2,000 sensors) into a fresh
       embedded MLflow store and registers it (the model's speed does not depend on its steps);
    2. Predictor in-process: windows/s at batch 1 and 16, and where a single window's time goes
       (input checks and normalisation, the model, the output);
    3. ``launch/serve.py``: ``--requests`` requests, ``--concurrency`` at a time, one window of
       every sensor each: requests/s, p50 / p99 latency, errors, and the server's memory (RSS
       of its process tree) before the first request and after the last.

Usage: python benchmarks/serving.py [--requests 1000] [--concurrency 8] [--json FILE]
       (--requests 0: the in-process figures only, replacing those of an earlier --json FILE)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
ORIGIN = 1012  # the forecast's first step (time index) in the demo store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}


def train(out: Path, uri: str, steps: int) -> Path:
    args = [
        "--config",
        "configs/small.yaml",
        f"train.out_dir={out}",
        f"train.steps={steps}",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        f"tracking.uri={uri}",
        "train.resume=never",
    ]
    proc = subprocess.run(
        [sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True
    )
    if proc.returncode != 0:
        sys.exit(f"training the demo model failed:\n{proc.stderr.decode()[-3000:]}")
    return out / "small" / "model"


def window(store_path: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.store import open_store

    store = open_store(store_path)
    x = store["values"][ORIGIN - 12 : ORIGIN][None].astype(np.float32)  # [1, time_in 12, N, F]
    return x, store["time"][ORIGIN : ORIGIN + 1]


def in_process(model_dir: Path, x: np.ndarray, origin: np.ndarray, repeats: int = 20) -> dict:
    from pipeline.data.store import open_store
    from pipeline.evaluate.maps import forecast_grid
    from pipeline.model.export import Predictor

    predictor = Predictor(model_dir)
    out = {"threads": torch.get_num_threads()}
    for batch in (1, 16):
        xb, ob = np.repeat(x, batch, 0), np.repeat(origin, batch)
        predictor.predict(xb, ob)  # warm-up
        n = repeats if batch == 1 else max(2, repeats // 4)
        start = time.perf_counter()
        for _ in range(n):
            predictor.predict(xb, ob)
        seconds = (time.perf_counter() - start) / n
        out[f"batch{batch}"] = {"ms_per_call": 1000 * seconds, "windows_per_s": batch / seconds}
    # one window's parts: the model alone, against the whole predict call
    norm = torch.from_numpy(np.nan_to_num((x - predictor.mean) / predictor.std))
    mask = torch.from_numpy(np.isfinite(x))
    from pipeline.data.timefeatures import calendar_features

    cal = torch.from_numpy(calendar_features(origin))
    nbrs = torch.from_numpy(predictor.neighbours)
    nodes = torch.arange(x.shape[2])
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            predictor.model(norm, mask, cal, predictor.pos, nbrs, nodes, None)
        out["model_ms"] = 1000 * (time.perf_counter() - start) / repeats
    # a 100 x 100 forecast map (10,000 query points) of the same window
    store = open_store(ROOT / "stores/small.zarr")
    forecast_grid(predictor, store, ORIGIN, 20)  # warm-up
    start = time.perf_counter()
    forecast_grid(predictor, store, ORIGIN, 100)
    out["map_100x100_s"] = time.perf_counter() - start
    return out


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def under_load(uri: str, x: np.ndarray, origin: np.ndarray, requests: int, concurrency: int):
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"serve-bench-{port}.log", "w")  # noqa: SIM115
    args = [f"tracking.uri={uri}", "tracking.model_name=sit-small"]
    args += ["tracking.serve_alias=candidate", f"tracking.serve_port={port}"]
    server = subprocess.Popen(
        [sys.executable, "launch/serve.py", "--config", "configs/small.yaml", *args],
        cwd=ROOT,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"the server did not come up; its log: {log.name}")
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        body = json.dumps({"inputs": {"x": x.tolist(), "origin_time": origin.tolist()}}).encode()

        def one(_: int) -> tuple[float, str | None]:
            request = urllib.request.Request(
                url + "/invocations", body, {"Content-Type": "application/json"}
            )
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as resp:
                    reply = json.loads(resp.read())
                shape = np.asarray(reply["predictions"]["mean"]).shape
                error = None if shape == (1, 12, x.shape[2], 1) else f"shape {shape}"
            except (OSError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            return time.perf_counter() - start, error

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            # warm-up: one round at full concurrency (the server's threads and their buffers)
            list(pool.map(one, range(2 * concurrency)))
            rss = [rss_mb(server.pid)]  # steady state, then every tenth of the requests
            results, start = [], time.perf_counter()
            for result in tqdm(pool.map(one, range(requests)), total=requests, desc="requests"):
                results.append(result)
                if len(results) % max(1, requests // 10) == 0:
                    rss.append(rss_mb(server.pid))
            wall = time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    latencies = np.array([r[0] for r in results])
    errors = [r[1] for r in results if r[1]]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "request_kb": len(body) / 1024,
        "requests_per_s": requests / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "server_rss_mb_start": rss[0],
        "server_rss_mb_end": rss[-1],
        "server_rss_mb_samples": [round(r, 1) for r in rss],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not (ROOT / "stores/small.zarr").exists():
        subprocess.run(
            [sys.executable, "launch/preprocess.py", "--config", "configs/small.yaml"],
            cwd=ROOT,
            env=env(),
            check=True,
        )
    out = Path(tempfile.mkdtemp(prefix="sit-serve-bench-"))
    uri = f"sqlite:///{out / 'mlruns.db'}"
    print(f"training the demo model ({args.steps} steps) into {uri}", flush=True)
    model_dir = train(out, uri, args.steps)
    x, origin = window(str(ROOT / "stores/small.zarr"))
    local = in_process(model_dir, x, origin)
    b1, b16 = local["batch1"], local["batch16"]
    print(
        f"in-process ({local['threads']} threads): batch 1 {b1['ms_per_call']:.1f} ms "
        f"({b1['windows_per_s']:.1f} windows/s; the model alone {local['model_ms']:.1f} ms), "
        f"batch 16 {b16['ms_per_call']:.0f} ms ({b16['windows_per_s']:.1f} windows/s); a "
        f"100 x 100 map of the same window {local['map_100x100_s']:.2f} s"
    )
    if args.requests == 0:  # the in-process figures only, into an earlier result's file
        if args.json and Path(args.json).is_file():
            result = json.loads(Path(args.json).read_text())
            result.update(in_process=local, in_process_date=time.strftime("%Y-%m-%d"))
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    served = under_load(uri, x, origin, args.requests, args.concurrency)
    print(
        f"served: {served['requests']} requests x {served['request_kb']:.0f} kB, "
        f"{served['concurrency']} concurrent: {served['requests_per_s']:.1f} requests/s, "
        f"p50 {served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms, "
        f"errors {served['errors']}, server RSS {served['server_rss_mb_start']:.0f} -> "
        f"{served['server_rss_mb_end']:.0f} MB (every tenth: {served['server_rss_mb_samples']})"
    )
    if served["first_error"]:
        print(f"first error: {served['first_error']}")
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "sensors": int(x.shape[2]),
        "in_process": local,
        "served": served,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
