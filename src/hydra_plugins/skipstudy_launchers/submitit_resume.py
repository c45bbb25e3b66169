"""``hydra/launcher=slurm`` and ``slurm_local``: submitit's launchers, resuming on requeue.
hydra-submitit-launcher's ``checkpoint`` requeues a preempted job with its own overrides, to train
again from step 0; here a job with ``checkpoints/last.ckpt`` is requeued as ``resume=<job dir>``."""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules.

from pathlib import Path
from typing import Any, Dict, List

from hydra.core.singleton import Singleton
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


class _ResumeOnRequeue:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """In the job's process, which composes the job's config: what skipstudy's entry points
        register before Hydra composes (the process did not start at one)."""
        from skipstudy.overrides import register

        register()
        return super().__call__(*args, **kwargs)

    def checkpoint(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                   singleton_state: Dict[type, Singleton], *args: Any, **kwargs: Any) -> Any:
        """In the preempted job's process: the submission SLURM requeues. A resumed run takes its
        config from its ``.hydra/`` (and refuses overrides that change what it trains), so only the
        sweep directory and subdirectory are pinned beside ``resume=``."""
        import submitit

        from skipstudy.launchers.jobs import job_config, quote

        Singleton.set_state(singleton_state)
        _, sweep_dir, subdir = job_config(self.hydra_context, self.config, sweep_overrides, job_num)
        overrides = list(sweep_overrides)  # may be empty: a sweep over hydra/... choices only
        resumed = (sweep_dir / subdir / LAST_CHECKPOINT).is_file()
        if resumed:
            overrides = [f"resume={quote(str(sweep_dir / subdir))}", f"hydra.sweep.dir={quote(str(sweep_dir))}",
                         f"hydra.sweep.subdir={quote(subdir)}"]
        how = "from its last checkpoint" if resumed else "from the start (no checkpoint yet)"
        print(f"[skipstudy] requeued: job #{job_num} continues {how} in {sweep_dir / subdir}", flush=True)
        return submitit.helpers.DelayedSubmission(self, overrides, job_dir_key, job_num, job_id, singleton_state,
                                                  *args, **kwargs)


class SlurmLauncher(_ResumeOnRequeue, submitit_launcher.SlurmLauncher):
    pass


class LocalLauncher(_ResumeOnRequeue, submitit_launcher.LocalLauncher):
    pass
