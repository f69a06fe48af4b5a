"""Metric batches delivered in the background: training never waits for a tracking server,
and nothing it logged is lost while the server is away (pipeline/track/tracking.py gives the
``send`` that talks to MLflow). A batch is ``{"step", "time_ms", "metrics": {name: value}}``."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RETRY_S = 30.0  # while the server is away, try it again this often


class MetricSender:
    """Sends metric batches through ``send`` from a daemon thread; :meth:`put` never blocks.

    A batch the server does not take is kept, appended to ``unsent`` (JSON lines, so that a
    killed process loses nothing), and sent again, in order, every ``RETRY_S`` until the
    server answers; then ``unsent`` is emptied. The first failure prints one warning, the
    recovery one line."""

    def __init__(self, send: Callable[[dict], None], unsent: Path, where: str) -> None:
        self.send, self.unsent, self.where = send, unsent, where
        self.pending: list[dict] = []  # batches not yet taken by the server, oldest first
        # while offline_since is set, ``unsent`` holds every pending batch (appended as they come)
        self.offline_since: int | None = None
        if unsent.is_file():  # left by an earlier process of this run: sent first
            self.pending = [json.loads(line) for line in unsent.read_text().splitlines() if line]
            self.offline_since = self.pending[0]["step"] if self.pending else None
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="metric-sender", daemon=True)
        self.thread.start()

    def put(self, step: int, metrics: dict[str, float]) -> None:
        batch = {"step": step, "time_ms": int(time.time() * 1000), "metrics": metrics}
        with self.cond:
            self.pending.append(batch)
            if self.offline_since is not None:
                self._append_unsent([batch])
            self.cond.notify()

    @property
    def online(self) -> bool:
        """False from a failed send until the server takes the batches again."""
        return self.offline_since is None

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every batch to be sent; True when all were."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.cond.notify()
            while self.pending and time.monotonic() < deadline:
                self.cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
            return not self.pending

    def close(self) -> None:
        """Stop sending; what is still pending is left in ``unsent`` for a later run."""
        with self.cond:
            if self.pending and self.offline_since is None:  # not written there yet
                self._append_unsent(self.pending)
            self.closed = True
            self.cond.notify()

    def _append_unsent(self, batches: list[dict]) -> None:
        with open(self.unsent, "a") as f:
            f.writelines(json.dumps(b) + "\n" for b in batches)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch = self.pending[0]
            try:
                self.send(batch)
            except Exception as exc:  # noqa: BLE001 - any failure of the server: keep the batch
                with self.cond:
                    if self.closed:
                        return
                    if self.offline_since is None:
                        self.offline_since = batch["step"]
                        self._append_unsent(self.pending)
                        print(
                            f"warning: {self.where} did not take the metrics of step "
                            f"{batch['step']} ({type(exc).__name__}); training goes on, and "
                            f"they wait in {self.unsent} to be sent when it answers",
                            file=sys.stderr,
                            flush=True,
                        )
                    self.cond.wait(RETRY_S)
                continue
            with self.cond:
                if self.closed:  # close() has left this batch in ``unsent``: a later run sends it
                    return
                self.pending.pop(0)
                if not self.pending:
                    if self.offline_since is not None:
                        print(f"{self.where} answers again: metrics sent", flush=True)
                        self.offline_since = None
                    self.unsent.unlink(missing_ok=True)
                    self.cond.notify_all()
