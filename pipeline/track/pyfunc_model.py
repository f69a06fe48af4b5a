"""The registered model's code (MLflow's models from code): MLflow stores this file with the
model and runs it at load. It names the forecaster from the installed pipeline package; the
model's own files are its weights (loaded with ``weights_only=True``), model.json and
network.npz (no pickle)."""

from pipeline.track.tracking import set_forecast_model

set_forecast_model()
