"""DDP inside a Hydra multirun. Lightning starts ranks > 0 of ``strategy=ddp`` by re-executing
this process's command line, in a multirun the whole sweep: every rank would start the sweep
again. So such a job runs as a single run in a fresh process (:mod:`.jobs`). Not affected: the
pool launcher, SLURM/torchrun (ranks exist before Python starts), ``ddp_fork``."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


class JobProcessFailed(RuntimeError):
    """The job's own process failed; the message is its one-line reason."""


def needs_own_process(trainer: Any) -> bool:
    """A multirun job whose ``trainer.fit`` would start ranks > 0 as fresh interpreters: Lightning's
    public ``launcher.is_interactive_compatible`` is False for its script launcher (re-executes
    ``sys.argv``) and for ``ddp_spawn``, which would not restart the sweep (one process start)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    launcher = getattr(trainer.strategy, "launcher", None)
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            and launcher is not None and not launcher.is_interactive_compatible
            and not (environment is not None and environment.creates_processes_externally) and trainer.num_devices > 1)


def run_in_own_process(run_dir: str | os.PathLike) -> dict[str, float]:
    """Run the current job as a single run writing into ``run_dir``; its output passes through.
    Returns its last logged scalars; raises JobProcessFailed with the reason of a failure."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd
    from omegaconf import OmegaConf

    from skipstudy.analysis.logs import load_run
    from skipstudy.launchers.jobs import failure_reason, single_run_command

    hc = HydraConfig.get()
    cmd = single_run_command(OmegaConf.to_container(hc.overrides.task), OmegaConf.to_container(hc.overrides.hydra),
                             str(Path(run_dir).absolute()), job_num=hc.job.num,
                             extra=["hydra.output_subdir=null"])  # the sweep wrote this job's .hydra/ already
    print("[skipstudy] DDP inside a multirun: running this job as a single run in its own process:\n  "
          + " ".join(cmd), file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            cwd=get_original_cwd())
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if returncode != 0:
        raise JobProcessFailed(failure_reason("".join(tail), returncode))
    return {tag: s.last() for tag, s in load_run(run_dir).scalars.items()}
