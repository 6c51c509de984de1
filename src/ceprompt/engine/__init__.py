"""Training, evaluation, metrics and plots, the process/device runtime and CPU threads."""
