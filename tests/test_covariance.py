import math

import gstools as gs
import numpy as np
import pytest
import torch
import torch.func

from pipeline.config import ModelConfig, SyntheticConfig
from pipeline.data.geometry import chordal_km, euclidean_km, positions_km
from pipeline.evaluate.variography import gstools_model
from pipeline.kernels import FAMILIES, KERNELS, LOG_CORRELATIONS, correlation
from pipeline.model.covariance import CovarianceBias

RANGE = 7.0


def test_every_family_is_pinned():
    """The config, the attention bias, variography and the sampler read one table."""
    assert set(LOG_CORRELATIONS) == set(FAMILIES) and (*FAMILIES, "none") == KERNELS
    assert ModelConfig.model_fields["kernel"].annotation.__args__ == KERNELS
    assert SyntheticConfig.model_fields["family"].annotation.__args__ == KERNELS
    for name in FAMILIES:
        assert isinstance(gstools_model(name), gs.CovModel)
        ModelConfig(kernel=name)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].spectral is not None])
def test_spectral_law_gives_the_family_correlation(family):
    """Bochner: E[cos(omega . delta)] over the family's spectral law is rho(|delta|)."""
    omega = FAMILIES[family].spectral(np.random.default_rng(0), 400_000)  # [m, 2], range 1
    h = np.array([0.25, 0.5, 1.0, 2.0])
    angle = np.random.default_rng(1).uniform(0, 2 * np.pi, len(h))
    delta = h[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)  # [4, 2]
    empirical = np.cos(omega @ delta.T).mean(0)
    rho = correlation(family, torch.tensor(h, dtype=torch.float64)).numpy()
    # the sd of a mean of m cosines is at most sqrt(1 / (2 m)) = 0.0011
    np.testing.assert_allclose(empirical, rho, atol=0.006)


@pytest.mark.parametrize(
    "family,cls,rescale",
    [
        ("exponential", gs.Exponential, 1.0),
        ("matern32", gs.Matern, math.sqrt(2)),  # GSTools writes the Matern with sqrt(nu) h
        ("matern52", gs.Matern, math.sqrt(2)),
        ("gaussian", gs.Gaussian, 1.0),  # GSTools' default rescale is sqrt(pi) / 2
        ("rational_quadratic", gs.Rational, 1 / math.sqrt(2)),  # GSTools writes h^2 / alpha
        ("spherical", gs.Spherical, 1.0),
    ],
)
def test_family_matches_gstools(family, cls, rescale):
    model = gstools_model(family, RANGE)
    assert isinstance(model, cls) and model.rescale == pytest.approx(rescale)
    d = np.random.default_rng(1).uniform(0, 4 * RANGE, 50)
    ours = correlation(family, torch.tensor(d / RANGE, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, model.correlation(d), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].log_correlation_sq])
def test_a_family_of_h_squared_gives_the_same_log_correlation(family):
    """``log_correlation_sq`` (the block backend's square-root-free form) is log rho of h^2,
    values and gradients, from 0 to far beyond the range."""
    h = torch.tensor([0.0, 1e-6, 0.3, 1.0, 2.5, 40.0], dtype=torch.float64, requires_grad=True)
    direct = FAMILIES[family].log_correlation(h)
    via_sq = FAMILIES[family].log_correlation_sq(h * h)
    assert torch.allclose(direct, via_sq, rtol=1e-12, atol=1e-15)
    (g_direct,) = torch.autograd.grad(direct.sum(), h)
    (g_sq,) = torch.autograd.grad(FAMILIES[family].log_correlation_sq(h * h).sum(), h)
    assert torch.allclose(g_direct, g_sq, rtol=1e-12, atol=1e-15)


def _offsets(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) * 30
    pos[:, 2] = 0
    return pos[:, None] - pos[None], torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("family", sorted(LOG_CORRELATIONS))
def test_log_bias_gradcheck(family):
    kernel = CovarianceBias(family, heads=2, init_range_km=12.0, anisotropy=True).double()
    with torch.no_grad():
        kernel.log_ratio.copy_(torch.tensor([0.3, -0.2]))
    offset, is_self = _offsets()

    def f(log_range, raw_nugget, angle, log_ratio):
        params = dict(log_range=log_range, raw_nugget=raw_nugget, angle=angle, log_ratio=log_ratio)
        return torch.func.functional_call(kernel, params, (offset, is_self))

    params = [
        kernel.log_range.detach().clone().requires_grad_(),
        kernel.raw_nugget.detach().clone().requires_grad_(),
        kernel.angle.detach().clone().requires_grad_(),
        kernel.log_ratio.detach().clone().requires_grad_(),
    ]
    if family == "spherical":  # keep every pair away from the kink at h = 1
        params[0] = torch.full((2,), math.log(80.0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("family", sorted(LOG_CORRELATIONS))
@pytest.mark.parametrize("distance", [0.0, 1e-9, 5.0, 1e4, 1e7])
def test_finite_values_and_gradients(family, distance):
    kernel = CovarianceBias(family, heads=3, init_range_km=4.0, anisotropy=True)
    offset = torch.tensor([[distance, 0.0, 0.0]])
    bias = kernel.log_bias(offset, torch.tensor([False]))
    bias.sum().backward()
    assert torch.isfinite(bias).all()
    for p in kernel.parameters():
        assert torch.isfinite(p.grad).all(), (family, distance, p.grad)


def test_spherical_beyond_range_is_flat_and_finite():
    kernel = CovarianceBias("spherical", heads=1, init_range_km=5.0)
    offset = torch.tensor([[6.0, 0, 0], [50.0, 0, 0]])
    bias = kernel.log_bias(offset, torch.tensor([False, False]))
    bias.sum().backward()
    assert torch.isfinite(kernel.log_range.grad).all()
    assert kernel.log_range.grad.abs().item() == 0.0
    assert (bias < -50).all()  # effectively no attention beyond the range


def test_self_pairs_have_zero_bias_and_nugget_lowers_others():
    kernel = CovarianceBias("exponential", heads=1, init_range_km=10.0, init_nugget=0.25)
    offset = torch.tensor([[0.0, 0, 0], [0.0, 0, 0]])
    bias = kernel.log_bias(offset, torch.tensor([True, False]))
    assert bias[0, 0] == 0
    assert bias[0, 1].item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_anisotropy_stretches_the_minor_axis():
    kernel = CovarianceBias("exponential", heads=1, init_range_km=10.0, anisotropy=True)
    with torch.no_grad():
        kernel.angle.zero_()
        kernel.log_ratio.fill_(math.log(0.5))
    d = kernel.distance(torch.tensor([[3.0, 0, 0], [0.0, 3.0, 0]]))
    torch.testing.assert_close(d[0], torch.tensor([3.0, 6.0]))
    assert kernel.describe()["axis_ratio"][0] == pytest.approx(0.5)


def test_distance_helpers():
    assert euclidean_km([0, 0], [3, 4]) == pytest.approx(5.0)
    # one degree of latitude ~ 111.2 km; chordal is slightly shorter than the great circle
    d = chordal_km(np.array([0.0, 0.0]), np.array([1.0, 0.0]))
    assert 111.0 < d < 111.2
    pos, frame = positions_km(np.array([[34.0, -118.0], [34.1, -118.1]]), "latlon")
    np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-12)
    assert np.linalg.norm(pos[0] - pos[1]) == pytest.approx(
        chordal_km(np.array([34.0, -118.0]), np.array([34.1, -118.1]))
    )
