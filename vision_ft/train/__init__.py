"""Training: optimizer rules, step, loop, checkpoints and metrics."""
