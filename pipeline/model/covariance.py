"""The learnable covariance bias of attention (the kernel of a family, range, nugget, anisotropy).

For head h and sensors i, j at distance d_ij (docs/design.md, section 1):

    c_h(d)      = (1 - tau_h) * rho(d / range_h) + tau_h * [i == j]
    log_bias_ij = log c_h(d_ij)  =  log(1 - tau_h) + log rho(d_ij / range_h)   (i != j)
                                 =  0                                          (i == j)

The families (rho in log space, one table) are in pipeline/kernels.py.

Distances come from the 3-D positions in km of :func:`pipeline.data.geometry.positions_km`
(Euclidean for x/y km, chordal for latitude/longitude).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.kernels import LOG_CORRELATIONS


def _safe_norm(x: Tensor, dim: int = -1) -> Tensor:
    # sqrt has an infinite derivative at 0: clamp so that d = 0 (self pairs) has gradient 0.
    return (x * x).sum(dim).clamp_min(1e-30).sqrt()


class CovarianceBias(nn.Module):
    """Learnable per-head covariance c_h(d) and its log as an attention bias.

    Parameters per head: the log of the range (km), the nugget tau (sigmoid), and optionally a
    geometric anisotropy: the offset, in the local (east, north) frame, is rotated by ``angle``
    and its minor-axis component divided by ``ratio = exp(log_ratio)`` before taking the norm.
    Range and ratio are learned in log space, so a step of the optimiser changes them by a
    factor, the same at 2 km as at 200 km: the initial range is a start, not the answer.

    ``kernel_heads``: only the first this many heads carry the bias (model.kernel_heads); the
    others get none at all (bias 0, nugget included: plain <q, k> heads), and their parameters
    no gradient. None: every head.
    """

    def __init__(
        self,
        family: str,
        heads: int,
        init_range_km: float = 10.0,
        init_nugget: float = 0.1,
        anisotropy: bool = False,
        learnable: bool = True,
        kernel_heads: int | None = None,
    ) -> None:
        super().__init__()
        if family != "none" and family not in LOG_CORRELATIONS:
            raise ValueError(f"unknown covariance family {family!r}")
        self.family, self.heads, self.anisotropy = family, heads, anisotropy
        self.kernel_heads = heads if kernel_heads is None else kernel_heads
        if not 1 <= self.kernel_heads <= heads:
            raise ValueError(f"kernel_heads={kernel_heads} must be between 1 and heads={heads}")
        # which heads carry the bias; from the config, so not in the state dict
        self.register_buffer("gate", torch.arange(heads) < self.kernel_heads, persistent=False)
        self.log_range = nn.Parameter(
            torch.full((heads,), math.log(init_range_km)), requires_grad=learnable
        )
        self.raw_nugget = nn.Parameter(
            torch.full((heads,), math.log(init_nugget / (1 - init_nugget))),
            requires_grad=learnable,
        )
        if anisotropy:
            # spread initial angles so heads can specialise; ratio starts isotropic
            self.angle = nn.Parameter(torch.arange(heads) * (math.pi / max(heads, 1)))
            self.log_ratio = nn.Parameter(torch.zeros(heads))
        self.register_buffer("frame", torch.eye(3))  # in the state dict: part of the model

    @property
    def range_km(self) -> Tensor:
        return torch.exp(self.log_range)

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
        log_off = torch.where(self.gate.view(shape), log_off, torch.zeros_like(log_off))
        return torch.where(is_self, torch.zeros_like(log_off), log_off)

    def forward(self, offset: Tensor, is_self: Tensor) -> Tensor | None:
        return self.log_bias(offset, is_self)

    def describe(self) -> dict[str, list[float]]:
        """Learned parameters per head that carries the bias, as plain floats (for metrics and
        logging)."""
        kh = self.kernel_heads
        out = {
            "range_km": self.range_km[:kh].detach().cpu().tolist(),
            "nugget": self.nugget[:kh].detach().cpu().tolist(),
        }
        if self.anisotropy:
            # canonical form: ratio <= 1 and the angle of the major axis in [0, 180)
            swapped = self.log_ratio[:kh] > 0
            angle = torch.rad2deg(self.angle[:kh]) + 90.0 * swapped
            out["angle_deg"] = torch.remainder(angle, 180.0).detach().cpu().tolist()
            out["axis_ratio"] = torch.exp(-self.log_ratio[:kh].abs()).detach().cpu().tolist()
        return out
