"""The one training engine: loop, DDP, AMP, optimizer, schedule, checkpoints, evaluation, logging."""
