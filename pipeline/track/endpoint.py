"""Where the MLflow tracking store is, and whether its server answers (no mlflow import)."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError

DEFAULT_URI = "sqlite:///mlruns.db"
# while training, a request to the server gives up after about a minute, not 8 (MLflow's
# defaults: 7 retries, backoff factor 2, 120 s timeout); the environment's own values win
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingError(UserError, RuntimeError):
    """The tracking server or registry cannot do what was asked."""


def tracking_uri(cfg: Config) -> str:
    """The tracking URI of ``cfg``; a relative SQLite path is made absolute (Ray Tune runs each
    trial in its own working directory, and every trial must log into the same store)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_root(uri: str) -> str | None:
    """Where an embedded (SQLite) store keeps its experiments' artifacts: beside its database
    (``mlruns.db`` -> ``mlruns/``), not in whatever directory the first run started in; None
    for a server, which has its own."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :])
    folder = db.with_suffix("") if db.suffix else db.with_name(db.name + "_artifacts")
    return folder.resolve().as_uri()


def check_reachable(uri: str) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            if resp.status != 200:
                raise TrackingError(f"MLflow server {uri} answered /health with {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, fix tracking.uri "
            "/ MLFLOW_TRACKING_URI, or unset both to use the embedded sqlite:///mlruns.db"
        ) from None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
