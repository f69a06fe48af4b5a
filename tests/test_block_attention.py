"""The block (FlexAttention) backend against dense and knn: forward on CPU (eager
FlexAttention), forward and backward on CUDA (compiled; skipped without a GPU)."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import hilbert_index, hilbert_order, k_nearest
from pipeline.kernels import KERNELS
from pipeline.model import block_attention
from pipeline.model.attention import GeoAttention
from pipeline.model.block_attention import (
    BlockBackendError,
    block_plan,
    merge_self,
    select_key_blocks,
)
from pipeline.model.covariance import CovarianceBias
from pipeline.model.forecaster import Forecaster

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, H = 32, 4


def _setup(
    n,
    family="matern32",
    anisotropy=False,
    seed=0,
    device="cpu",
    dtype=torch.float64,
    head=None,
    kernel_heads=None,
):
    """Heads of ``head`` dimensions: by default D / H = 8 on CPU, 32 on CUDA (FlexAttention
    needs at least 16 there; 64 runs with the backend's tuned Triton settings)."""
    d = H * head if head else D if device == "cpu" else 4 * D
    torch.manual_seed(seed)
    coords = np.random.default_rng(seed).uniform(0, 40, (n, 2))
    pos, frame = positions_km(coords[hilbert_order(*positions_km(coords, "xy"))], "xy")
    kernel = CovarianceBias(family, H, 8.0, 0.2, anisotropy=anisotropy, kernel_heads=kernel_heads)
    if anisotropy:  # away from isotropy, where the angle's gradient is exactly zero
        with torch.no_grad():
            kernel.log_ratio.copy_(torch.linspace(0.4, 1.2, H))
    kernel.set_frame(torch.tensor(frame))
    attn = GeoAttention(d, H, kernel, "dense").to(device, dtype)
    x = torch.randn(2, n, d, device=device, dtype=dtype)
    observed = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    return attn, x, torch.tensor(pos, device=device, dtype=dtype), observed.to(device)


def _clusters(n_clusters, size, device="cpu", dtype=torch.float64):
    """Tight clusters of ``size`` sensors, 1,000 km apart: each sensor's ``size`` nearest
    sensors are its own cluster, which is also its own block (block_size = size)."""
    rng = np.random.default_rng(1)
    coords = np.repeat(np.arange(n_clusters) * 1000.0, size)[:, None] + rng.uniform(
        0, 5, (n_clusters * size, 2)
    )
    pos, _ = positions_km(coords, "xy")
    return torch.tensor(pos, device=device, dtype=dtype)


def _run(attn, backend, x, pos, observed, neighbours=None, grad=False):
    attn.backend = backend
    attn.zero_grad()
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = attn(x, pos, observed, neighbours)
    if not grad:
        return out, None, {}
    weights = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype)
    (out * weights.view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# CPU: forward pass (eager FlexAttention)


@pytest.mark.parametrize("family", KERNELS)  # every family, and none
@pytest.mark.parametrize("anisotropy", [False, True])
def test_all_blocks_equal_dense_on_cpu(family, anisotropy):
    n = 200  # not a multiple of the block size: the last block is padded
    attn, x, pos, observed = _setup(n, family, anisotropy)
    ref, _, _ = _run(attn, "dense", x, pos, observed)
    plan = block_plan(pos, observed, 32, key_blocks=10**6)
    assert plan.padded == 224 and plan.key_index.shape == (7, 7)
    got, _, _ = _run(attn, "block", x, pos, observed, plan)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("anisotropy", [False, True])
def test_kernel_heads_in_blocks_equal_dense_on_cpu(anisotropy):
    """model.kernel_heads: the heads without the bias get none in score_mod either."""
    attn, x, pos, observed = _setup(100, "matern52", anisotropy, kernel_heads=1)
    ref, _, _ = _run(attn, "dense", x, pos, observed)
    got, _, _ = _run(attn, "block", x, pos, observed, block_plan(pos, observed, 32, 10**6))
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)


def test_merge_self_is_the_softmax_over_both_with_its_gradients():
    """The self pair merged from the other keys' output and log-sum-exp (what the block
    backend does after FlexAttention) is the softmax over all keys, values and gradients,
    also for rows where no other key is visible (log-sum-exp -inf: the self alone)."""
    torch.manual_seed(3)
    b, h, n, dh = 2, 3, 9, 4
    scores = torch.randn(b, h, n, n, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, n, dh, dtype=torch.float64, requires_grad=True)
    visible = torch.rand(b, 1, n, n) > 0.4
    visible[:, :, 2] = False  # row 2: no key but the self
    eye = torch.eye(n, dtype=torch.bool)
    full = torch.softmax(scores.masked_fill(~(visible | eye), float("-inf")), -1) @ v
    others = scores.masked_fill(~(visible & ~eye), float("-inf"))  # [B, H, N, N]
    lse = torch.logsumexp(others, -1)  # [B, H, N]
    rest = torch.nan_to_num(torch.softmax(others, -1)) @ v  # rows without a key: 0
    got = merge_self(rest, lse, scores.diagonal(dim1=-2, dim2=-1), v)
    assert torch.isinf(lse[:, :, 2]).all() and torch.allclose(got[:, :, 2], v[:, :, 2])
    assert torch.allclose(got, full, atol=1e-12)
    w = torch.randn_like(full)
    ref = torch.autograd.grad((full * w).sum(), (scores, v))
    mine = torch.autograd.grad((got * w).sum(), (scores, v))
    for a, r in zip(mine, ref, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, r, atol=1e-12)


def test_block_row_with_no_visible_key_is_its_own_value():
    """A window where no sensor is observed: every row attends to itself only, in blocks as
    in dense (FlexAttention sees fully masked rows; the merge gives the self back)."""
    attn, x, pos, _ = _setup(64, "matern32")
    observed = torch.zeros(2, 64, dtype=torch.bool)
    ref, _, _ = _run(attn, "dense", x, pos, observed)
    got, _, _ = _run(attn, "block", x, pos, observed, block_plan(pos, observed, 32, 10**6))
    assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=1e-12)


def test_selected_blocks_equal_dense_restricted_to_them():
    n, bs = 256, 32
    attn, x, pos, observed = _setup(n, "matern52", anisotropy=True)
    plan = block_plan(pos, observed, bs, key_blocks=3)
    got, _, _ = _run(attn, "block", x, pos, observed, plan)
    # dense attention over the same pairs, written out directly
    blocks = torch.arange(n) // bs
    allowed = torch.zeros(n // bs, n // bs, dtype=torch.bool)
    allowed[torch.arange(n // bs)[:, None], plan.key_index] = True
    pair = allowed[blocks[:, None], blocks[None, :]]  # [N, N]
    assert pair.float().mean() == pytest.approx(3 / 8)
    q, k, v = attn.qkv(x).view(2, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
    eye = torch.eye(n, dtype=torch.bool)
    scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5
    scores = scores + attn.kernel.log_bias(pos[:, None] - pos[None], eye)
    keep = pair & (observed[:, None, None, :] | eye)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    ref = attn.out((weights @ v).transpose(1, 2).reshape(2, n, D))
    assert torch.allclose(got, ref, atol=1e-12)


def test_block_equals_knn_where_neighbourhoods_coincide_on_cpu():
    pos = _clusters(4, 32)
    attn, x, _, observed = _setup(128)
    neighbours = torch.from_numpy(k_nearest(pos.numpy(), 32)[0])
    ref, _, _ = _run(attn, "knn", x, pos, observed, neighbours)
    got, _, _ = _run(attn, "block", x, pos, observed, block_plan(pos, observed, 32, 1))
    assert torch.allclose(got, ref, atol=1e-12)


def test_block_training_on_cpu_is_a_clear_error():
    attn, x, pos, observed = _setup(64)
    with pytest.raises(BlockBackendError, match="model.backend=knn"):
        _run(attn, "block", x, pos, observed, block_plan(pos, observed, 32, 2), grad=True)


def test_forecaster_with_block_backend_equals_dense_on_cpu():
    n = 96
    cfg = load_config(None, ["model.d_model=32", "model.block_size=32", "model.key_blocks=3"])
    model = Forecaster(cfg.model, 6, 3, 1).double().eval()
    _, _, pos, _ = _setup(n)
    x = torch.randn(2, 6, n, 1, dtype=torch.float64)
    mask = torch.rand(2, 6, n, 1) > 0.2
    cal = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        model.cfg.backend = "block"
        for layer in model.layers:
            layer.attn.backend = "block"
        got = model(x, mask, cal, pos)
        model.cfg.backend = "dense"
        for layer in model.layers:
            layer.attn.backend = "dense"
        ref = model(x, mask, cal, pos)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_key_blocks_are_nearest_own_first_and_chunking_changes_nothing(monkeypatch):
    centroids = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) * 100
    full = select_key_blocks(centroids, 5)
    assert torch.equal(full[:, 0], torch.arange(300))
    d = torch.cdist(centroids, centroids)
    expect = d.topk(5, dim=1, largest=False).values
    got = d.gather(1, full)
    assert torch.allclose(got.sort(dim=1).values, expect)
    monkeypatch.setattr(block_attention, "_CHUNK_PAIRS", 1000)  # 3 rows per chunk
    assert torch.equal(select_key_blocks(centroids, 5), full)


def test_hilbert_curve_moves_one_cell_at_a_time():
    bits = 5
    side = 1 << bits
    x, y = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    d = hilbert_index(x.ravel(), y.ravel(), bits)
    assert sorted(d.tolist()) == list(range(side * side))
    order = np.argsort(d)
    steps = np.abs(np.diff(x.ravel()[order])) + np.abs(np.diff(y.ravel()[order]))
    assert np.all(steps == 1)


# --------------------------------------------------------------------------------------------
# CUDA: compiled FlexAttention, forward and backward


@cuda
@pytest.mark.parametrize(
    ("family", "anisotropy", "head", "kernel_heads"),
    [
        ("matern32", False, 32, None),
        ("spherical", True, 32, None),
        ("matern32", False, 64, None),
        ("matern32", True, 32, 2),
    ],
)
def test_all_blocks_equal_dense_on_gpu_outputs_and_gradients(
    family, anisotropy, head, kernel_heads
):
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 1000
    attn, x, pos, observed = _setup(
        n,
        family,
        anisotropy,
        device="cuda",
        dtype=torch.float32,
        head=head,
        kernel_heads=kernel_heads,
    )
    ref = _run(attn, "dense", x, pos, observed, grad=True)
    plan = block_plan(pos, observed, 128, key_blocks=10**6)
    got = _run(attn, "block", x, pos, observed, plan, grad=True)
    assert _rel(got[0], ref[0]) < 1e-5
    assert _rel(got[1], ref[1]) < 1e-4
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        assert _rel(got[2][name], ref[2][name]) < 1e-4, name


@cuda
def test_block_equals_knn_on_gpu_where_neighbourhoods_coincide():
    pos = _clusters(8, 128, device="cuda", dtype=torch.float32)
    attn, x, _, observed = _setup(1024, device="cuda", dtype=torch.float32)
    neighbours = torch.from_numpy(k_nearest(pos.cpu().numpy(), 128)[0]).cuda()
    ref = _run(attn, "knn", x, pos, observed, neighbours, grad=True)
    got = _run(attn, "block", x, pos, observed, block_plan(pos, observed, 128, 1), grad=True)
    assert _rel(got[0], ref[0]) < 1e-5
    assert _rel(got[1], ref[1]) < 1e-4
    for name in ref[2]:
        assert _rel(got[2][name], ref[2][name]) < 1e-4, name


@cuda
@pytest.mark.parametrize("head", [32, 64])
def test_block_bf16_on_gpu(head):
    n = 4096
    attn, x, pos, observed = _setup(n, device="cuda", dtype=torch.float32, head=head)
    plan = block_plan(pos, observed, 128, key_blocks=8)
    ref = _run(attn, "block", x, pos, observed, plan, grad=True)
    attn16 = attn.to(torch.bfloat16)
    got = _run(attn16, "block", x.bfloat16(), pos, observed, plan, grad=True)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert _rel(got[0].float(), ref[0]) < 3e-2
    assert _rel(got[1].float(), ref[1]) < 5e-2
