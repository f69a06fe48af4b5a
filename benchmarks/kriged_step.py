"""What ``model.kriged_inputs`` costs in a real training step: the same config trained with the
flag off and on, with held-out sensors and ``train.sensor_dropout`` (the setting of
docs/holdout.md, where most cells are kriged), measured in the same run.

Each variant trains the config (one process, tracking, the oracle and the fitted GP off) for
``--steps`` steps in its own subprocess; reported: seconds per optimiser step (the run's
metrics.json), the process's peak resident memory, and the ratios on / off. Alternating
repeats (``--repeats``) because the machine is shared.

Usage: python benchmarks/kriged_step.py [--config configs/los_loop.yaml] [--steps 100]
       [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_runs import compare  # noqa: E402

HELD_OUT = ["data.holdout_sensors=0.2", "train.sensor_dropout=0.2"]


if __name__ == "__main__":
    compare(
        __doc__,
        {
            name: {"overrides": [*HELD_OUT, f"model.kriged_inputs={flag}"]}
            for name, flag in (("off", "false"), ("on", "true"))
        },
        " (held out 0.2, sensor dropout 0.2)",
    )
