"""DDP inside a Hydra multirun: each job's ranks must not relaunch the sweep.

Lightning starts ranks > 0 of a ``strategy=ddp`` run by re-executing this process's command
line (``_SubprocessScriptLauncher``; with Hydra, ``sys.argv`` plus ``hydra.run.dir=<run
dir>``). In a multirun that command line is ``python -m skipstudy.train -m a=1,2 ...``, so
every rank > 0 would start the whole sweep again, and write into the wrong directory. (The
lightning-hydra-template and Lightning itself document this as unsupported.)

The fix here: a multirun job whose Trainer would do that is handed to a fresh process that
runs it as a single run (:func:`skipstudy.launchers.jobs.single_run_command`), whose
``sys.argv`` holds only that job; Lightning then starts that job's ranks and nothing else.
The job's checks (data, model options, monitor layers) have already run in the sweep's
process by then, so a bad value still fails before anything starts. ``ddp_spawn`` would be
the other way out, but it pickles the data module and network to every rank and returns
only rank 0's results; the fresh process is the same code path as a single run.

Not affected: the ``pool`` launcher (each job already is a single run), SLURM/torchrun
(``creates_processes_externally``: the ranks exist before Python starts) and
``ddp_spawn``/``ddp_fork`` (no re-execution).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


class JobProcessFailed(RuntimeError):
    """The job's own single-run process ended with a non-zero status."""


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def relaunches_command_line(trainer: Any) -> bool:
    """True when ``trainer.fit`` would start ranks > 0 by re-executing ``sys.argv``."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return False
    if launcher.cluster_environment.creates_processes_externally:
        return False
    return launcher.num_processes > 1


def needs_own_process(trainer: Any) -> bool:
    """A multirun job whose DDP ranks would relaunch the sweep; see the module docstring."""
    return in_multirun() and relaunches_command_line(trainer)


def last_scalars(run_dir: str | os.PathLike) -> dict[str, float]:
    """The last value of every scalar series in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A reservoir of size 1 keeps each tag's most recent value.
    guidance = {"scalars": 1, "histograms": 1, "images": 1, "tensors": 1, "compressedHistograms": 1, "audio": 1}
    values: dict[str, tuple[int, float]] = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance=guidance)
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            ev = acc.Scalars(tag)[-1]
            if tag not in values or ev.step >= values[tag][0]:
                values[tag] = (ev.step, float(ev.value))
    return {tag: value for tag, (_, value) in values.items()}


def run_in_own_process(run_dir: str | os.PathLike) -> dict[str, float]:
    """Run the current multirun job as a single run in a fresh process, writing into
    ``run_dir``; returns the run's last logged scalars (``val/acc``, ...).

    The job's stdout and stderr pass through; stderr is also kept to name the reason of a
    failure.

    Raises:
        JobProcessFailed: the process failed; the message is its one-line reason.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd
    from omegaconf import OmegaConf

    from skipstudy.launchers.jobs import failure_reason, single_run_command

    hc = HydraConfig.get()
    cmd = single_run_command(
        OmegaConf.to_container(hc.overrides.task),
        OmegaConf.to_container(hc.overrides.hydra),
        str(Path(run_dir).absolute()),
        job_num=hc.job.get("num"),
        # The sweep already wrote this job's .hydra/ (its multirun config); keep it.
        extra=["hydra.output_subdir=null"],
    )
    print(f"[skipstudy] DDP inside a multirun: running this job as a single run in its own process:\n  "
          + " ".join(cmd), file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", cwd=get_original_cwd())
    assert proc.stderr is not None
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
    return last_scalars(run_dir)
