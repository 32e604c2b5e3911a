"""Training engine: Trainer, hooks, checkpoints, schedules, run directories."""
