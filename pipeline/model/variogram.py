"""The field's variogram, learned beside the forecast: one range per run that means the field's
range (``kernel_estimate`` in metrics.json; docs/variography.md).

The attention heads' ranges are whatever forecasts best, and docs/variography.md shows that this
is not the field's range: attention weights proportional to the covariance are the kriging
weights only when noise dominates, and where the forecast optimum is flat in the range the heads
drift. So the model carries one more covariance of its family (a one-head
:class:`~pipeline.model.covariance.CovarianceBias`: range, nugget and, with
``model.anisotropy``, angle and axis ratio), fitted during training to the empirical
semivariogram of the training windows: a weighted least-squares variogram fit (Cressie 1985
weights, count / gamma^2) in which the nugget and the partial sill, which enter linearly, are
solved in closed form for the current range, and the range (and anisotropy) move by gradient
descent with the other kernel parameters. Its statistics accumulate over the batches of the run
(the last input step of every window, pairs of each sensor with its neighbours and with partners
a geometric series of shifts away in the batch's sensor order, binned by distance and, when
anisotropic, by axial direction). The term's gradient reaches these parameters only (and is
scaled to stay out of the clipped gradient norm), so the forecast at observed sensors is
unchanged by it; at sensors without an input window the estimate's kriging variance widens the
forecast (:meth:`FieldVariogram.kriging_variance`, ``model.kriging_variance``), and with
``model.kriged_inputs`` its simple-kriging estimate fills the unobserved input values
(:meth:`FieldVariogram.krige`); with ``model.kriged_smoothing`` it also estimates the field
without its nugget at every input value.

The statistics are not part of the state: a resumed run accumulates them afresh (the fitted
parameters are restored). Bins are set on the first batch: equal-count distance classes up to
half the largest pair distance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.kernels import LOG_CORRELATIONS
from pipeline.model.covariance import CovarianceBias

BINS = 24  # distance classes
SECTORS = 8  # axial direction classes (22.5 degrees each) of an anisotropic fit: wider
# sectors mix shorter directions into the major axis's classes (4 gave the axis ratio 0.35
# for 0.3 in tests/test_field_variogram.py, 8 gives 0.32)
SHIFTS = 48  # partners per sensor beyond its neighbours: a geometric series of index shifts
MIN_COUNT = 30  # pair samples a bin needs before it enters the fit
KRIGE_NEIGHBOURS = 16  # nearest observed neighbours of a kriged input (model.kriged_inputs)
KRIGE_CHUNK = 2**16  # kriged cells per batched solve (memory: chunk * k^2 floats)
SCALE = 1e-3
"""Factor of the misfit in the training loss: Adam's steps do not depend on it, and it keeps
the term's gradient out of the global gradient norm that ``train.grad_clip`` clips (the
forecast's gradients are not rescaled because of it)."""


def pairs(n: int, neighbours: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Sensor pairs (left, right) [P] of a batch of n sensors: each with its neighbours
    (``neighbours`` [n, k], -1 outside a tile) and with the sensors ``s`` places on in the
    batch's order for a geometric series of shifts ``s`` (every shift when n is small)."""
    if n - 1 <= SHIFTS:
        shifts = torch.arange(1, max(n, 1), device=device)
    else:
        shifts = torch.unique(torch.logspace(0, math.log10(n // 2), SHIFTS, device=device).round())
        shifts = shifts.long()
    node = torch.arange(n, device=device)
    left = node[:, None].expand(n, len(shifts)).reshape(-1)
    right = ((node[:, None] + shifts[None]) % n).reshape(-1)  # [n * S]
    if neighbours is not None:
        k = neighbours.shape[1]
        near = neighbours.to(device).long().reshape(-1)  # [n * k]
        owner = node[:, None].expand(n, k).reshape(-1)
        keep = (near >= 0) & (near != owner)
        left, right = torch.cat([left, owner[keep]]), torch.cat([right, near[keep]])
    return left, right


class FieldVariogram(nn.Module):
    """A covariance of the model's family fitted to the training windows' semivariogram."""

    def __init__(
        self, family: str, init_range_km: float, init_nugget: float, anisotropy: bool
    ) -> None:
        super().__init__()
        self.kernel = CovarianceBias(family, 1, init_range_km, init_nugget, anisotropy)
        self.kernel.raw_nugget.requires_grad_(False)  # solved in closed form (``loss``)
        self.register_buffer("nugget", torch.tensor(float(init_nugget)))  # nugget / sill
        self.register_buffer("sill", torch.tensor(1.0))  # nugget + partial sill (normalised)
        self.sectors = SECTORS if anisotropy else 1
        self.edges: Tensor | None = None  # [BINS + 1] km, set on the first batch
        self.stats: Tensor | None = None  # [sectors * BINS, 6]: sum 0.5 dz^2, count, sum d, offset

    def _canonical(self, offset: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets [P, 3] turned into the half-plane of axial directions [0, 180) degrees of
        the local (east, north) frame, and their direction class [P]."""
        if self.sectors == 1:
            return offset, torch.zeros(len(offset), dtype=torch.long, device=offset.device)
        local = offset @ self.kernel.frame.to(offset.dtype).T  # [P, 3] (east, north, up)
        angle = torch.atan2(local[:, 1], local[:, 0])  # (-pi, pi]
        flip = (angle < 0) | (angle >= math.pi)
        offset = torch.where(flip[:, None], -offset, offset)
        angle = torch.remainder(angle, math.pi)
        sector = (angle / (math.pi / self.sectors)).long().clamp(max=self.sectors - 1)
        return offset, sector

    @torch.no_grad()
    def observe(self, x: Tensor, mask: Tensor, pos: Tensor, neighbours: Tensor | None) -> None:
        """Adds a batch: x, mask [B, T, N, F] (normalised targets), pos [N, 3] km."""
        left, right = pairs(x.shape[2], neighbours, x.device)
        offset = (pos[right] - pos[left]).double()  # [P, 3]
        d = offset.norm(dim=-1)
        if self.edges is None:
            far = d.max() / 2
            near = d[(d > 0) & (d <= far)]
            if near.numel() < BINS:
                return  # too few pairs to set the classes: wait for a larger batch
            q = torch.linspace(0, 1, BINS + 1, dtype=near.dtype, device=near.device)
            self.edges = torch.quantile(near, q)
            self.edges[0] = 0.0
            self.stats = torch.zeros(self.sectors * BINS, 6, dtype=torch.float64, device=x.device)
        edges = self.edges.to(x.device)
        inside = (d > 0) & (d <= edges[-1])
        left, right, offset, d = left[inside], right[inside], offset[inside], d[inside]
        offset, sector = self._canonical(offset)
        key = sector * BINS + torch.bucketize(d, edges[1:-1])  # [P]
        n = x.shape[2]
        z = x[:, -1].float().permute(1, 0, 2).reshape(n, -1)  # [N, B * F]: the last input step
        seen = mask[:, -1].permute(1, 0, 2).reshape(n, -1)  # [N, B * F]
        both = seen.index_select(0, right) & seen.index_select(0, left)  # [P, B * F]
        dz = z.index_select(0, right) - z.index_select(0, left)
        dz = torch.where(both, dz, torch.zeros_like(dz))
        half_sq = 0.5 * (dz * dz).sum(dim=1).double()  # [P]
        count = both.sum(dim=1).double()  # [P]
        rows = torch.cat(
            [half_sq[:, None], count[:, None], (d * count)[:, None], offset * count[:, None]], 1
        )  # [P, 6]
        self.stats = self.stats.to(x.device).index_add_(0, key, rows)

    def loss(self) -> Tensor | None:
        """The weighted least-squares misfit of the fitted variogram (relative, in [0, 1], times
        ``SCALE``); None before three classes have enough pairs. Nugget and partial sill enter
        linearly, gamma(d) = nugget + partial * (1 - rho(d / range)): they are solved in closed
        form for the current range (and anisotropy); ``nugget`` and ``sill`` keep them."""
        if self.stats is None:
            return None
        use = self.stats[:, 1] >= MIN_COUNT
        if int(use.sum()) < 3:
            return None
        stats = self.stats[use]
        n = stats[:, 1]
        gamma = (stats[:, 0] / n).float()  # [K] empirical semivariance
        dist = stats[:, 2] / n  # [K] mean distance of the class
        offset = stats[:, 3:] / n[:, None]  # [K, 3] mean (canonical) offset
        if self.sectors == 1:
            offset = torch.zeros_like(offset)
            offset[:, 0] = dist  # isotropic: only the distance matters
        else:  # the class's mean direction at its mean distance
            offset = offset / offset.norm(dim=-1, keepdim=True).clamp_min(1e-12) * dist[:, None]
        k = self.kernel
        h = k.distance(offset.float())[0] / k.range_km[0].float()  # [K]
        rise = 1 - LOG_CORRELATIONS[k.family](h).exp()  # [K] 1 - rho
        weight = (n / gamma.double().clamp_min(1e-12) ** 2).float()  # Cressie (1985)
        weight = weight / weight.sum()
        nugget, partial = _linear_fit(weight, rise, gamma)
        with torch.no_grad():
            fraction = nugget / (nugget + partial).clamp_min(1e-12)
            self.nugget.copy_(fraction.to(self.nugget.dtype))
            self.sill.copy_((nugget + partial).to(self.sill.dtype))
        misfit = (weight * (gamma - nugget - partial * rise) ** 2).sum()
        return SCALE * misfit / (weight * gamma * gamma).sum().clamp_min(1e-12)

    @torch.no_grad()
    def kriging_variance(self, observed: Tensor, pos: Tensor, neighbours: Tensor) -> Tensor:
        """The simple-kriging variance [B, N] (normalised units; 0 at observed sensors) of each
        sensor without an input window (``observed`` [B, N] False) from its observed
        neighbours (``neighbours`` [N, k], -1 outside a tile), under the estimated covariance:
        sill * (1 - k' K^-1 k) with K_jl = (1 - tau) rho(d_jl) + tau [j == l] and
        k_j = (1 - tau) rho(d_ij). It is the sill where no neighbour is observed."""
        out = torch.zeros(observed.shape, dtype=torch.float32, device=observed.device)
        b_idx, i_idx = (~observed).nonzero(as_tuple=True)  # [U] each
        if len(i_idx) == 0:
            return out
        near = neighbours.to(observed.device).long()[i_idx]  # [U, k]
        safe = near.clamp_min(0)
        valid = (near >= 0) & (near != i_idx[:, None]) & observed[b_idx[:, None], safe]
        weights, to_query = self._weights(pos, i_idx, safe, valid)  # [U, k] each
        kriged = (1 - (weights * to_query).sum(-1)).clamp(0, 1)  # [U]
        out[b_idx, i_idx] = kriged * self.sill.float().clamp_min(0)
        return out

    @torch.no_grad()
    def krige(
        self, x: Tensor, mask: Tensor, pos: Tensor, neighbours: Tensor, smooth: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Every unobserved value of the window filled by simple kriging (model.kriged_inputs),
        or with ``smooth`` every value replaced by the simple-kriging estimate of the field
        without its nugget (model.kriged_smoothing).

        x, mask [B, T, N, F] (normalised targets; zero mean per sensor, so simple kriging),
        pos [N, 3] km, neighbours [N, k] (itself first, -1 outside a tile). A cell (b, t, n, f)
        with ``mask`` False gets sum_j w_j x[b, t, j, f] over the ``KRIGE_NEIGHBOURS`` nearest
        of n's neighbours observed at that step and feature (so deep inside an outage the
        nearest observed ones further out), w = K^-1 k under the estimated
        covariance (as :meth:`kriging_variance`). With ``smooth`` every cell is estimated so,
        its own observation (where it has one) first among the data: k_j = (1 - tau) rho(d_nj)
        is the covariance of the noise-free field at n with the observation at j, so at n itself
        1 - tau against the observation's variance 1, and the weights shrink the nugget away.
        Returns the estimate and ``filled`` [B, T, N, F] (True where a value was kriged: some
        datum observed); cells without one stay 0. Without ``smooth`` observed cells are
        returned unchanged."""
        n = x.shape[2]
        near = neighbours.to(x.device).long()  # [N, k], nearest first
        usable = near >= 0
        if not smooth:  # not itself
            usable &= near != torch.arange(n, device=x.device)[:, None]
        safe = near.clamp_min(0)
        keep = min(KRIGE_NEIGHBOURS, near.shape[1])
        out, filled = x.clone(), torch.zeros_like(mask)
        cells = (torch.ones_like(mask) if smooth else ~mask).nonzero()  # [U, 4]: b, t, n, f
        for c0 in range(0, len(cells), KRIGE_CHUNK):
            b, t, i, f = cells[c0 : c0 + KRIGE_CHUNK].unbind(1)  # [u] each
            seen = usable[i] & mask[b[:, None], t[:, None], safe[i], f[:, None]]  # [u, k]
            # one solve per distinct (sensor, observed neighbours): whole windows missing
            # repeat one pattern over every step
            inverse = _group(i, seen)  # [u] group of each cell
            one = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=x.device)
            one = one.scatter_(0, inverse, torch.arange(len(i), device=x.device))  # a member
            di, dseen = i[one], seen[one]
            # the nearest ``keep`` observed neighbours, in distance order
            first = torch.argsort((~dseen).to(torch.int8), dim=1, stable=True)[:, :keep]
            dnb, dvalid = safe[di].gather(1, first), dseen.gather(1, first)  # [distinct, keep]
            dweights, _ = self._weights(pos, di, dnb, dvalid)
            nb, valid, weights = dnb[inverse], dvalid[inverse], dweights[inverse]  # [u, keep]
            values = x[b[:, None], t[:, None], nb, f[:, None]].float()  # [u, keep]
            some = valid.any(-1)
            kriged = torch.where(some, (weights * values * valid).sum(-1), 0.0)
            out[b, t, i, f] = kriged.to(out.dtype)
            filled[b, t, i, f] = some
        return out, filled

    def _weights(
        self, pos: Tensor, query: Tensor, near: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Simple-kriging weights K^-1 k [U, k] of the sensors ``near`` [U, k] for the sensors
        ``query`` [U] from the neighbours marked ``valid`` [U, k] (the others get 0), and k."""
        p = pos.float()[near]  # [U, k, 3]
        to_query = self._covariance(p - pos.float()[query][:, None]) * valid  # [U, k]
        between = self._covariance(p[:, :, None] - p[:, None, :])  # [U, k, k]
        both = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(near.shape[1], dtype=torch.bool, device=near.device)
        between = torch.where(eye, torch.ones_like(between), between * both)
        chol = torch.linalg.cholesky(between + 1e-6 * eye)
        return torch.cholesky_solve(to_query[..., None], chol)[..., 0], to_query

    def _covariance(self, offset: Tensor) -> Tensor:
        """(1 - tau) rho(d / range) of offsets [..., 3] km (tau, the nugget fraction)."""
        k = self.kernel
        h = k.distance(offset)[0] / k.range_km[0].float()
        return (1 - self.nugget.float()) * LOG_CORRELATIONS[k.family](h).exp()

    def describe(self) -> dict[str, float]:
        """The estimate: ``range_km``, ``nugget`` (fraction of the sill) and, anisotropic,
        ``angle_deg`` and ``axis_ratio`` (of the major axis)."""
        out = {key: values[0] for key, values in self.kernel.describe().items()}
        return {**out, "nugget": float(self.nugget)}


def _group(sensor: Tensor, seen: Tensor) -> Tensor:
    """Group ids [u] of the rows of (``sensor`` [u], ``seen`` [u, k] bool) that are equal, by
    1-D uniques over 31-bit words of ``seen`` (much faster than a unique over rows)."""
    group = torch.unique(sensor, return_inverse=True)[1]
    bits = 1 << torch.arange(31, device=seen.device)
    for w0 in range(0, seen.shape[1], 31):
        word = (seen[:, w0 : w0 + 31].long() * bits[: min(31, seen.shape[1] - w0)]).sum(1)
        group = torch.unique((group << 31) | word, return_inverse=True)[1]
    return group


def _linear_fit(weight: Tensor, rise: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """The non-negative weighted least-squares (nugget, partial sill) of
    gamma ~ nugget + partial * rise."""
    sw, sr, sg = weight.sum(), (weight * rise).sum(), (weight * gamma).sum()
    srr, srg = (weight * rise * rise).sum(), (weight * rise * gamma).sum()
    det = (sw * srr - sr * sr).clamp_min(1e-12)
    nugget, partial = (srr * sg - sr * srg) / det, (sw * srg - sr * sg) / det
    zero = torch.zeros_like(nugget)
    no_nugget = nugget < 0  # then the partial sill alone
    nugget, partial = (
        torch.where(no_nugget, zero, nugget),
        torch.where(no_nugget, srg / srr.clamp_min(1e-12), partial),
    )
    flat = partial < 0  # no spatial structure: a flat variogram
    return torch.where(flat, sg / sw, nugget), torch.where(flat, zero, partial)
