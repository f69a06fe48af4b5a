"""The knn backend's two paths in a real training step: gathered keys and values against all
pairs under the neighbour mask (pipeline/model/attention.py, ``MASKED_SCORES``), on a config's
store, measured in the same run.

Each path trains the config (one process, tracking, the oracle and the fitted GP off) for
``--steps`` steps in its own subprocess, the threshold set before the job starts; reported:
seconds per optimiser step (the run's metrics.json) and peak memory, and the ratios masked /
gathered. Alternating repeats (``--repeats``) because the machine is shared.

Usage: python benchmarks/knn_step.py [--config configs/los_loop.yaml] [--steps 100]
       [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_runs import compare  # noqa: E402

PATHS = {"gathered": 0, "masked": 2**62}  # MASKED_SCORES: never / always all pairs


if __name__ == "__main__":
    compare(
        __doc__,
        {
            path: {
                "overrides": ["model.backend=knn"],
                "patch": ("pipeline.model.attention", "MASKED_SCORES", threshold),
            }
            for path, threshold in PATHS.items()
        },
    )
