"""The synthetic field (pipeline/data/synthetic.py) as a source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.sources.base import PMap, Source
from pipeline.data.synthetic import SyntheticField


@dataclass
class SyntheticSource(Source):
    field_: SyntheticField | None = None

    def read(self, g0: int, g1: int, sensors: np.ndarray) -> np.ndarray:
        values = self.field_.values(g0, g1, sensors)  # [t, n]
        values[~self.field_.observed(g0, g1, sensors)] = np.nan  # outages: unobserved
        return values[..., None]


def open_synthetic(cfg: DataConfig, pmap: PMap) -> SyntheticSource:
    syn = cfg.synthetic
    fld = SyntheticField(syn)
    n = syn.num_sensors
    time = pd.date_range(pd.Timestamp(syn.start, tz="UTC"), periods=syn.num_steps, freq=syn.freq)
    return SyntheticSource(
        sensor_ids=fld.sensor_ids(),
        coords=fld.coords(np.arange(n)),
        crs="xy",
        time=time.as_unit("ns").asi8,
        freq=syn.freq,
        features=["value"],
        truth=fld.truth(),
        field_=fld,
    )
