"""The field's variogram fitted beside the forecast (pipeline/model/variogram.py): it recovers a
known range, nugget and anisotropy from training windows, and leaves the forecast alone."""

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.config_sources import SyntheticConfig
from pipeline.data.neighbours import k_nearest
from pipeline.data.synthetic import SyntheticField
from pipeline.model.forecaster import Forecaster
from pipeline.model.variogram import FieldVariogram


def _estimate(init_km: float = 10.0, anisotropy: bool = False, **field) -> dict:
    """Fits the variogram to batches of 8 windows of a 400-sensor synthetic field."""
    torch.manual_seed(0)
    n, t = 400, 560
    src = SyntheticField(SyntheticConfig(num_sensors=n, num_steps=t, **field))
    sensors = np.arange(n)
    values = src.values(0, t, sensors)  # [T, N]
    z = (values - values.mean(0)) / values.std(0)
    pos = torch.tensor(np.c_[src.coords(sensors), np.zeros(n)], dtype=torch.float32)  # [N, 3]
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 16)[0])
    vg = FieldVariogram(field.get("family", "matern32"), init_km, 0.1, anisotropy)
    opt = torch.optim.Adam([p for p in vg.parameters() if p.requires_grad], lr=0.03)
    rng = np.random.default_rng(0)
    for _ in range(300):
        origins = rng.integers(12, t, 8)
        x = torch.tensor(np.stack([z[o - 12 : o] for o in origins]), dtype=torch.float32)
        x = x[..., None]  # [B, time_in, N, 1]
        vg.observe(x, torch.ones_like(x, dtype=torch.bool), pos, neighbours)
        loss = vg.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vg.describe()


@pytest.mark.parametrize(
    "field",
    [
        {"family": "matern32", "range_km": 15.0, "nugget": 1.5},  # noise-dominated
        {"family": "exponential", "range_km": 5.0, "nugget": 0.1},  # 2x below the start
        {"family": "matern32", "range_km": 10.0, "nugget": 0.1, "init_km": 40.0},  # 4x above
    ],
)
def test_the_estimate_recovers_a_known_range_and_nugget(field):
    est = _estimate(**field)
    field.pop("init_km", None)
    assert est["range_km"] == pytest.approx(field["range_km"], rel=0.15), est
    truth_fraction = field["nugget"] / (1.0 + field["nugget"])
    assert est["nugget"] == pytest.approx(truth_fraction, abs=0.05), est


def test_the_estimate_recovers_a_geometric_anisotropy():
    field = {"range_km": 25.0, "nugget": 0.5, "anisotropy_angle_deg": 30.0}
    est = _estimate(anisotropy=True, anisotropy_ratio=0.3, **field)
    assert est["range_km"] == pytest.approx(25.0, rel=0.15), est
    assert est["angle_deg"] == pytest.approx(30.0, abs=5.0), est
    assert est["axis_ratio"] == pytest.approx(0.3, abs=0.1), est


def test_the_variogram_term_leaves_the_forecast_alone():
    """Same initial weights with and without it, and its gradient reaches its own
    parameters only."""
    cfg = ModelConfig(d_model=16, heads=2, layers=1, knn=4)
    outputs = []
    for variography in (True, False):
        torch.manual_seed(0)
        model = Forecaster(cfg.model_copy(update={"variography": variography}), 6, 3, 1)
        model.train()
        x = torch.randn(4, 6, 30, 1)
        pos = torch.cat([torch.rand(30, 2) * 50, torch.zeros(30, 1)], dim=1)
        neighbours = torch.as_tensor(k_nearest(pos.numpy(), 4)[0])
        mean, std = model(
            x, torch.ones_like(x, dtype=torch.bool), torch.zeros(4, 4), pos, neighbours
        )
        outputs.append((mean, std))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    model.train()
    torch.manual_seed(0)
    model = Forecaster(cfg, 6, 3, 1)
    for _ in range(3):  # the classes fill with a few batches
        model(x, torch.ones_like(x, dtype=torch.bool), torch.zeros(4, 4), pos, neighbours)
    model.variogram_loss.backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None}
    assert moved == {"variogram.kernel.log_range"}, moved


def test_the_kriging_variance_is_simple_kriging_under_the_estimate():
    """Against the textbook formula at one unobserved sensor; the sill far from any observed
    neighbour; nothing at observed sensors."""
    torch.manual_seed(0)
    vg = FieldVariogram("exponential", 10.0, 0.2, False)
    vg.sill.fill_(0.8)
    pos = torch.cat([torch.rand(12, 2) * 30, torch.zeros(12, 1)], dim=1)  # [N, 3] km
    pos[11] = torch.tensor([500.0, 500.0, 0.0])  # far from everything
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 6)[0])
    observed = torch.ones(1, 12, dtype=torch.bool)
    observed[0, [0, 11]] = False
    observed[0, neighbours[0, 2]] = False  # one of sensor 0's neighbours has no window either
    kv = vg.kriging_variance(observed, pos, neighbours)[0]
    assert (kv[observed[0]] == 0).all()

    near = [int(j) for j in neighbours[0] if j != 0 and observed[0, j]]
    d = torch.cdist(pos, pos).double()

    def cov(dist):
        return 0.8 * torch.where(dist == 0, torch.ones_like(dist), 0.8 * torch.exp(-dist / 10))

    big = cov(d[near][:, near])
    small = 0.8 * 0.8 * torch.exp(-d[0, near] / 10)
    expect = 0.8 - small @ torch.linalg.solve(big, small)
    assert float(kv[0]) == pytest.approx(float(expect), rel=1e-4)
    assert float(kv[11]) == pytest.approx(0.8, rel=1e-5)  # no correlated neighbour: the sill


def test_kriged_inputs_are_simple_kriging_of_the_neighbours_observed_at_that_step():
    """model.kriged_inputs: each unobserved cell gets the textbook simple-kriging estimate from
    the neighbours observed at its own step (they differ by step); observed cells are
    untouched; a sensor with no observed neighbour keeps 0 and is not marked filled."""
    torch.manual_seed(0)
    vg = FieldVariogram("exponential", 10.0, 0.2, False)
    pos = torch.cat([torch.rand(12, 2) * 30, torch.zeros(12, 1)], dim=1)  # [N, 3] km
    pos[11] = torch.tensor([500.0, 500.0, 0.0])  # its neighbours: all far and unobserved
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 6)[0])
    x = torch.randn(2, 3, 12, 1)  # [B, T, N, F]
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :, 0] = False  # sensor 0: no window at all
    mask[1, 2, neighbours[0, 2]] = False  # one of its neighbours missing at one step only
    mask[:, :, 11] = False
    for j in neighbours[11, 1:]:
        mask[:, :, j] = False
    out, filled = vg.krige(x * mask, mask, pos, neighbours)
    assert torch.equal(out[mask], x[mask])
    assert not filled[mask].any() and not filled[:, :, 11].any()
    assert (out[:, :, 11] == 0).all()

    d = torch.cdist(pos, pos).double()
    for b, t in [(0, 0), (1, 2)]:
        near = [int(j) for j in neighbours[0] if j != 0 and mask[b, t, j, 0]]
        big = torch.where(d[near][:, near] == 0, 1.0, 0.8 * torch.exp(-d[near][:, near] / 10))
        small = 0.8 * torch.exp(-d[0, near] / 10)
        expect = small @ torch.linalg.solve(big, x[b, t, near, 0].double())
        assert bool(filled[b, t, 0, 0])
        assert float(out[b, t, 0, 0]) == pytest.approx(float(expect), rel=1e-4, abs=1e-6)


def test_kriged_inputs_change_the_forecast_only_where_inputs_are_missing():
    """With model.kriged_inputs a window without gaps forecasts as without it; a sensor without
    a window forecasts from its kriged last value (so its mean moves with its neighbours')."""
    torch.manual_seed(0)
    n = 30
    pos = torch.cat([torch.rand(n, 2) * 40, torch.zeros(n, 1)], dim=1)
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 8)[0])
    base = ModelConfig(d_model=16, heads=2, layers=1, calendar=False)
    plain = Forecaster(base, 4, 2, 1, n).eval()
    kriged = Forecaster(base.model_copy(update={"kriged_inputs": True}), 4, 2, 1, n).eval()
    kriged.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, n, 1)
    full = torch.ones_like(x, dtype=torch.bool)
    cal = torch.zeros(1, 4)
    with torch.no_grad():
        a, b = plain(x, full, cal, pos, neighbours), kriged(x, full, cal, pos, neighbours)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        gap = full.clone()
        gap[:, :, 0] = False
        m0 = kriged(x, gap, cal, pos, neighbours)[0][0, :, 0]
        m1 = kriged(x + 1.0, gap, cal, pos, neighbours)[0][0, :, 0]
        m_plain = plain(x + 1.0, gap, cal, pos, neighbours)[0][0, :, 0]
    assert (m1 - m0).abs().min() > 0.1  # the neighbours' level reaches the unobserved sensor
    assert not torch.allclose(m_plain, m1)


def test_kriging_deep_inside_an_outage_reaches_the_nearest_observed_neighbours():
    """Where the nearest neighbours are all missing, the fill uses the 16 nearest observed
    ones of the graph further out (textbook simple kriging over exactly those)."""
    torch.manual_seed(1)
    vg = FieldVariogram("exponential", 20.0, 0.1, False)
    n = 40
    pos = torch.cat([torch.rand(n, 2) * 50, torch.zeros(n, 1)], dim=1)  # [N, 3] km
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 30)[0])
    x = torch.randn(1, 1, n, 1)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 0, neighbours[0, :8]] = False  # sensor 0 and its 7 nearest
    out, filled = vg.krige(x * mask, mask, pos, neighbours)
    near = [int(j) for j in neighbours[0, 8:24]]  # the 16 nearest observed
    d = torch.cdist(pos.double(), pos.double())
    big = torch.where(torch.eye(16, dtype=torch.bool), 1.0, 0.9 * torch.exp(-d[near][:, near] / 20))
    small = 0.9 * torch.exp(-d[0, near] / 20)
    expect = small @ torch.linalg.solve(big, x[0, 0, near, 0].double())
    assert bool(filled[0, 0, 0, 0])
    assert float(out[0, 0, 0, 0]) == pytest.approx(float(expect), rel=1e-4, abs=1e-6)


def test_kriged_smoothing_is_simple_kriging_of_the_noise_free_field():
    """model.kriged_smoothing: every cell gets the textbook simple-kriging estimate of the field
    without its nugget from its own observation and its nearest observed neighbours (unobserved
    cells: from the neighbours alone); no nugget leaves the observations as they are."""
    torch.manual_seed(2)
    vg = FieldVariogram("exponential", 10.0, 0.2, False)
    pos = torch.cat([torch.rand(12, 2) * 30, torch.zeros(12, 1)], dim=1)  # [N, 3] km
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 6)[0])
    x = torch.randn(2, 3, 12, 1)  # [B, T, N, F]
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 2, 0] = False  # sensor 0 unobserved at one step
    mask[1, 2, neighbours[0, 3]] = False  # and one of its neighbours with it
    out, filled = vg.krige(x * mask, mask, pos, neighbours, smooth=True)
    assert filled.all()
    d = torch.cdist(pos, pos).double()
    for b, t in [(0, 0), (1, 2)]:
        near = [int(j) for j in neighbours[0] if mask[b, t, j, 0]]  # itself first if observed
        big = torch.where(d[near][:, near] == 0, 1.0, 0.8 * torch.exp(-d[near][:, near] / 10))
        small = 0.8 * torch.exp(-d[0, near] / 10)
        expect = small @ torch.linalg.solve(big, x[b, t, near, 0].double())
        assert float(out[b, t, 0, 0]) == pytest.approx(float(expect), rel=1e-4, abs=1e-6)
    assert not torch.allclose(out[mask], x[mask])  # the nugget shrunk away
    vg.nugget.fill_(0.0)
    clean, _ = vg.krige(x * mask, mask, pos, neighbours, smooth=True)
    assert torch.allclose(clean[mask], x[mask], atol=1e-3)


def test_kriged_smoothing_fills_unobserved_cells_as_kriged_inputs_do():
    """At a cell without an observation the smoothed estimate is the kriged fill, so a model
    with both flags krigs once (the smoothing pass) and fills from it."""
    torch.manual_seed(3)
    vg = FieldVariogram("matern32", 12.0, 0.3, False)
    n = 25
    pos = torch.cat([torch.rand(n, 2) * 40, torch.zeros(n, 1)], dim=1)  # [N, 3] km
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 10)[0])
    x = torch.randn(2, 4, n, 1)
    mask = torch.rand_like(x) > 0.3
    mask[:, :, 0] = False  # a whole window missing
    fill, got = vg.krige(x * mask, mask, pos, neighbours)
    smooth, _ = vg.krige(x * mask, mask, pos, neighbours, smooth=True)
    assert got[~mask].any()
    assert torch.allclose(smooth[got], fill[got], rtol=1e-5, atol=1e-6)

    cfg = ModelConfig(d_model=16, heads=2, layers=1, calendar=False, kriged_smoothing=True)
    both = Forecaster(cfg.model_copy(update={"kriged_inputs": True}), 4, 2, 1, n).eval()
    calls = []
    solve = both.variogram.krige
    both.variogram.krige = lambda *a, **k: calls.append(a[4:] + tuple(k.values())) or solve(*a, **k)
    with torch.no_grad():
        mean, _ = both(x, mask, torch.zeros(2, 4), pos, neighbours)
    assert calls == [(True,)] and torch.isfinite(mean).all()


def test_kriged_smoothing_forecasts_from_the_smoothed_last_value():
    """A model with model.kriged_smoothing reads the smoothed window and forecasts as a
    correction of its last smoothed value: with the network's weights zeroed, the mean is that
    value; it needs the neighbour graph."""
    torch.manual_seed(0)
    n = 20
    pos = torch.cat([torch.rand(n, 2) * 40, torch.zeros(n, 1)], dim=1)
    neighbours = torch.as_tensor(k_nearest(pos.numpy(), 8)[0])
    cfg = ModelConfig(d_model=16, heads=2, layers=1, calendar=False, kriged_smoothing=True)
    model = Forecaster(cfg, 4, 2, 1, n).eval()
    assert model.embed.in_features == 4 * 2 + 4  # the window, its mask, the smoothed window
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    x = torch.randn(1, 4, n, 1)
    mask = torch.ones_like(x, dtype=torch.bool)
    smoothed, _ = model.variogram.krige(x, mask, pos, neighbours, smooth=True)
    with torch.no_grad():
        mean, _ = model(x, mask, torch.zeros(1, 4), pos, neighbours)
        assert torch.allclose(mean[0], smoothed[0, -1][None].expand(2, n, 1))
        assert not torch.allclose(mean[0, 0], x[0, -1])
        with pytest.raises(ValueError, match="kriged_smoothing needs the neighbour graph"):
            model(x, mask, torch.zeros(1, 4), pos, None)


def test_the_variogram_keeps_its_learning_rate_while_the_forecast_decays():
    """The field variogram's parameters are their own optimiser group: after the warm-up it
    stays at train.kernel_lr, while the forecast's kernel parameters decay with the schedule."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.train.optimizer import optimizer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "regimes" / "anisotropic.yaml")
    model = Forecaster(cfg.model, cfg.data.time_in, cfg.data.horizon, 1, 40)
    opt, schedule = optimizer(model, cfg)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    vg = groups[id(model.variogram.kernel.log_range)]
    heads = groups[id(next(p for n, p in model.named_parameters() if "log_range" in n
                           and not n.startswith("variogram.")))]  # fmt: skip
    assert vg is not heads and vg["weight_decay"] == 0.0
    for _ in range(cfg.train.steps):
        opt.step()
        schedule.step()
    assert vg["lr"] == pytest.approx(cfg.train.kernel_lr)
    assert heads["lr"] == pytest.approx(cfg.train.kernel_lr * cfg.train.min_lr_ratio)
