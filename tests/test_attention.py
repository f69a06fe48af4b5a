import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import k_nearest, morton_order
from pipeline.model import attention
from pipeline.model.attention import GeoAttention
from pipeline.model.covariance import CovarianceBias

N, D, H = 24, 16, 4


def _setup(family="matern32", n=N, seed=0, anisotropy=True):
    torch.manual_seed(seed)
    coords = np.random.default_rng(seed).uniform(0, 40, (n, 2))
    pos, frame = positions_km(coords, "xy")
    attn = GeoAttention(D, H, CovarianceBias(family, H, 8.0, 0.2, anisotropy=anisotropy), "dense")
    attn.kernel.set_frame(torch.tensor(frame))
    x = torch.randn(2, n, D)
    return attn.double(), x.double(), torch.tensor(pos), coords


def _run(attn, backend, x, pos, observed, neighbours=None):
    attn.backend = backend
    attn.zero_grad()
    x = x.clone().requires_grad_()
    out = attn(x, pos, observed, neighbours)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("family", ["matern32", "spherical", "none"])
def test_knn_with_all_neighbours_equals_dense(family):
    attn, x, pos, _ = _setup(family)
    observed = torch.rand(2, N, generator=torch.Generator().manual_seed(3)) > 0.3
    idx, _ = k_nearest(pos.numpy(), N)
    ref = _run(attn, "dense", x, pos, observed)
    got = _run(attn, "knn", x, pos, observed, torch.from_numpy(idx))
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("family", ["matern32", "exponential", "none"])
@pytest.mark.parametrize("use_qk", [True, False])
def test_masked_knn_equals_gathered_knn(family, use_qk, monkeypatch):
    """Small problems run knn as all pairs under the neighbour mask: the same outputs and
    gradients as the gathers, with padding (-1, outside a tile), rows whose own sensor is not
    among their neighbours, missing sensors and anisotropy."""
    attn, x, pos, _ = _setup(family)
    observed = torch.rand(2, N, generator=torch.Generator().manual_seed(4)) > 0.3
    idx = torch.from_numpy(k_nearest(pos.numpy(), 8)[0])
    idx[::5, -3:] = -1  # padded rows
    idx[3] = torch.roll(idx[3], -1)  # the self still present, elsewhere in the row
    outside = [j for j in range(N) if j not in idx[7].tolist()][0]
    idx[7][idx[7] == 7] = outside  # row 7 without its own sensor
    assert 7 not in idx[7].tolist() and len(set(idx[3].tolist())) == 8
    attn.qk_residual = use_qk
    runs = {}
    for name, limit in [("masked", 2**62), ("gathered", 0)]:
        monkeypatch.setattr(attention, "MASKED_SCORES", limit)
        runs[name] = _run(attn, "knn", x, pos, observed, idx)
    ref, got = runs["gathered"], runs["masked"]
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10)
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("anisotropy", [False, True])
def test_kernel_heads_leave_the_other_heads_plain(anisotropy):
    """model.kernel_heads=2 of 4: heads 0-1 attend as with the kernel on every head, heads 2-3
    as with kernel none, and only the kernel heads' parameters learn."""
    full, x, pos, _ = _setup("matern32", anisotropy=anisotropy)
    part = CovarianceBias("matern32", H, 8.0, 0.2, anisotropy=anisotropy, kernel_heads=2)
    part.load_state_dict(full.kernel.state_dict())
    part = part.double()
    plain = CovarianceBias("none", H)
    observed = torch.rand(2, N, generator=torch.Generator().manual_seed(6)) > 0.3
    q, k, v = full.qkv(x).view(2, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # [B, H, N, dh] each
    got = attention.dense_attention(q, k, v, pos, observed, part, None, True)
    with_kernel = attention.dense_attention(q, k, v, pos, observed, full.kernel, None, True)
    without = attention.dense_attention(q, k, v, pos, observed, plain, None, True)
    torch.testing.assert_close(got[:, :2], with_kernel[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[:, 2:], without[:, 2:], rtol=0, atol=1e-12)
    got.sum().backward()
    assert (part.log_range.grad[:2] != 0).all() and (part.log_range.grad[2:] == 0).all()
    assert (part.raw_nugget.grad[2:] == 0).all()
    assert len(part.describe()["range_km"]) == 2  # only the heads that carry the kernel


def test_kernel_none_equals_plain_sdpa():
    attn, x, pos, _ = _setup("none")
    observed = torch.ones(2, N, dtype=torch.bool)
    out = attn(x, pos, observed)
    q, k, v = attn.qkv(x).view(2, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, N, D)
    torch.testing.assert_close(out, attn.out(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "knn"])
def test_permuting_sensors_permutes_output(backend):
    attn, x, pos, coords = _setup()
    observed = torch.rand(2, N, generator=torch.Generator().manual_seed(5)) > 0.2
    perm = torch.from_numpy(np.random.default_rng(7).permutation(N))
    attn.backend = backend
    idx = torch.from_numpy(k_nearest(pos.numpy(), 8)[0])
    out = attn(x, pos, observed, idx)
    idx_p = torch.from_numpy(k_nearest(pos[perm].numpy(), 8)[0])
    out_p = attn(x[:, perm], pos[perm], observed[:, perm], idx_p)
    torch.testing.assert_close(out_p, out[:, perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "knn"])
def test_missing_sensor_receives_no_weight(backend):
    attn, x, pos, _ = _setup()
    attn.backend = backend
    idx = torch.from_numpy(k_nearest(pos.numpy(), 10)[0])
    observed = torch.ones(2, N, dtype=torch.bool)
    observed[:, 3] = False
    base = attn(x, pos, observed, idx)
    x2 = x.clone()
    x2[:, 3] += 100.0  # whatever a missing sensor carries must not reach the others
    moved = attn(x2, pos, observed, idx)
    others = torch.arange(N) != 3
    torch.testing.assert_close(moved[:, others], base[:, others], rtol=0, atol=1e-12)
    assert torch.isfinite(moved).all()


def test_k_nearest_puts_self_first_even_when_colocated():
    pos = np.zeros((5, 3))
    pos[3:] = 10.0
    idx, dist = k_nearest(pos, 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))
    for i in range(5):
        assert len(set(idx[i])) == 3
    assert dist.shape == (5, 3) and (dist[:, 0] == 0).all()


def test_morton_order_keeps_neighbours_close():
    coords = np.random.default_rng(0).uniform(0, 100, (4096, 2))
    pos, frame = positions_km(coords, "xy")
    order = morton_order(pos, frame)
    assert sorted(order.tolist()) == list(range(4096))
    step = np.linalg.norm(np.diff(coords[order], axis=0), axis=1)
    rand = np.linalg.norm(np.diff(coords, axis=0), axis=1)
    assert np.median(step) < 0.1 * np.median(rand)
