"""The ``block`` backend of geostatistical attention: block-sparse FlexAttention
(docs/design.md, section 1).

Sensors arrive in space-filling-curve order (the store sorts them; Hilbert keeps runs compact).
They are cut into blocks of ``block_size`` consecutive sensors; each query block attends to
the ``key_blocks`` key blocks whose centroids are nearest to its own (its own block first).
The covariance bias is computed inside FlexAttention's ``score_mod`` from the sensors'
coordinates, so no [N, N] tensor exists: memory is O(N) for the attention plus the block index,
which ``BlockMask.from_kv_blocks`` wants padded to [blocks, blocks] (O((N / block_size)^2):
268 MB of int32 at N = 1M, docs/benchmarks.md). The math is that of ``dense_attention``
restricted to the selected blocks:

    score_ij = <q_i, k_j> / sqrt(d_head) + log c_h(d_ij),   j in the key blocks of i's block,
    keys of unobserved sensors masked, every sensor always attending to itself.

The self pair is taken out of the FlexAttention call (``mask_mod`` drops j = i) and merged
back afterwards from the call's log-sum-exp (:func:`merge_self`): softmax is unchanged by a
constant per row, so shifting row i by -log(1 - nugget_h) leaves the kernel on every other
pair as log rho(d_ij / range_h) alone and puts the nugget on the self score,
<q_i, k_i> / sqrt(d_head) - log(1 - nugget_h), an O(N) term outside the kernel. The
per-pair work of ``score_mod`` is then the distance and the family's log rho: no
nugget load, no self test, and no per-pair gradient for the nugget (it flows through the
merge, in plain tensor ops). Families that are functions of h^2 alone (Gaussian, rational
quadratic: ``Family.log_correlation_sq``) read the squared scaled distance, without a square
root per pair.

Learnable per-head parameters (1 / range, the anisotropic projection) enter
``score_mod`` expanded per query row ([head, node], read at ``[h, q_idx]``): read as per-head
scalars, their gradients pile up as atomics on a handful of addresses (15 s instead of 0.3 s
at N = 1M, measured on an H200); per row they stay exact and fast.

CUDA: compiled FlexAttention, forward and backward. CPU: eager FlexAttention, forward only
(its reference implementation materialises [batch, head, N, N] scores and ignores block
sparsity, so the block selection enters the mask there); for tests and small inference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from pipeline.errors import UserError
from pipeline.kernels import FAMILIES
from pipeline.model.covariance import CovarianceBias

CUDA_PAD_BLOCKS = 32  # on CUDA, pad N to a multiple of 32 blocks: fewer distinct compiled shapes
_CHUNK_PAIRS = 1 << 26  # block-centroid distances computed this many pairs at a time
# FlexAttention's Triton settings by head size, where its defaults measured badly (H100,
# torch 2.11, N = 1M, 8 key blocks of 128, bf16; docs/benchmarks.md): at 64 dimensions per
# head the default forward took 358 ms, these 20 ms (forward + backward 489 -> 83 ms). Head
# sizes not listed keep the defaults (32 per head: forward 19 ms, forward + backward 72 ms).
TUNED_KERNEL_OPTIONS = {64: {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}}


class BlockBackendError(UserError, RuntimeError):
    """The block backend cannot run as asked (e.g. training on a CPU)."""


@dataclass
class BlockPlan:
    """Block structure of one forward pass, shared by every layer.

    ``n`` sensors padded to ``padded``; ``key_index`` [blocks, key_blocks] selected key blocks
    of each query block; ``block_mask`` the FlexAttention mask (selection + observed keys, the
    self excluded: :func:`merge_self` adds it; on CPU the selection too, as eager FlexAttention
    ignores block sparsity);
    ``coords`` three [padded] tensors of the positions (km).
    """

    n: int
    padded: int
    block_size: int
    key_index: Tensor
    block_mask: BlockMask
    coords: tuple[Tensor, Tensor, Tensor]


def select_key_blocks(centroids: Tensor, key_blocks: int) -> Tensor:
    """The ``key_blocks`` blocks nearest to each block by centroid distance, itself first.

    centroids [blocks, 3] -> [blocks, key_blocks] (int64); computed in chunks of rows so that
    memory stays O(blocks * chunk), never [blocks, blocks] at once for large networks.
    """
    nb = centroids.shape[0]
    kb = min(key_blocks, nb)
    rows = max(1, _CHUNK_PAIRS // nb)
    out = []
    for r0 in range(0, nb, rows):
        r = torch.arange(r0, min(r0 + rows, nb), device=centroids.device)
        d = torch.cdist(centroids[r], centroids)  # [rows, blocks]
        d[torch.arange(len(r), device=d.device), r] = -1.0  # own block always first
        out.append(d.topk(kb, dim=1, largest=False).indices)
    return torch.cat(out)


def block_plan(pos: Tensor, observed: Tensor, block_size: int, key_blocks: int) -> BlockPlan:
    """The plan for sensors at ``pos`` [N, 3] km (curve order) with ``observed`` [B, N]."""
    n, device = pos.shape[0], pos.device
    granule = block_size * (CUDA_PAD_BLOCKS if device.type == "cuda" else 1)
    padded = -(-n // granule) * granule
    # pad with copies of the last position: padded keys are masked, and block centroids stay
    # where the sensors are
    pos_p = torch.cat([pos, pos[-1:].expand(padded - n, 3)])  # [P, 3]
    obs_p = torch.zeros(observed.shape[0], padded, dtype=torch.bool, device=device)
    obs_p[:, :n] = observed
    nb = padded // block_size
    centroids = pos_p.view(nb, block_size, 3).mean(dim=1)  # [blocks, 3]
    key_index = select_key_blocks(centroids.float(), key_blocks)  # [blocks, K]
    kb = key_index.shape[1]
    # from_kv_blocks wants [B, H, q_blocks, kv_blocks] indices (unused tail padded)
    kv_idx = torch.zeros(1, 1, nb, nb, dtype=torch.int32, device=device)
    kv_idx[0, 0, :, :kb] = key_index.to(torch.int32)
    kv_num = torch.full((1, 1, nb), kb, dtype=torch.int32, device=device)
    if device.type == "cuda":

        def mask_mod(b, h, q_idx, kv_idx):
            return obs_p[b, kv_idx] & (q_idx != kv_idx)

    else:
        selected = torch.zeros(nb, nb, dtype=torch.bool, device=device)
        selected[torch.arange(nb, device=device)[:, None], key_index] = True

        def mask_mod(b, h, q_idx, kv_idx):
            chosen = selected[q_idx // block_size, kv_idx // block_size]
            return chosen & obs_p[b, kv_idx] & (q_idx != kv_idx)

    mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(padded, padded)
    )
    coords = tuple(pos_p[:, c].contiguous() for c in range(3))  # 1-D: see docs/design.md, section 6
    return BlockPlan(n, padded, block_size, key_index, mask, coords)


def _score_mod(kernel: CovarianceBias, plan: BlockPlan, use_qk: bool, dtype: torch.dtype):
    """FlexAttention ``score_mod`` adding log rho_h(d_ij) to every pair but the self (which
    the mask excludes; the nugget enters with it in :func:`merge_self`), or None for the
    family ``none``."""
    heads, padded = kernel.heads, plan.padded
    if kernel.family == "none":
        return None if use_qk else (lambda score, b, h, q_idx, kv_idx: torch.zeros_like(score))
    px, py, pz = (c.to(dtype) for c in plan.coords)
    family = FAMILIES[kernel.family]
    # a family of h^2 alone (Gaussian, rational quadratic) reads the squared scaled distance:
    # no square root (nor its clamp) per pair, forward and backward
    of_sq = family.log_correlation_sq

    def per_row(values: Tensor) -> Tensor:  # [H] -> [H, P], read at [h, q_idx]
        # materialised: an expand() view has stride 0 along the rows, and the backward then
        # accumulates every row's gradient on H addresses; its own buffer also keeps
        # Inductor's lowering happy (strided views of one tensor fail there)
        return values[:, None].expand(heads, padded).contiguous()

    # a head without the bias (model.kernel_heads): every scaled distance 0, where every
    # family's log rho is 0; no per-pair work added
    gate = kernel.gate.to(dtype)
    proj = kernel.scaled_projection(dtype)  # [H, 3, 3] or None (isotropic)
    if proj is None:  # per row: 1 / range, or its square for a family of h^2
        inv_range = gate / kernel.range_km.to(dtype)
        inv_range = per_row(inv_range * inv_range if of_sq else inv_range)
    else:
        proj = proj * gate[:, None, None]
        m = [per_row(proj[:, r, c]) for r in range(3) for c in range(3)]

    def score_mod(score, b, h, q_idx, kv_idx):
        dx = px[q_idx] - px[kv_idx]
        dy = py[q_idx] - py[kv_idx]
        dz = pz[q_idx] - pz[kv_idx]
        if proj is None:
            sq = dx * dx + dy * dy + dz * dz
        else:
            u = m[0][h, q_idx] * dx + m[1][h, q_idx] * dy + m[2][h, q_idx] * dz
            v = m[3][h, q_idx] * dx + m[4][h, q_idx] * dy + m[5][h, q_idx] * dz
            w = m[6][h, q_idx] * dx + m[7][h, q_idx] * dy + m[8][h, q_idx] * dz
            sq = u * u + v * v + w * w  # already scaled
        if of_sq is not None:  # h^2 = d^2 / range^2
            bias = of_sq(sq * inv_range[h, q_idx] if proj is None else sq)
        else:
            scaled = torch.sqrt(torch.clamp(sq, min=1e-30))
            bias = family.log_correlation(scaled * inv_range[h, q_idx] if proj is None else scaled)
        return score + bias if use_qk else bias

    return score_mod


def self_logit(
    q: Tensor, k: Tensor, kernel: CovarianceBias, use_qk: bool, dtype: torch.dtype
) -> Tensor:
    """The self pair's score in the shifted row of the module docstring, [B, H, N] in
    ``dtype``: <q_i, k_i> / sqrt(d_head) - log(1 - nugget_h) (heads with the bias only)."""
    b, h, n, dh = q.shape
    if use_qk:
        logit = (q.to(dtype) * k.to(dtype)).sum(-1) / math.sqrt(dh)  # [B, H, N]
    else:
        logit = q.new_zeros(b, h, n, dtype=dtype)
    if kernel.family == "none":
        return logit
    shift = torch.log1p(-kernel.nugget.to(dtype)) * kernel.gate.to(dtype)  # [H]
    return logit - shift[:, None]


def merge_self(rest: Tensor, rest_lse: Tensor, logit: Tensor, v: Tensor) -> Tensor:
    """Attention over every key but the self (``rest`` [B, H, N, dh], its log-sum-exp
    ``rest_lse`` [B, H, N], -inf where no other key is visible) joined with the self pair of
    score ``logit`` [B, H, N] and value ``v`` [B, H, N, dh]: the softmax over both, exactly,
    differentiable in all four. The self's share of the row is sigmoid(logit - rest_lse)
    (1 where no other key is visible)."""
    share = torch.sigmoid(logit - rest_lse)[..., None]  # [B, H, N, 1]
    rest = rest.to(share.dtype)
    return (rest + share * (v.to(share.dtype) - rest)).to(v.dtype)


_compiled_flex = None


def _flex():
    """FlexAttention compiled once per process (CUDA)."""
    global _compiled_flex
    if _compiled_flex is None:
        dynamo = torch._dynamo.config
        # tiles of different sizes compile their own kernels; never fall back to the eager
        # implementation (it materialises [N, N] scores)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    neighbours: BlockPlan | None,
    use_qk: bool,
    kernel_options: dict | None = None,
) -> Tensor:
    """q, k, v [B, H, N, dh]; ``neighbours`` the :class:`BlockPlan` of ``pos`` -> [B, H, N, dh].
    ``kernel_options``: FlexAttention's Triton settings on CUDA (block sizes, warps, stages);
    None: ``TUNED_KERNEL_OPTIONS`` for this head size, else FlexAttention's defaults."""
    plan = neighbours
    if not isinstance(plan, BlockPlan):
        raise ValueError("the block backend needs a BlockPlan (pipeline.model.block_attention)")
    if (
        q.device.type != "cuda"
        and torch.is_grad_enabled()
        and (q.requires_grad or any(p.requires_grad for p in kernel.parameters()))
    ):
        raise BlockBackendError(
            "model.backend=block trains on CUDA GPUs only (FlexAttention has no backward on "
            "CPU); use model.backend=knn on CPUs (the same math over each sensor's k nearest)"
        )
    if q.device.type == "cuda" and plan.block_size % 128:
        raise BlockBackendError(
            f"model.block_size={plan.block_size}: on CUDA the block backend needs a multiple "
            "of 128 (FlexAttention's kernels for smaller blocks did not compile with torch "
            "2.11 on an H100: NoValidChoicesError); use model.block_size=128"
        )
    b, h, n, dh = q.shape
    if q.device.type == "cuda" and dh < 16:
        raise BlockBackendError(
            f"the block backend on CUDA needs at least 16 dimensions per head (FlexAttention); "
            f"got {dh}: raise model.d_model or lower model.heads"
        )
    pad = plan.padded - n

    def padded(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t  # [B, H, P, dh]

    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    score_mod = _score_mod(kernel, plan, use_qk, dtype)
    args = (padded(q), padded(k), padded(v))
    kwargs = dict(score_mod=score_mod, block_mask=plan.block_mask, return_aux=AuxRequest(lse=True))
    if q.device.type == "cuda":
        if kernel_options is None:
            kernel_options = TUNED_KERNEL_OPTIONS.get(dh)
        rest, aux = _flex()(*args, **kwargs, kernel_options=kernel_options)
    else:  # eager on purpose (see the module docstring): silence its advice to compile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rest, aux = flex_attention(*args, **kwargs)
    # [B, H, N, dh] and [B, H, N]: the padded rows dropped before the self is merged
    return merge_self(rest[:, :, :n], aux.lse[:, :, :n], self_logit(q, k, kernel, use_qk, dtype), v)
