"""SLURM launching: submitit jobs that requeue on preemption/time-out and resume (docs/SLURM.md)."""
