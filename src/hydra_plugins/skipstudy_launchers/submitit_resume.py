"""``hydra/launcher=slurm`` and ``slurm_local``: submitit's launchers, plus resume on requeue.

hydra-submitit-launcher already runs each sweep job as a SLURM array task and, when SLURM
preempts the job or its time limit nears, calls the task's ``checkpoint`` method and
requeues it. Its own ``checkpoint`` resubmits the job with the same overrides, so a requeued
job would train again from step 0. Here ``checkpoint`` resubmits it as ``resume=<job dir>``
when the job has written ``<job dir>/checkpoints/last.ckpt``: the requeued job continues from
the last checkpoint with the config it started with, in the same directory, with its
TensorBoard series cut back to that checkpoint by ``skipstudy.train``. How much work a preemption costs is set by how often ``last.ckpt`` is
written: every epoch, or every ``checkpoint.every_n_train_steps`` steps.

No `from __future__ import annotations`: Hydra's plugin scan executes this module without
registering it in sys.modules.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from omegaconf import OmegaConf, open_dict

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def job_dir(launcher: Any, sweep_overrides: List[str], job_num: int,
            singleton_state: Optional[Dict[type, Singleton]] = None) -> Tuple[Path, str]:
    """Where a job of this sweep writes: (``hydra.sweep.dir``, ``hydra.sweep.subdir``)."""
    assert launcher.hydra_context is not None and launcher.config is not None
    if singleton_state is not None:
        Singleton.set_state(singleton_state)
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(sweep_overrides))
    with open_dict(config):
        config.hydra.job.num = job_num
        if config.hydra.job.get("id") is None:
            config.hydra.job.id = f"job_id_for_{job_num}"
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(config)
    try:
        subdir = str(OmegaConf.select(config, "hydra.sweep.subdir"))
        return Path(str(config.hydra.sweep.dir)).absolute(), subdir
    finally:
        HydraConfig.instance().cfg = previous


def with_resume(sweep_overrides: List[str], sweep_dir: Path, subdir: str) -> List[str]:
    """The requeued job's overrides: ``resume=<run dir>`` when it has a last checkpoint, else
    the job's own overrides (it starts over in the same directory).

    A resumed run takes its whole config from ``<run dir>/.hydra/config.yaml`` and refuses
    overrides that would change what it trains (skipstudy/runs/dirs.py), so the job's own
    overrides go; the sweep directory and subdirectory they named are pinned instead.
    """
    from skipstudy.sweep.jobs import quote

    run_dir = sweep_dir / subdir
    if not (run_dir / LAST_CHECKPOINT).is_file():
        return list(sweep_overrides)
    return [f"resume={quote(str(run_dir))}", f"hydra.sweep.dir={quote(str(sweep_dir))}",
            f"hydra.sweep.subdir={quote(subdir)}"]


class _ResumeOnRequeue:
    """Mixin for submitit's Hydra launchers: requeued jobs resume from ``last.ckpt``."""

    def checkpoint(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                   singleton_state: Dict[type, Singleton], *args: Any, **kwargs: Any) -> Any:
        """Called by submitit in the job's process on preemption or timeout; returns the
        submission SLURM requeues (``resume=<job dir>`` once the job has a checkpoint)."""
        import submitit

        sweep_dir, subdir = job_dir(self, sweep_overrides, job_num, singleton_state)
        run_dir = sweep_dir / subdir
        overrides = with_resume(list(sweep_overrides), sweep_dir, subdir)
        resumed = any(o.startswith("resume=") for o in overrides)
        how = "from its last checkpoint" if resumed else "from the start (no checkpoint yet)"
        print(f"[skipstudy] requeued: job #{job_num} continues {how} in {run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(
            self, overrides, job_dir_key, job_num, job_id, singleton_state, *args, **kwargs
        )


try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # hydra-submitit-launcher missing: no slurm launchers (and no broken plugin scan)
    submitit_launcher = None

if submitit_launcher is not None:

    class SlurmLauncher(_ResumeOnRequeue, submitit_launcher.SlurmLauncher):
        pass

    class LocalLauncher(_ResumeOnRequeue, submitit_launcher.LocalLauncher):
        pass

