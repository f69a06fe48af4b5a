"""The weight average (``train.ema_decay``, pipeline/train/averaging.py): its update and swap,
and a real training job (DeepSpeed on CPU) whose checkpoints carry it across a resume, whose
best-validation weights are the average, and whose export is them."""

import pytest
import torch
from tiny import overrides, run_train
from torch import nn

from pipeline.train.averaging import WeightAverage


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.variogram = nn.Linear(2, 1)  # the field's variogram: never averaged


def ramp(decay: float, step: int) -> float:
    return min(decay, (1 + step) / (10 + step))


def test_the_average_follows_the_ramped_recursion_and_swaps_back_exactly():
    torch.manual_seed(0)
    model = Tiny()
    average = WeightAverage(model, 0.9, None)
    assert set(average.shadow) == {"head.weight", "head.bias"}
    expected = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        d = ramp(0.9, step)
        expected = {n: d * expected[n] + (1 - d) * p for n, p in model.head.named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(average.shadow[f"head.{name}"], value)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied():
        assert torch.equal(model.head.weight, average.shadow["head.weight"])
        assert torch.equal(model.variogram.weight, raw["variogram.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_a_resumed_checkpoint_whose_average_does_not_match_the_model_is_refused():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.resume=never"):
        WeightAverage(Tiny(), 0.9, {"head.weight": torch.zeros(2, 3)})


def train(store, out, steps, extra=()):
    args = overrides(
        store,
        out,
        "ema",
        steps,
        [
            "train.ema_decay=0.8",
            "train.lr=0.05",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=null",
            "train.oracle=false",
            "train.fitted_gp=false",
            "tracking.enabled=false",
            *extra,
        ],
    )
    proc = run_train(args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_a_run_carries_the_average_through_a_resume_and_tests_it(synthetic_store, tmp_path):
    """4 steps, then the same run resumed to 8: at every checkpoint the saved average is the
    recursion over the raw weights DeepSpeed saved (across the resume too: not restarted), the
    best-validation weights are the average at their step, and the export is them."""
    train(synthetic_store, tmp_path, 4)
    train(synthetic_store, tmp_path, 8, ["train.resume=auto"])
    ckpt = tmp_path / "ema" / "checkpoints"
    shadows, raws = {}, {}
    for step in range(1, 9):
        tag = ckpt / f"step{step:08d}"
        shadows[step] = torch.load(tag / "trainer_rank0.pt", weights_only=True)["ema"]
        raws[step] = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert not any(k.startswith("variogram.") for k in shadows[1])
    for step in range(2, 9):
        d = ramp(0.8, step - 1)
        for name, value in shadows[step].items():
            expected = d * shadows[step - 1][name] + (1 - d) * raws[step][name].float()
            torch.testing.assert_close(value, expected, msg=f"step {step}, {name}")
        assert any(not torch.equal(shadows[step][n], raws[step][n]) for n in shadows[step])
    best = torch.load(ckpt / "best.pt", weights_only=True)
    exported = torch.load(tmp_path / "ema" / "model" / "weights.pt", weights_only=True)
    for name, value in shadows[best["step"]].items():
        assert torch.equal(best["weights"][name], value), name
        assert torch.equal(exported[name], value), name
