import math

import numpy as np
import pytest
import scoringrules
import torch
from scipy import stats

from pipeline.config import load_config
from pipeline.data.geometry import positions_km
from pipeline.data.neighbours import k_nearest
from pipeline.model.forecaster import Forecaster
from pipeline.model.losses import gaussian_crps, gaussian_nll


def _inputs(n=30, b=2, t=6, f=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = np.random.default_rng(seed).uniform(0, 50, (n, 2))
    pos, frame = positions_km(coords, "xy")
    x = torch.randn(b, t, n, f, generator=g)
    mask = torch.rand(b, t, n, f, generator=g) > 0.2
    cal = torch.randn(b, 4, generator=g)
    return (
        x,
        mask,
        cal,
        torch.tensor(pos, dtype=torch.float32),
        torch.from_numpy(k_nearest(pos, 8)[0]),
        frame,
    )


@pytest.mark.parametrize("backend", ["dense", "knn"])
def test_forecaster_shapes_and_gradients(backend):
    cfg = load_config(
        None, [f"model.backend={backend}", "model.anisotropy=true", "model.d_model=32"]
    )
    x, mask, cal, pos, nb, frame = _inputs()
    frame = torch.tensor(frame, dtype=torch.float32)
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2, frame=frame)
    mean, std = model(x, mask, cal, pos, nb)
    assert mean.shape == std.shape == (2, 3, 30, 2)
    assert (std > 0).all()
    y = torch.randn_like(mean)
    loss = gaussian_crps(mean, std, y, torch.ones_like(y, dtype=torch.bool))
    loss.backward()
    kernel = model.kernels()[0]
    assert kernel.log_range.grad is not None and torch.isfinite(kernel.log_range.grad).all()


def test_forecasts_at_unseen_sensors():
    """No per-sensor parameters: a model runs on a network of another size."""
    cfg = load_config(None, ["model.d_model=16"])
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2)
    for n in (30, 45):
        x, mask, cal, pos, nb, _ = _inputs(n=n)
        assert model(x, mask, cal, pos, nb)[0].shape == (2, 3, n, 2)


@pytest.mark.parametrize("temporal", [0, 1])
def test_missing_inputs_do_not_leak(temporal):
    """Values under a False mask do not change the forecast (with attention over time too)."""
    cfg = load_config(None, ["model.d_model=16", f"model.temporal_layers={temporal}"])
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2)
    x, mask, cal, pos, nb, _ = _inputs()
    if temporal:  # its residual starts at zero: make it count
        torch.nn.init.normal_(model.temporal.out.weight)
    a = model(x, mask, cal, pos, nb)[0]
    b = model(torch.where(mask, x, torch.full_like(x, 1e6)), mask, cal, pos, nb)[0]
    torch.testing.assert_close(a, b)


def test_temporal_layers_start_flat_and_learn():
    """model.temporal_layers: a fresh model forecasts as the flat one with the same weights;
    one optimiser step makes the attention over time part of the forecast."""
    flat_cfg = load_config(None, ["model.d_model=16"])
    cfg = load_config(None, ["model.d_model=16", "model.temporal_layers=1"])
    flat = Forecaster(flat_cfg.model, time_in=6, horizon=3, features=2)
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2)
    missing = model.load_state_dict(flat.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("temporal.") for k in missing)
    x, mask, cal, pos, nb, _ = _inputs()
    torch.testing.assert_close(model(x, mask, cal, pos, nb)[0], flat(x, mask, cal, pos, nb)[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mean, std = model(x, mask, cal, pos, nb)
    y = torch.randn_like(mean)
    gaussian_crps(mean, std, y, torch.ones_like(y, dtype=torch.bool)).backward()
    assert model.temporal.out.weight.grad.abs().sum() > 0
    opt.step()
    steps = torch.cat([torch.where(mask, x, 0.0), mask.float()], dim=-1)  # [B, T, N, 2F]
    assert model.temporal(steps).abs().amax() > 0


@pytest.mark.parametrize("calendar", [True, False])
def test_calendar_switch(calendar):
    """model.calendar=false: the forecast ignores the clock and the model has no calendar
    weights; true: it reads it."""
    cfg = load_config(None, ["model.d_model=16", f"model.calendar={str(calendar).lower()}"])
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2)
    x, mask, cal, pos, nb, _ = _inputs()
    a = model(x, mask, cal, pos, nb)[0]
    b = model(x, mask, -cal, pos, nb)[0]
    assert torch.equal(a, b) is not calendar
    assert any(k.startswith("calendar.") for k in model.state_dict()) is calendar


def test_daily_profile_input():
    """model.daily_profile: the forecast reads the profile levels [B, horizon, N, F], and a
    model that needs them refuses to run without."""
    cfg = load_config(None, ["model.d_model=16", "model.daily_profile=true"])
    model = Forecaster(cfg.model, time_in=6, horizon=3, features=2)
    x, mask, cal, pos, nb, _ = _inputs()
    levels = torch.randn(2, 3, 30, 2)
    a = model(x, mask, cal, pos, nb, None, levels)[0]
    assert not torch.equal(a, model(x, mask, cal, pos, nb, None, levels + 1)[0])
    with pytest.raises(ValueError, match="needs the profile"):
        model(x, mask, cal, pos, nb)
    with pytest.raises(ValueError, match="does not read model.daily_profile"):
        load_config(None, ["model.daily_profile=true", "model.peer=stid"])


def test_crps_matches_scoringrules_and_nll_matches_scipy():
    rng = np.random.default_rng(0)
    mu, sigma, y = rng.normal(size=200), rng.uniform(0.1, 3, 200), rng.normal(size=200) * 2
    mask = rng.uniform(size=200) > 0.3
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    ref = scoringrules.crps_normal(y, mu, sigma)
    np.testing.assert_allclose(gaussian_crps(t(mu), t(sigma), t(y)).numpy(), ref, atol=1e-10)
    masked = gaussian_crps(t(mu), t(sigma), t(y), torch.tensor(mask)).item()
    assert masked == pytest.approx(ref[mask].mean(), abs=1e-10)
    nll = gaussian_nll(t(mu), t(sigma), t(y), torch.tensor(mask)).item()
    assert nll == pytest.approx(-stats.norm.logpdf(y, mu, sigma)[mask].mean(), abs=1e-10)
    assert not math.isnan(
        gaussian_crps(t(mu), t(sigma), t(y), torch.zeros(200, dtype=torch.bool)).item()
    )
