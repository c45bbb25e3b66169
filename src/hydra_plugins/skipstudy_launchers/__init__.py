"""skipstudy's Hydra launchers: ``pool`` and ``slurm``/``slurm_local`` (resuming requeued jobs).
Hydra imports every module here whenever any Hydra app starts: keep imports light."""
