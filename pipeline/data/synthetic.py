"""Space-time Gaussian random fields with known truth (docs/design.md, section 2).

Random Fourier features (Bochner): with frequencies omega_m drawn from the spectral density of
the correlation rho (normalised to a probability law),

    f(s, t) = sqrt(variance / M) * sum_m [a_m(t) cos(omega_m . s) + b_m(t) sin(omega_m . s)]

has covariance variance * E[cos(omega . (s - s'))] = variance * rho(|s - s'| / range) when the
coefficients a, b are independent standard normal. They evolve in time as stationary AR(1)
series (coefficient ``ar_coef``), so the field is one product [T, 2M] x [2M, N]. Observations
add independent noise of variance ``nugget`` and the constant ``mean``.

Spectral laws for rho of h = d / range in 2-D (textbook conventions of pipeline/covariance.py):
Gaussian exp(-h^2): omega ~ N(0, 2 / range^2 I); Matern nu (incl. exponential, nu = 1/2):
multivariate Student-t with 2 nu degrees of freedom and scale 1 / range (Cauchy for the
exponential); rational quadratic (alpha): a Gamma(alpha, rate 2 alpha) mixture of Gaussians.
Geometric anisotropy maps offsets through the same rotation and stretch as the model.

Everything is a pure function of (seed, configuration) and of the (time, sensor) index of each
value (positions and noise come from a counter-based generator): any time range and any set of
sensors can be generated on its own, and the values do not depend on how the (T, N) plane is
chunked.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

from pipeline.config import SyntheticConfig
from pipeline.kernels import FAMILIES

# independent random streams
_FREQ, _POS_X, _POS_Y, _NOISE_A, _NOISE_B, _COEF = range(6)
_IN_CLUSTER, _CLUSTER, _CENTRE_X, _CENTRE_Y, _SPREAD_A, _SPREAD_B, _SPREAD_C, _SPREAD_D = range(
    6, 14
)
_OUT_X, _OUT_Y, _OUT_START, _OUT_LENGTH = range(14, 18)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, stream: int, counter: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) numbers that are a pure function of (seed, stream, counter): any subset
    of indices can be drawn on its own, in any chunking, with the same result."""
    key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(stream))
    bits = _splitmix64(np.asarray(counter, dtype=np.uint64) ^ key)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def counter_normal(seed: int, stream_a: int, stream_b: int, counter: np.ndarray) -> np.ndarray:
    """Standard normal numbers from two counter-based uniform streams (Box-Muller)."""
    u1 = counter_uniform(seed, stream_a, counter)
    u2 = counter_uniform(seed, stream_b, counter)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def anisotropy_matrix(angle_deg: float, ratio: float) -> np.ndarray:
    """A [2, 2] with |A (dx, dy)| the anisotropic distance of an offset in (east, north) km."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return np.diag([1.0, 1.0 / ratio]) @ rot


def sample_frequencies(cfg: SyntheticConfig) -> np.ndarray:
    """Frequencies omega [M, 2] (rad/km) drawn from the spectral law of ``cfg.family``."""
    spectral = FAMILIES[cfg.family].spectral
    if spectral is None:
        raise ValueError(f"family {cfg.family!r} has no spectral sampler")
    omega = spectral(_rng(cfg.seed, _FREQ), cfg.num_features) / cfg.range_km
    # cos(omega . A delta) = cos((A^T omega) . delta)
    return omega @ anisotropy_matrix(cfg.anisotropy_angle_deg, cfg.anisotropy_ratio)


class SyntheticField:
    """The field of a :class:`SyntheticConfig`, generated chunk by chunk."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.omega = sample_frequencies(cfg)  # [M, 2]
        self._coef: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.cfg.num_steps, self.cfg.num_sensors

    def sensor_ids(self) -> np.ndarray:
        """Sensor ids [N] ("s0042"), zero-padded to one width so that they sort by index."""
        n = self.cfg.num_sensors
        width = max(1, math.ceil(math.log10(n)))
        return np.asarray([f"s{i:0{width}d}" for i in range(n)], dtype=object)

    def coords(self, sensors: np.ndarray) -> np.ndarray:
        """x/y km [n, 2] of the sensors with indices ``sensors`` [n]: uniform in the domain,
        or (``clustered``) around the centre of the sensor's cluster."""
        c = self.cfg
        sensors = np.asarray(sensors, dtype=np.uint64)
        xy = c.domain_km * np.stack(
            [counter_uniform(c.seed, _POS_X, sensors), counter_uniform(c.seed, _POS_Y, sensors)],
            axis=1,
        )  # [n, 2]
        if c.layout == "uniform":
            return xy
        inside = counter_uniform(c.seed, _IN_CLUSTER, sensors) < c.cluster_fraction  # [n]
        cluster = np.floor(counter_uniform(c.seed, _CLUSTER, sensors) * c.clusters)
        cluster = cluster.astype(np.uint64)
        centre = c.domain_km * np.stack(
            [
                counter_uniform(c.seed, _CENTRE_X, cluster),
                counter_uniform(c.seed, _CENTRE_Y, cluster),
            ],
            axis=1,
        )
        spread = c.cluster_km * np.stack(
            [
                counter_normal(c.seed, _SPREAD_A, _SPREAD_B, sensors),
                counter_normal(c.seed, _SPREAD_C, _SPREAD_D, sensors),
            ],
            axis=1,
        )
        return np.where(inside[:, None], centre + spread, xy)

    def observed(self, t0: int, t1: int, sensors: np.ndarray | None = None) -> np.ndarray:
        """Whether each sensor reports [t1 - t0, n] (all True without outages): a pure
        function of (seed, configuration, t, sensor), like the values."""
        c = self.cfg
        if sensors is None:
            sensors = np.arange(c.num_sensors)
        seen = np.ones((t1 - t0, len(sensors)), dtype=bool)
        if c.outage_fraction == 0:
            return seen
        xy = self.coords(sensors)  # [n, 2]
        # patches of radius r cover the share f of the area on average: 1 - exp(-P pi r^2 / D^2)
        radius = c.domain_km * math.sqrt(
            -math.log1p(-c.outage_fraction) / (c.outage_patches * math.pi)
        )
        length = c.outage_steps
        for episode in range(t0 // length, (t1 - 1) // length + 1):
            key = np.uint64(episode) * np.uint64(c.outage_patches) + np.arange(
                c.outage_patches, dtype=np.uint64
            )
            centres = c.domain_km * np.stack(
                [counter_uniform(c.seed, _OUT_X, key), counter_uniform(c.seed, _OUT_Y, key)], axis=1
            )  # [P, 2]
            ep = np.asarray([episode], dtype=np.uint64)
            u_length, u_start = (
                counter_uniform(c.seed, s, ep)[0] for s in (_OUT_LENGTH, _OUT_START)
            )
            span = int(round(length * (0.5 + 0.5 * u_length)))  # half to all of the episode
            start = episode * length + int(u_start * (length - span + 1))
            lo, hi = max(start, t0), min(start + span, t1)
            if lo >= hi:
                continue
            near = ((xy[:, None] - centres[None]) ** 2).sum(-1).min(1) < radius * radius  # [n]
            seen[lo - t0 : hi - t0, near] = False
        return seen

    def coefficients(self) -> np.ndarray:
        """AR(1) Fourier coefficients [T, 2M], stationary with unit variance (cached)."""
        if self._coef is None:
            phi = self.cfg.ar_coef
            eps = _rng(self.cfg.seed, _COEF).standard_normal(
                (self.cfg.num_steps, 2 * len(self.omega))
            )
            # a_0 = eps_0; a_t = phi a_{t-1} + sqrt(1 - phi^2) eps_t
            zi = (phi * eps[0])[None]
            rest = lfilter([math.sqrt(1 - phi * phi)], [1.0, -phi], eps[1:], axis=0, zi=zi)[0]
            self._coef = np.concatenate([eps[:1], rest])
        return self._coef

    def latent(self, t0: int, t1: int, sensors: np.ndarray) -> np.ndarray:
        """The noise-free field [t1 - t0, n] at ``sensors`` (float64, without the mean)."""
        phase = self.omega @ self.coords(sensors).T  # [M, n]
        basis = np.concatenate([np.cos(phase), np.sin(phase)])  # [2M, n]
        scale = math.sqrt(self.cfg.variance / len(self.omega))
        return scale * (self.coefficients()[t0:t1] @ basis)

    def noise(self, t0: int, t1: int, sensors: np.ndarray) -> np.ndarray:
        """Standard-normal measurement noise [t1 - t0, n], a pure function of (t, sensor)."""
        counter = (
            np.arange(t0, t1, dtype=np.uint64)[:, None] * np.uint64(self.cfg.num_sensors)
            + np.asarray(sensors, dtype=np.uint64)[None, :]
        )
        return counter_normal(self.cfg.seed, _NOISE_A, _NOISE_B, counter)

    def values(self, t0: int, t1: int, sensors: np.ndarray | None = None) -> np.ndarray:
        """Observed values [t1 - t0, n] float32 at ``sensors`` (default: all, in index order):
        mean + field + sqrt(nugget) * noise."""
        if sensors is None:
            sensors = np.arange(self.cfg.num_sensors)
        obs = self.latent(t0, t1, sensors) + math.sqrt(self.cfg.nugget) * self.noise(
            t0, t1, sensors
        )
        return (obs + self.cfg.mean).astype(np.float32)

    def truth(self) -> dict[str, float | str]:
        """The true parameters (written into the store's attributes)."""
        c = self.cfg
        return {
            "family": c.family,
            "range_km": c.range_km,
            "variance": c.variance,
            "nugget": c.nugget,
            "nugget_fraction": c.nugget / (c.variance + c.nugget),
            "anisotropy_angle_deg": c.anisotropy_angle_deg,
            "anisotropy_ratio": c.anisotropy_ratio,
            "ar_coef": c.ar_coef,
            "layout": c.layout,
            "outage_fraction": c.outage_fraction,
            "seed": c.seed,
        }
