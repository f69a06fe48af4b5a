"""Neighbour search and space-filling-curve order of sensors.

Both work on the 3-D positions in km of :func:`pipeline.model.covariance.positions_km` (for
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


COLOCATED_KM = 1e-9  # a sensor this close to a point is at the point


def nearest_to(pos: np.ndarray, points: np.ndarray, k: int, spare: int = 8) -> np.ndarray:
    """Indices [M, k] (int64) of the ``k`` sensors of ``pos`` [N, 3] nearest to each of
    ``points`` [M, 3], nearest first, leaving out sensors at the point itself (so that a point
    at a sensor's position has the neighbours that sensor has besides itself); -1 pads a row
    where fewer remain (more than ``spare`` sensors at one point, or k >= N)."""
    want = min(k + spare, len(pos))
    dist, idx = cKDTree(pos).query(points, k=want, workers=-1)
    dist, idx = dist.reshape(len(points), want), idx.reshape(len(points), want)
    out = np.full((len(points), k), -1, dtype=np.int64)
    for row, (d, i) in enumerate(zip(dist, idx, strict=True)):
        keep = i[d > COLOCATED_KM][:k]
        out[row, : len(keep)] = keep
    return out


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit between the 16 low bits of v (uint64)."""
    v = v & 0xFFFF
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    return (v | (v << 1)) & 0x55555555


def _plane_grid(pos: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """(east, north) coordinates in the local frame, scaled to a 65,536 x 65,536 grid [N, 2]."""
    plane = (pos @ frame.T)[:, :2]  # [N, 2] east/north km
    lo, hi = plane.min(axis=0), plane.max(axis=0)
    scaled = (plane - lo) / np.where(hi > lo, hi - lo, 1.0) * 65535.0
    return scaled.round().astype(np.uint64)


def morton_order(pos: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Permutation [N] sorting sensors along a Z-order (Morton) curve of their (east, north)
    coordinates in the local frame; stable, so ties keep their input order."""
    q = _plane_grid(pos, frame)
    code = _spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << np.uint64(1))
    return np.argsort(code, kind="stable")


def hilbert_index(x: np.ndarray, y: np.ndarray, bits: int = 16) -> np.ndarray:
    """Position of grid cells (x, y) in [0, 2^bits) along the Hilbert curve (int64).

    The classic iterative form (Hamilton, "Compact Hilbert indices", 2006): per level, take one
    bit of each coordinate, add the quadrant's rank, then rotate/reflect the lower bits.
    """
    x, y = x.astype(np.int64), y.astype(np.int64)
    d = np.zeros_like(x)
    s = 1 << (bits - 1)
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x, y = np.where(flip, s - 1 - x, x), np.where(flip, s - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s >>= 1
    return d


def hilbert_order(pos: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Permutation [N] sorting sensors along a Hilbert curve of their (east, north) coordinates.

    Unlike Morton's, the Hilbert curve never jumps: runs of consecutive sensors are compact
    regions, so blocks of the ``block`` attention backend and spatial tiles hold more of each
    sensor's true nearest neighbours (docs/benchmarks.md: 99.5 % against 94.5 % of the 32
    nearest in 8 key blocks of 128 at N = 1,048,576)."""
    q = _plane_grid(pos, frame)
    return np.argsort(hilbert_index(q[:, 0], q[:, 1]), kind="stable")


CURVES = {"morton": morton_order, "hilbert": hilbert_order}


def curve_order(pos: np.ndarray, frame: np.ndarray, curve: str) -> np.ndarray:
    """The permutation of the space-filling curve ``curve`` (``morton`` or ``hilbert``)."""
    return CURVES[curve](pos, frame)
