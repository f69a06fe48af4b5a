"""The environment a Ray instance starts in, set before ray is imported (no ray import here).

A new local instance (no ``tune.address`` / ``$RAY_ADDRESS``) listens on loopback only: Ray
binds its gRPC servers (GCS, raylet, workers, the runtime-env agent) to 127.0.0.1 only with
its multi-machine mode off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), a switch it reads once,
when ``ray`` is imported; otherwise they listen on every interface, even with
``ray.init(_node_ip_address="127.0.0.1")``. With token authentication (Ray's default for a
new local instance) Ray writes its token to ``~/.ray/auth_token`` readable by everyone; the token
is created here first, readable by its owner only, and an existing one is made so.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pipeline.config import Config

CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ray_address(cfg: Config) -> str | None:
    """The Ray address of a sweep: ``tune.address``, else ``$RAY_ADDRESS``, else None (a new
    local instance)."""
    return cfg.tune.address or os.environ.get("RAY_ADDRESS") or None


def is_local(address: str | None) -> bool:
    """True for a new local instance or a head on this machine's loopback."""
    if not address:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK


def prepare(address: str | None) -> None:
    """Before ``import ray``: a new local instance on loopback only, with a private token. A
    running head (even on this machine) listens where ``ray start`` told it to; a driver that
    joins it keeps Ray's defaults (with the switch off it could not find its own node)."""
    if address:
        return
    os.environ[CLUSTER_SWITCH] = "0"
    private_token()


def private_token() -> Path | None:
    """Ray's token file, created (when missing) or made readable by its owner only; None when
    token authentication is off or the token is given inline (``$RAY_AUTH_TOKEN``)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get(
        "RAY_AUTH_TOKEN"
    ):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(given) if given else Path.home() / ".ray" / "auth_token"
    if not path.exists():
        if given:
            return None  # Ray names a missing token file itself
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
        return path
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
        print(f"Ray's token {path} was readable by other users: now by its owner only")
    return path
