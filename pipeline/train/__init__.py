"""Training: the DeepSpeed engine and process group, checkpoints, and the training loop."""
