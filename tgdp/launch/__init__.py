"""Launching tgdp on Slurm clusters (docs/cluster.md).

- `slurm/pretrain.sbatch`: one task per node runs `accelerate launch`; a warning signal before the
  time limit makes the run checkpoint, and the batch script requeues the job, which resumes.
- `python -m tgdp.launch` (tgdp/launch/submit.py): the same run through submitit; a Checkpointable
  job requeues a fresh instance that finds the newest complete checkpoint itself.
- `tgdp/launch/checks.py`: the checks both run before anything is queued.
"""
