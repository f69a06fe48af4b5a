"""Geostatistical multi-head attention across sensors (docs/design.md, section 1).

    score_ij = <q_i, k_j> / sqrt(d_head) + log c_h(d_ij)

One module, several backends that compute the same math:

- ``dense``: all N x N pairs (the reference; O(N^2) memory);
- ``knn``: each sensor attends to its k nearest sensors, gathering keys and values
  ([batch, head, node, k, d_head]); exact bias on each pair; O(N k) memory;
- ``block``: block-sparse FlexAttention over blocks of curve-ordered sensors, the bias computed
  in ``score_mod`` (pipeline/block_attention.py); CUDA for training, CPU forward for tests.

Keys of sensors with no observation in the input window are masked; every query always
attends to itself, so no row is empty and a sensor whose neighbours are all missing still
gets an output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.model.block_attention import block_attention
from pipeline.model.covariance import CovarianceBias


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    neighbours: Tensor | None,
    use_qk: bool,
) -> Tensor:
    """q, k, v [B, H, N, dh]; pos [N, 3]; observed [B, N] -> [B, H, N, dh]."""
    return _all_pairs(q, k, v, pos, observed, kernel, use_qk)


def _all_pairs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    use_qk: bool,
    allowed: Tensor | None = None,
) -> Tensor:
    """Attention over all N x N pairs, or those of ``allowed`` [N, N] (j may be attended by
    i; the self only where allowed)."""
    n = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    if not use_qk:
        scores = torch.zeros_like(scores)
    is_self = torch.eye(n, dtype=torch.bool, device=q.device)  # [N, N]
    if allowed is not None:
        is_self = is_self & allowed
    bias = kernel.log_bias(pos[:, None, :] - pos[None, :, :], is_self)  # [H, N, N]
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    visible = observed[:, None, None, :]  # [B, 1, 1, N]
    keep = (visible if allowed is None else visible & allowed) | is_self  # [B, 1, N, N]
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return weights @ v


def knn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    neighbours: Tensor | None,
    use_qk: bool,
) -> Tensor:
    """Like :func:`dense_attention` over each query's neighbours [N, k] only; entries -1
    (outside a spatial tile) are masked. Small problems (at most :data:`MASKED_SCORES`
    scores) run as all pairs under a neighbour mask, the same math without the gathers,
    whose backward (a scatter-add per key) dominates a CPU step at a few hundred sensors."""
    if neighbours is None:
        raise ValueError("the knn backend needs a neighbour index [node, k]")
    b, h, n, _ = q.shape
    if b * h * n * n <= MASKED_SCORES:
        return masked_knn_attention(q, k, v, pos, observed, kernel, neighbours, use_qk)
    return gathered_knn_attention(q, k, v, pos, observed, kernel, neighbours, use_qk)


# all-pairs scores [B, H, N, N] up to this many (64 MB in float32) replace the gathers
MASKED_SCORES = 2**24


def masked_knn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    neighbours: Tensor,
    use_qk: bool,
) -> Tensor:
    """:func:`knn_attention` as dense attention under the neighbour mask [N, N] (distinct
    neighbours per row, as the KD-tree gives them; -1 entries masked)."""
    n = q.shape[2]
    index = torch.where(neighbours >= 0, neighbours, n)  # -1 -> a spare column n
    allowed = torch.zeros(n, n + 1, dtype=torch.bool, device=q.device)
    allowed = allowed.scatter_(1, index, True)[:, :n]  # [N, N] j among i's neighbours
    return _all_pairs(q, k, v, pos, observed, kernel, use_qk, allowed)


def gathered_knn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    observed: Tensor,
    kernel: CovarianceBias,
    neighbours: Tensor,
    use_qk: bool,
) -> Tensor:
    """:func:`knn_attention` on gathered keys and values [B, H, N, k, dh]: O(N k) memory."""
    valid = neighbours >= 0  # [N, k]
    neighbours = neighbours.clamp_min(0)
    b, h, n, dh = q.shape
    kn = neighbours.shape[1]
    flat = neighbours.reshape(-1)
    # gather whole sensor rows ([B, N, H * dh], contiguous): faster than per-head gathers
    kk = k.transpose(1, 2).reshape(b, n, h * dh).index_select(1, flat)  # [B, N * k, H * dh]
    vv = v.transpose(1, 2).reshape(b, n, h * dh).index_select(1, flat)
    kk = kk.view(b, n, kn, h, dh).permute(0, 3, 1, 2, 4)  # [B, H, N, k, dh]
    vv = vv.view(b, n, kn, h, dh).permute(0, 3, 1, 2, 4)
    if use_qk:
        scores = (q.unsqueeze(-2) * kk).sum(-1) / math.sqrt(dh)  # [B, H, N, k]
    else:
        scores = q.new_zeros(b, h, n, kn)
    is_self = (neighbours == torch.arange(n, device=q.device)[:, None]) & valid  # [N, k]
    bias = kernel.log_bias(pos[:, None, :] - pos[neighbours], is_self)  # [H, N, k]
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    keep = ((observed[:, neighbours] & valid) | is_self)[:, None]  # [B, 1, N, k]
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return (weights.unsqueeze(-1) * vv).sum(-2)  # [B, H, N, dh]


Backend = Callable[..., Tensor]
BACKENDS: dict[str, Backend] = {
    "dense": dense_attention,
    "knn": knn_attention,
    "block": block_attention,
}


class GeoAttention(nn.Module):
    """Multi-head self-attention across sensors with a learnable covariance bias per head."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        kernel: CovarianceBias,
        backend: str = "knn",
        qk_residual: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; one of {sorted(BACKENDS)}")
        self.heads, self.backend, self.qk_residual = heads, backend, qk_residual
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.kernel = kernel
        self.dropout = nn.Dropout(dropout)
        self.qk_enabled = True  # switched off by the trainer during a kernel warm-up

    def forward(
        self, x: Tensor, pos: Tensor, observed: Tensor, neighbours: Tensor | None = None
    ) -> Tensor:
        """x [B, N, D]; pos [N, 3] km; observed [B, N] bool; neighbours: [N, k] index (knn) or
        BlockPlan (block) -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # [B, N, 3, H, dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, dh]
        use_qk = self.qk_residual and self.qk_enabled
        out = BACKENDS[self.backend](q, k, v, pos, observed, self.kernel, neighbours, use_qk)
        out = out.transpose(1, 2).reshape(b, n, d)  # [B, N, H * dh]
        return self.dropout(self.out(out))
