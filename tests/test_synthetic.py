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


def test_outages_are_spatial_patches_over_random_spans_and_chunk_free():
    cfg = SyntheticConfig(num_sensors=800, num_steps=480, outage_fraction=0.4, seed=5)
    field = SyntheticField(cfg)
    seen = field.observed(0, 480)  # [T, N]
    active = (~seen).any(axis=1)
    # every episode of 48 steps has one outage of 24-48 steps
    assert 0.5 <= active.mean() <= 1.0
    share = 1 - seen[active].mean(axis=1)  # missing share while an outage is on
    assert 0.2 < share.mean() < 0.55
    # contiguous patches: the nearest neighbour of a missing sensor is mostly missing too
    xy = field.coords(np.arange(800))
    nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1]
    t = int(np.flatnonzero(active)[0])
    off = ~seen[t]
    assert off[nearest[off]].mean() > 0.8 > off.mean()
    # a pure function of (t, sensor): any chunk, any subset
    pick = np.random.default_rng(0).permutation(800)[:150]
    np.testing.assert_array_equal(field.observed(100, 333, pick), seen[100:333, pick])
    # the values themselves do not change with outages
    plain = SyntheticField(cfg.model_copy(update={"outage_fraction": 0.0}))
    np.testing.assert_array_equal(plain.values(0, 50), field.values(0, 50))
    assert plain.observed(0, 50).all()


def test_clustered_layout_mixes_very_different_neighbour_distances():
    cfg = SyntheticConfig(num_sensors=1000, num_steps=10, layout="clustered", seed=2)
    xy = SyntheticField(cfg).coords(np.arange(1000))
    uniform = SyntheticField(cfg.model_copy(update={"layout": "uniform"})).coords(np.arange(1000))

    def nearest_km(p):
        d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return d.min(axis=1)

    clustered, spread = nearest_km(xy), nearest_km(uniform)
    # most sensors sit in tight clusters, a few far out: a wide spread of distances
    assert np.median(clustered) < 0.4 * np.median(spread)
    assert np.quantile(clustered, 0.95) / np.median(clustered) > 5
    pick = np.arange(0, 1000, 7)[::-1]
    np.testing.assert_array_equal(SyntheticField(cfg).coords(pick), xy[pick])
