"""Evaluation: metrics, Diebold-Mariano and Moran tests, variography, diagnostics, summary."""
