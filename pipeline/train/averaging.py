"""An exponential moving average of the trained weights (``train.ema_decay``; Polyak
averaging): validation, early stopping, the best weights, the test and the export see the
average, the optimiser steps the raw weights.

    average <- d_t average + (1 - d_t) weights,   d_t = min(decay, (1 + t) / (10 + t))

after every optimiser step t (the ramp keeps the initial weights from dominating a short run).
The field's variogram (``variogram.*``) is not averaged: it is a fit to statistics that
accumulate over the run, and its current values stand (as in the best weights,
pipeline/train/loop.py). The average lives in the trainer state, so checkpoints carry it and a
resume continues it. ZeRO stages 0-2 only: every rank holds the whole parameters and computes
the same average."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.config import ConfigError


def _averaged(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {
        name: p
        for name, p in module.named_parameters()
        if p.requires_grad and not name.startswith("variogram.")
    }


class WeightAverage:
    """The average of ``module``'s trainable parameters; ``shadow``: a resumed average
    (name -> float32 tensor), else the current weights."""

    def __init__(
        self, module: torch.nn.Module, decay: float, shadow: dict[str, torch.Tensor] | None
    ):
        self.decay = decay
        self.params = _averaged(module)
        if shadow is None:
            shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        elif set(shadow) != set(self.params):
            odd = sorted(set(shadow) ^ set(self.params))
            raise ConfigError(
                f"the checkpoint's weight average (train.ema_decay) and the model differ in the "
                f"parameters {odd[:3]}: resume with the model it was written by, or train "
                "afresh (train.resume=never)"
            )
        self.shadow = shadow

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimiser step ``step`` (counted from 0)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the average inside the block, its own weights again after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        self.load()
        try:
            yield
        finally:
            self._put(saved)

    def load(self) -> None:
        """Put the average into the module (for good: the test and the export)."""
        self._put(self.shadow)

    @torch.no_grad()
    def _put(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(values[name])
