"""Tracking: MLflow runs, figures and model registry; Ray Tune sweeps."""
