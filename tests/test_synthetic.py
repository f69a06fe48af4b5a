import numpy as np
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data.synthetic import SyntheticField
from pipeline.evaluate.variography import empirical_variogram, gstools_model


def test_values_do_not_depend_on_chunking():
    field = SyntheticField(SyntheticConfig(num_sensors=5000, num_steps=600, seed=3))
    everyone = np.arange(5000)
    whole = field.values(0, 600)
    tiles = np.block(
        [
            [
                field.values(t0, min(t0 + 97, 600), everyone[n0 : n0 + 1333])
                for n0 in range(0, 5000, 1333)
            ]
            for t0 in range(0, 600, 97)
        ]
    )
    np.testing.assert_array_equal(tiles, whole)
    scattered = np.random.default_rng(0).permutation(5000)[:700]  # any subset, any order
    np.testing.assert_array_equal(field.values(50, 120, scattered), whole[50:120, scattered])
    np.testing.assert_array_equal(field.coords(scattered), field.coords(everyone)[scattered])


def test_noise_is_standard_normal():
    field = SyntheticField(SyntheticConfig(num_sensors=1000, num_steps=200, seed=4))
    z = field.noise(0, 200, np.arange(1000)).ravel()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01


def test_seed_changes_the_field():
    a = SyntheticField(SyntheticConfig(num_sensors=50, num_steps=10, seed=1)).values(0, 10)
    b = SyntheticField(SyntheticConfig(num_sensors=50, num_steps=10, seed=2)).values(0, 10)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("family", ["exponential", "matern32", "gaussian", "rational_quadratic"])
def test_empirical_variogram_matches_theory(family):
    """Semivariance of the observations: nugget + variance * (1 - rho(d / range)).

    Tolerance 0.1 (10 % of the sill 1.1) per bin. Two error sources, both well inside it:
    the random Fourier features make the field's covariance a Monte-Carlo estimate of rho with
    M = 2048 frequencies (sd <= 1/sqrt(2M) = 0.016); the variogram is averaged over 40 snapshots
    120 steps apart (AR 0.9^120: independent), each with 1500 sensors over a 100 km square,
    i.e. about (100/15)^2 = 44 independent patches each, ~1800 in all: relative sd
    sqrt(2/1800) = 3 % of the sill at the largest lags, less at short ones.
    """
    cfg = SyntheticConfig(
        family=family,
        range_km=15.0,
        variance=1.0,
        nugget=0.1,
        num_sensors=1500,
        num_steps=4800,
        num_features=2048,
        domain_km=100.0,
        seed=11,
    )
    field = SyntheticField(cfg)
    steps = np.arange(0, 4800, 120)
    values = np.stack([field.values(t, t + 1)[0] for t in steps])
    edges = np.linspace(0, 45, 10)
    centres, gamma = empirical_variogram(
        field.coords(np.arange(1500)), values, edges, snapshots=len(steps), pairs=None
    )
    theory = gstools_model(family, 15.0, 1.0, 0.1).variogram(centres)
    np.testing.assert_allclose(gamma, theory, atol=0.1)
    assert gamma[0] < 0.5 * gamma[-1]  # spatial structure is really there
