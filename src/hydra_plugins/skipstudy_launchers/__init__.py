"""skipstudy's Hydra launchers (found by Hydra's plugin scan of the ``hydra_plugins`` namespace).

- ``hydra/launcher=pool``: parallel jobs on one machine, each in its own process, one free GPU
  each (a queue of GPU ids), failure-tolerant; see :mod:`.pool_launcher`.
- ``hydra/launcher=slurm`` / ``slurm_local`` (``conf/hydra/launcher/*.yaml``): submitit's
  launchers whose jobs resume from their last checkpoint when SLURM requeues them; see
  :mod:`.submitit_resume`.

Keep imports here light: Hydra imports every module of this package whenever any Hydra app
starts.
"""
