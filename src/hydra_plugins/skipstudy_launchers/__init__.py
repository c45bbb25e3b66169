"""skipstudy's Hydra launchers: ``pool`` (parallel jobs, a free GPU each) and ``slurm``/``slurm_local``
(submitit's, resuming requeued jobs). Hydra imports every module here whenever any Hydra app
starts: keep imports light."""
