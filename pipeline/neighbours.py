"""Neighbour search and space-filling-curve order of sensors.

Both work on the 3-D positions in km of :func:`pipeline.covariance.positions_km` (for
latitude/longitude these lie on the sphere, so KD-tree distances are chordal km).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def k_nearest(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, k] (int64) and distances [N, k] (km) of each sensor's k nearest sensors.

    The sensor itself is always in its own list, first (also when several sensors share a
    position). ``k`` is capped at N.
    """
    n = len(pos)
    k = min(k, n)
    dist, idx = cKDTree(pos).query(pos, k=k, workers=-1)
    dist, idx = dist.reshape(n, k), idx.reshape(n, k).astype(np.int64)
    own = np.arange(n)
    # co-located sensors may list another sensor first: put each sensor itself at column 0
    where = idx == own[:, None]
    has = where.any(axis=1)
    col = np.where(has, where.argmax(axis=1), k - 1)
    idx[np.arange(n), col] = idx[:, 0]
    dist[np.arange(n), col] = dist[:, 0]
    idx[:, 0], dist[:, 0] = own, 0.0
    return idx, dist


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit between the 16 low bits of v (uint64)."""
    v = v & 0xFFFF
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    return (v | (v << 1)) & 0x55555555


def morton_order(pos: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Permutation [N] sorting sensors along a Z-order (Morton) curve of their (east, north)
    coordinates in the local frame; stable, so ties keep their input order."""
    plane = (pos @ frame.T)[:, :2]  # [N, 2] east/north km
    lo, hi = plane.min(axis=0), plane.max(axis=0)
    scaled = (plane - lo) / np.where(hi > lo, hi - lo, 1.0) * 65535.0
    q = scaled.round().astype(np.uint64)
    code = _spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << np.uint64(1))
    return np.argsort(code, kind="stable")
