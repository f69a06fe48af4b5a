"""The covariance kernel families, one table (``FAMILIES``): what a family is, in one place.

Each family defines its correlation rho of the scaled distance h = d / range exactly once, in
log space (so that far pairs give large negative biases instead of log(0)); ``range`` is the
length scale of the textbook closed form, in km. With it: the GSTools model in our conventions
(classical variography; the tests pin each against GSTools' ``rescale``) and the sampler of its
spectral law (synthetic fields). ``config`` (``model.kernel``, ``synthetic.family``), the
attention bias (pipeline/model/covariance.py), the variography fit and the synthetic sampler
all read this table, so adding a family is one entry. The correlations use tensor methods
only, so the table (and the config that reads it) imports no torch: Dask workers stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the functions take torch tensors; this table imports no torch
    from torch import Tensor

_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)
_LOG_FLOOR = 1e-12  # spherical: log of the compact support's zero is clamped here


def log_exponential(h: Tensor) -> Tensor:
    """Exponential (Matern nu=1/2): rho(h) = exp(-h).

    GSTools: ``gs.Exponential(len_scale=range)`` (rescale 1). Reference: Stein (1999), 2.7.
    """
    return -h


def log_matern32(h: Tensor) -> Tensor:
    """Matern nu=3/2: rho(h) = (1 + sqrt(3) h) exp(-sqrt(3) h).

    GSTools: ``gs.Matern(nu=1.5, len_scale=range, rescale=sqrt(2))`` (GSTools writes the Matern
    with sqrt(nu) h; the textbook form uses sqrt(2 nu) h). Reference: Rasmussen & Williams
    (2006), eq. 4.17.
    """
    s = _SQRT3 * h
    return s.log1p() - s


def log_matern52(h: Tensor) -> Tensor:
    """Matern nu=5/2: rho(h) = (1 + sqrt(5) h + 5 h^2 / 3) exp(-sqrt(5) h).

    GSTools: ``gs.Matern(nu=2.5, len_scale=range, rescale=sqrt(2))``. Reference: Rasmussen &
    Williams (2006), eq. 4.17.
    """
    s = _SQRT5 * h
    return (s + s * s / 3.0).log1p() - s


def log_gaussian(h: Tensor) -> Tensor:
    """Gaussian (squared exponential): rho(h) = exp(-h^2).

    GSTools: ``gs.Gaussian(len_scale=range, rescale=1)`` (its default rescale is sqrt(pi)/2).
    Reference: Chiles & Delfiner (2012), 2.5.
    """
    return log_gaussian_sq(h * h)


def log_rational_quadratic(h: Tensor, alpha: float = 1.0) -> Tensor:
    """Rational quadratic with alpha = 1 (Cauchy type): rho(h) = (1 + h^2 / (2 alpha))^(-alpha).

    GSTools: ``gs.Rational(alpha=1, len_scale=range, rescale=1/sqrt(2))`` (GSTools writes
    h^2 / alpha). Reference: Rasmussen &
    Williams (2006), eq. 4.19.
    """
    return log_rational_quadratic_sq(h * h, alpha)


def log_gaussian_sq(u: Tensor) -> Tensor:
    """:func:`log_gaussian` of u = h^2: -u (no square root per pair in the block backend)."""
    return -u


def log_rational_quadratic_sq(u: Tensor, alpha: float = 1.0) -> Tensor:
    """:func:`log_rational_quadratic` of u = h^2."""
    return -alpha * (u / (2.0 * alpha)).log1p()


def log_spherical(h: Tensor) -> Tensor:
    """Spherical (compact support): rho(h) = 1 - 3h/2 + h^3/2 = (1 - h)^2 (2 + h) / 2 for h < 1,
    0 beyond (log clamped at log(1e-12)^2 with a zero gradient there).

    GSTools: ``gs.Spherical(len_scale=range)`` (rescale 1). Reference: Chiles & Delfiner
    (2012), 2.5. Positive definite in up to three dimensions.
    """
    hc = h.clamp(max=1.0)
    return math.log(0.5) + 2.0 * (1.0 - hc).clamp_min(_LOG_FLOOR).log() + (2.0 + hc).log()


# --------------------------------------------------------------------------------------------
# Spectral laws (Bochner): a stationary correlation rho(|delta|) in 2-D is E[cos(omega . delta)]
# for omega drawn from its normalised spectral density; at range 1, omega in rad per range.


def _spectral_gaussian(rng: np.random.Generator, m: int) -> np.ndarray:
    """exp(-h^2): omega ~ N(0, 2 I)."""
    return rng.standard_normal((m, 2)) * math.sqrt(2.0)


def _spectral_matern(nu: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Matern nu (textbook sqrt(2 nu) h form): omega is a bivariate Student t with 2 nu
    degrees of freedom (a normal over sqrt(chi2 / dof))."""

    def draw(rng: np.random.Generator, m: int) -> np.ndarray:
        g = rng.standard_normal((m, 2))
        dof = 2.0 * nu
        return g / np.sqrt(rng.chisquare(dof, size=(m, 1)) / dof)

    return draw


def _spectral_rational_quadratic(rng: np.random.Generator, m: int) -> np.ndarray:
    """(1 + h^2 / 2)^-1: a Gaussian scale mixture, omega = g sqrt(2 lambda), lambda ~
    Gamma(1, 1/2)."""
    g = rng.standard_normal((m, 2))
    return g * np.sqrt(2.0 * rng.gamma(1.0, 0.5, size=(m, 1)))


@dataclass(frozen=True)
class Family:
    """What a correlation family is, in one place."""

    log_correlation: Callable[[Tensor], Tensor]
    """log rho(h) of the scaled distance h = d / range (torch; the attention bias)."""
    gstools: tuple[str, dict[str, float]]
    """GSTools model class name and the kwargs (``rescale``) that make its length scale our
    ``range`` (classical variography)."""
    spectral: Callable[[np.random.Generator, int], np.ndarray] | None
    """Draws m frequencies [m, 2] of its spectral law at range 1 (synthetic fields by random
    Fourier features), or None where a family has no simple sampler."""
    log_correlation_sq: Callable[[Tensor], Tensor] | None = None
    """The same log rho as a function of u = h^2, where the family is one of h^2 alone: the
    block backend's ``score_mod`` then takes no square root per pair (issue 22)."""


FAMILIES: dict[str, Family] = {
    "exponential": Family(log_exponential, ("Exponential", {}), _spectral_matern(0.5)),
    "matern32": Family(
        log_matern32, ("Matern", {"nu": 1.5, "rescale": math.sqrt(2)}), _spectral_matern(1.5)
    ),
    "matern52": Family(
        log_matern52, ("Matern", {"nu": 2.5, "rescale": math.sqrt(2)}), _spectral_matern(2.5)
    ),
    "gaussian": Family(
        log_gaussian, ("Gaussian", {"rescale": 1.0}), _spectral_gaussian, log_gaussian_sq
    ),
    "rational_quadratic": Family(
        log_rational_quadratic,
        ("Rational", {"alpha": 1.0, "rescale": 1 / math.sqrt(2)}),
        _spectral_rational_quadratic,
        log_rational_quadratic_sq,
    ),
    "spherical": Family(log_spherical, ("Spherical", {}), None),
}
"""The kernel families: adding one is one entry here (config, attention, variography and the
synthetic sampler all read this table)."""

KERNELS: tuple[str, ...] = (*FAMILIES, "none")
"""Values of ``model.kernel``: a family, or ``none`` (no spatial bias: a plain transformer)."""

LOG_CORRELATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    name: family.log_correlation for name, family in FAMILIES.items()
}


def correlation(family: str, h: Tensor) -> Tensor:
    """rho_family(h) for scaled distances h >= 0."""
    return LOG_CORRELATIONS[family](h).exp()
