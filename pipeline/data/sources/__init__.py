"""Raw sensor data sources and their registry: ``open_source`` by ``data.source.kind``.

Every source answers the same questions: which sensors (ids, positions), which regular time
axis, which features, and ``read(g0, g1, sensors)``: values [g1 - g0, n, F] float32 (NaN where
missing) for time steps [g0, g1) of the axis at the given source sensor indices. ``read`` runs
on Dask workers (see pipeline/data/preprocess.py), so sources hold only paths and small index
arrays. Scans over big files go through the ``pmap`` callable that preprocessing passes in (a
Dask map), so this package needs no cluster of its own. ``base`` holds what every format
shares (the ``Source`` record, id, time and position checks); one module per format.

Every problem in the input is a :class:`SourceError` that names the file, the line or row, the
sensor or the config key, and what to do.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import DataConfig
from pipeline.data.sources.base import PMap, Source, SourceError
from pipeline.data.sources.dataset import open_xarray
from pipeline.data.sources.generated import open_synthetic
from pipeline.data.sources.hdf5 import open_hdf5
from pipeline.data.sources.long import open_long
from pipeline.data.sources.wide_csv import open_wide_csv

__all__ = ["OPENERS", "PMap", "Source", "SourceError", "open_source"]

OPENERS: dict[str, Callable[[DataConfig, PMap], Source]] = {
    "synthetic": open_synthetic,
    "wide_csv": open_wide_csv,
    "long_csv": open_long,
    "parquet": open_long,
    "hdf5": open_hdf5,
    "xarray": open_xarray,
}


def open_source(cfg: DataConfig, pmap: PMap = lambda f, xs: list(map(f, xs))) -> Source:
    """Open and validate the source of ``cfg.source.kind``."""
    if cfg.source.kind not in OPENERS:
        raise SourceError(
            f"data.source.kind = {cfg.source.kind!r} is unknown; one of {sorted(OPENERS)}"
        )
    return OPENERS[cfg.source.kind](cfg, pmap)
