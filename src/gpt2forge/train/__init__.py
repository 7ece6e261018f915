"""Training: optimizer and schedule, checkpoints, metrics, and the loop."""
