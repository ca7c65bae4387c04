"""Starting the ranks of a run on this machine (`local`: tools/train.py --nproc N); SLURM jobs are
the top-level `slurm` package."""
