"""Training: optimiser, train step, checkpoints, metrics and the GRPO loop."""
