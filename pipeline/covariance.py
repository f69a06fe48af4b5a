"""Geostatistical correlation families and the learnable covariance bias of attention.

For head h and sensors i, j at distance d_ij (DESIGN.md section 1):

    c_h(d)      = (1 - tau_h) * rho(d / range_h) + tau_h * [i == j]
    log_bias_ij = log c_h(d_ij)  =  log(1 - tau_h) + log rho(d_ij / range_h)   (i != j)
                                 =  0                                          (i == j)

Each family below defines its correlation rho of the scaled distance h = d / range exactly
once, in log space (so that far pairs give large negative biases instead of log(0)).
``range`` is the length scale of the textbook closed form, in km; the tests pin it against
GSTools' models and their ``rescale`` conventions.

Distances come from the 3-D positions in km of :func:`pipeline.geometry.positions_km`
(Euclidean for x/y km, chordal for latitude/longitude).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
    return torch.log1p(s) - s


def log_matern52(h: Tensor) -> Tensor:
    """Matern nu=5/2: rho(h) = (1 + sqrt(5) h + 5 h^2 / 3) exp(-sqrt(5) h).

    GSTools: ``gs.Matern(nu=2.5, len_scale=range, rescale=sqrt(2))``. Reference: Rasmussen &
    Williams (2006), eq. 4.17.
    """
    s = _SQRT5 * h
    return torch.log1p(s + s * s / 3.0) - s


def log_gaussian(h: Tensor) -> Tensor:
    """Gaussian (squared exponential): rho(h) = exp(-h^2).

    GSTools: ``gs.Gaussian(len_scale=range, rescale=1)`` (its default rescale is sqrt(pi)/2).
    Reference: Chiles & Delfiner (2012), 2.5.
    """
    return -h * h


def log_rational_quadratic(h: Tensor, alpha: float = 1.0) -> Tensor:
    """Rational quadratic with alpha = 1 (Cauchy type): rho(h) = (1 + h^2 / (2 alpha))^(-alpha).

    GSTools: ``gs.Rational(alpha=1, len_scale=range, rescale=1/sqrt(2))`` (GSTools writes
    h^2 / alpha). Reference: Rasmussen &
    Williams (2006), eq. 4.19.
    """
    return -alpha * torch.log1p(h * h / (2.0 * alpha))


def log_spherical(h: Tensor) -> Tensor:
    """Spherical (compact support): rho(h) = 1 - 3h/2 + h^3/2 = (1 - h)^2 (2 + h) / 2 for h < 1,
    0 beyond (log clamped at log(1e-12)^2 with a zero gradient there).

    GSTools: ``gs.Spherical(len_scale=range)`` (rescale 1). Reference: Chiles & Delfiner
    (2012), 2.5. Positive definite in up to three dimensions.
    """
    hc = h.clamp(max=1.0)
    return math.log(0.5) + 2.0 * torch.log((1.0 - hc).clamp_min(_LOG_FLOOR)) + torch.log(2.0 + hc)


LOG_CORRELATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "exponential": log_exponential,
    "matern32": log_matern32,
    "matern52": log_matern52,
    "gaussian": log_gaussian,
    "rational_quadratic": log_rational_quadratic,
    "spherical": log_spherical,
}


def correlation(family: str, h: Tensor) -> Tensor:
    """rho_family(h) for scaled distances h >= 0."""
    return torch.exp(LOG_CORRELATIONS[family](h))


def _safe_norm(x: Tensor, dim: int = -1) -> Tensor:
    # sqrt has an infinite derivative at 0: clamp so that d = 0 (self pairs) has gradient 0.
    return (x * x).sum(dim).clamp_min(1e-30).sqrt()


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class CovarianceBias(nn.Module):
    """Learnable per-head covariance c_h(d) and its log as an attention bias.

    Parameters per head: range (km, softplus), nugget tau (sigmoid), and optionally a geometric
    anisotropy: the offset, in the local (east, north) frame, is rotated by ``angle`` and its
    minor-axis component divided by ``ratio = exp(log_ratio)`` before taking the norm.
    """

    def __init__(
        self,
        family: str,
        heads: int,
        init_range_km: float = 10.0,
        init_nugget: float = 0.1,
        anisotropy: bool = False,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if family != "none" and family not in LOG_CORRELATIONS:
            raise ValueError(f"unknown covariance family {family!r}")
        self.family, self.heads, self.anisotropy = family, heads, anisotropy
        self.raw_range = nn.Parameter(
            torch.full((heads,), _inverse_softplus(init_range_km)), requires_grad=learnable
        )
        self.raw_nugget = nn.Parameter(
            torch.full((heads,), math.log(init_nugget / (1 - init_nugget))),
            requires_grad=learnable,
        )
        if anisotropy:
            # spread initial angles so heads can specialise; ratio starts isotropic
            self.angle = nn.Parameter(torch.arange(heads) * (math.pi / max(heads, 1)))
            self.log_ratio = nn.Parameter(torch.zeros(heads))
        self.register_buffer("frame", torch.eye(3), persistent=False)

    @property
    def range_km(self) -> Tensor:
        return F.softplus(self.raw_range)

    @property
    def nugget(self) -> Tensor:
        return torch.sigmoid(self.raw_nugget)

    def set_frame(self, frame: Tensor) -> None:
        """Local (east, north, up) frame of the network, rows [3, 3] (see positions_km)."""
        self.frame = frame.to(self.frame)

    def distance(self, offset: Tensor) -> Tensor:
        """Per-head (possibly anisotropic) distance [H, ...] from offsets [..., 3] in km."""
        if not self.anisotropy:
            return _safe_norm(offset).unsqueeze(0).expand(self.heads, *offset.shape[:-1])
        local = offset @ self.frame.to(offset.dtype).T  # [..., 3] as (east, north, up)
        shape = (self.heads,) + (1,) * (offset.dim() - 1)
        cos, sin = torch.cos(self.angle).view(shape), torch.sin(self.angle).view(shape)
        e, n, u = local[..., 0], local[..., 1], local[..., 2]
        major = cos * e + sin * n  # [H, ...]
        minor = (-sin * e + cos * n) * torch.exp(-self.log_ratio).view(shape)
        return _safe_norm(torch.stack([major, minor, u.expand_as(major)], dim=-1))

    def scaled_projection(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """Per-head linear map [H, 3, 3] taking an offset (km) to the scaled offset whose norm is
        d / range_h, as :meth:`distance` defines d; None when isotropic (then it is
        I / range_h). Used by the block backend, whose ``score_mod`` sees one pair at a time."""
        if not self.anisotropy:
            return None
        frame = self.frame.to(dtype)
        cos, sin = torch.cos(self.angle).to(dtype), torch.sin(self.angle).to(dtype)
        inv_ratio = torch.exp(-self.log_ratio).to(dtype)
        east, north, up = frame[0], frame[1], frame[2]  # [3] each
        major = cos[:, None] * east + sin[:, None] * north  # [H, 3]
        minor = (-sin[:, None] * east + cos[:, None] * north) * inv_ratio[:, None]
        rows = torch.stack([major, minor, up.expand_as(major)], dim=1)  # [H, 3, 3]
        return rows / self.range_km.to(dtype)[:, None, None]

    def log_bias(self, offset: Tensor, is_self: Tensor) -> Tensor | None:
        """log c_h(d) [H, ...] for offsets [..., 3] (km); ``is_self`` [...] marks i == j.

        Returns None for the family ``none`` (no bias: a plain transformer).
        """
        if self.family == "none":
            return None
        d = self.distance(offset)  # [H, ...]
        shape = (self.heads,) + (1,) * (d.dim() - 1)
        h = d / self.range_km.view(shape).to(d.dtype)
        log_rho = LOG_CORRELATIONS[self.family](h)
        log_off = torch.log1p(-self.nugget).view(shape).to(d.dtype) + log_rho
        return torch.where(is_self, torch.zeros_like(log_off), log_off)

    def forward(self, offset: Tensor, is_self: Tensor) -> Tensor | None:
        return self.log_bias(offset, is_self)

    def describe(self) -> dict[str, list[float]]:
        """Learned parameters per head, as plain floats (for metrics and logging)."""
        out = {
            "range_km": self.range_km.detach().cpu().tolist(),
            "nugget": self.nugget.detach().cpu().tolist(),
        }
        if self.anisotropy:
            # canonical form: ratio <= 1 and the angle of the major axis in [0, 180)
            swapped = self.log_ratio > 0
            angle = torch.rad2deg(self.angle) + 90.0 * swapped
            out["angle_deg"] = torch.remainder(angle, 180.0).detach().cpu().tolist()
            out["axis_ratio"] = torch.exp(-self.log_ratio.abs()).detach().cpu().tolist()
        return out
