"""What kriging the input window costs in a real training step: the same config trained with
``model.kriged_inputs`` (``--flag``, the default) or ``model.kriged_smoothing`` off and on,
measured in the same run. ``kriged_inputs`` runs with held-out sensors and
``train.sensor_dropout`` (the setting of docs/holdout.md, where most kriged cells are);
``kriged_smoothing`` krigs every cell, so it runs the config as it is.

Each variant trains the config (one process, tracking, the oracle and the fitted GP off) for
``--steps`` steps in its own subprocess; reported: seconds per optimiser step (the run's
metrics.json), the process's peak resident memory, and the ratios on / off. Alternating
repeats (``--repeats``) because the machine is shared.

Usage: python benchmarks/kriged_step.py [--config configs/los_loop.yaml] [--steps 100]
       [--repeats 2] [--flag kriged_inputs|kriged_smoothing] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_runs import compare  # noqa: E402

SETTING = {  # the overrides each flag is measured under
    "kriged_inputs": ["data.holdout_sensors=0.2", "train.sensor_dropout=0.2"],
    "kriged_smoothing": [],
}


def variants(args) -> dict[str, dict]:
    """The flag off and on, in its setting."""
    return {
        name: {"overrides": [*SETTING[args.flag], f"model.{args.flag}={value}"]}
        for name, value in (("off", "false"), ("on", "true"))
    }


if __name__ == "__main__":
    compare(
        __doc__,
        variants,
        options={"--flag": {"choices": list(SETTING), "default": "kriged_inputs"}},
    )
