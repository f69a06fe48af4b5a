"""Sensor positions and distances, in km (NumPy only).

Every sensor gets a 3-D position in km: projected x/y coordinates lie in the plane z = 0, so
distances are Euclidean; latitude/longitude lie on a sphere of the Earth's radius, so the
Euclidean distance between positions is the chordal distance, which keeps every covariance
family positive definite on the sphere. A local (east, north, up) frame orients anisotropy
and the space-filling curve.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0088


def positions_km(coords: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    """3-D positions in km [N, 3] and a local frame [3, 3] (rows: east, north, up).

    ``crs="xy"``: coords are x/y km; positions (x, y, 0), frame = identity.
    ``crs="latlon"``: coords are latitude/longitude degrees; positions on the sphere of the
    Earth's radius (Euclidean distance = chordal distance); the frame is east/north/up at the
    network's centroid (used by anisotropy and by the space-filling curve).
    """
    coords = np.asarray(coords, dtype=np.float64)
    if crs == "xy":
        pos = np.zeros((len(coords), 3))
        pos[:, :2] = coords
        return pos, np.eye(3)
    if crs != "latlon":
        raise ValueError(f"crs must be 'xy' or 'latlon', got {crs!r}")
    lat, lon = np.radians(coords[:, 0]), np.radians(coords[:, 1])
    unit = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    up = unit.mean(axis=0)
    up /= np.linalg.norm(up)
    east = np.cross([0.0, 0.0, 1.0], up)
    east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-12 else np.array([1.0, 0, 0])
    north = np.cross(up, east)
    return EARTH_RADIUS_KM * unit, np.stack([east, north, up])


def euclidean_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between x/y km coordinates [..., 2]."""
    return np.linalg.norm(np.asarray(a, float) - np.asarray(b, float), axis=-1)


def chordal_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chordal distance in km between latitude/longitude degrees [..., 2]."""
    pa, _ = positions_km(np.reshape(a, (-1, 2)), "latlon")
    pb, _ = positions_km(np.reshape(b, (-1, 2)), "latlon")
    return np.linalg.norm(pa - pb, axis=-1).reshape(np.shape(a)[:-1])
