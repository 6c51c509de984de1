"""Training, evaluation, checkpoints and the process/device runtime."""
