"""Spatially-informed transformers: a geostatistical covariance prior in the attention of a
spatio-temporal forecaster, trained at scale.

The package reads as the data flow (docs/design.md):

- ``data``: raw sources -> ``preprocess`` (Dask) -> Zarr ``store`` -> ``stream`` of windows;
- ``model``: covariance bias, attention backends, the forecaster, its losses and its export;
- ``train``: the DeepSpeed ``engine``, ``checkpoint``s and the training ``loop``;
- ``evaluate``: metrics, statistical tests, variography, diagnostics and the summary;
- ``track``: MLflow tracking and registry, Ray Tune sweeps.

At the top: ``config`` (one typed config), ``kernels`` (the table of covariance families),
``cli`` and ``errors``. Imports run downward only: ``data`` and ``model`` never import
``train``, ``evaluate`` or ``track``.
"""

__version__ = "0.1.0"
