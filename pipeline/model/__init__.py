"""The forecaster: covariance bias, attention backends (dense, knn, block), losses, export."""
