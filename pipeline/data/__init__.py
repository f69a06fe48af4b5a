"""Raw sensor data -> Zarr store -> windows: sources, preprocess (Dask), store, stream."""
