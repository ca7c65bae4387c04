"""SimMatch semi-supervised training at ImageNet scale: DALI pipelines, DDP + AMP, SLURM."""

__version__ = "0.1.0"
