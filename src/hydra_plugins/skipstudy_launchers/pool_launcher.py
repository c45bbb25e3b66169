"""``hydra/launcher=pool``: a sweep's jobs in parallel on one machine, one free GPU each (README,
Launchers). None of Hydra's launchers hands a job the GPU that is free: joblib's ``job % GPUs``
doubles up once run times differ, submitit's local executor starts every job at once. Each job
runs as a single run in its own process (:mod:`skipstudy.launchers.jobs`: its own CUDA context,
a crash that cannot take the sweep down, DDP that relaunches that job only).
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.

import json
import logging
import os
import queue
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

RETURN_ENV = "SKIPSTUDY_POOL_RETURN"  # where the job writes its return value (ReturnValueWriter)
# Outside the job's run directory: skipstudy.train removes the directory of a job it refuses,
# and the job's output must survive to say why.
POOL_DIR = ".pool"
DONE = ("completed", "diverged")  # a diverged run is a result of the study, not a failure


@dataclass
class PoolLauncherConf:
    _target_: str = "hydra_plugins.skipstudy_launchers.pool_launcher.PoolLauncher"
    workers: Optional[int] = None  # null: one per GPU slot (GPUs // gpus_per_job), 1 without a GPU
    gpus: Optional[Any] = None  # ids to hand out; null: every visible GPU; []: CPU jobs only
    gpus_per_job: int = 1  # e.g. 2 with trainer=ddp trainer.devices=2


ConfigStore.instance().store(group="hydra/launcher", name="pool", node=PoolLauncherConf, provider="skipstudy")


class SweepFailed(SystemExit):
    """Ends the sweep with status 1 after every job ran. A SystemExit, so Hydra prints the list of
    failures without a traceback of the launcher (the failures happened in other processes)."""


class ReturnValueWriter(Callback):
    """In the job's process: its task function's return value to ``$SKIPSTUDY_POOL_RETURN``, for
    sweepers that use it (a failure's reason comes from the job's log)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if (path := os.environ.get(RETURN_ENV)) and job_return.status == JobStatus.COMPLETED:
            Path(path).write_text(json.dumps({"return_value": job_return.return_value}, default=repr))


def visible_gpus(spec: Any = None) -> List[str]:
    """``spec`` (a list or "0,2"), else ``CUDA_VISIBLE_DEVICES``, else every GPU torch sees."""
    if spec is not None:
        return [str(s).strip() for s in (str(spec).split(",") if isinstance(spec, (int, str)) else spec) if str(s).strip()]
    if (env := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        # CUDA ignores every id after an invalid one (e.g. -1).
        return list(takewhile(lambda s: s and not s.startswith("-"), (s.strip() for s in env.split(","))))
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class GpuQueue:
    """Free sets of ``per_job`` GPU ids: a job takes whichever set was freed first (not
    ``job % GPUs``), so no two jobs share a GPU however their run times differ."""

    def __init__(self, ids: Sequence[str], per_job: int) -> None:
        self.cpu_only = not ids
        self._free: "queue.Queue[List[str]]" = queue.Queue()
        for k in range(0, len(ids) - per_job + 1, per_job):
            self._free.put(list(ids[k:k + per_job]))

    @contextmanager
    def take(self) -> Iterator[List[str]]:
        got = [] if self.cpu_only else self._free.get()
        try:
            yield got
        finally:
            if got:
                self._free.put(got)


@dataclass
class _Job:
    idx: int
    overrides: List[str]
    config: DictConfig
    run_dir: Path
    command: List[str]
    log_file: Path
    return_file: Path
    label: str
    status: str = "pending"
    returncode: Optional[int] = None
    reason: Optional[str] = None
    gpus: Optional[List[str]] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    return_value: Any = None


def swept_labels(job_overrides: Sequence[Sequence[str]]) -> List[str]:
    """Each job's overrides that not every job shares (all of them for a single job)."""
    lists = [filter_overrides(list(o)) for o in job_overrides]
    common = set(lists[0]).intersection(*map(set, lists[1:])) if len(lists) > 1 else set()
    return [" ".join(o for o in lst if o not in common) or "(no overrides)" for lst in lists]


class PoolLauncher(Launcher):
    def __init__(self, workers: Optional[int] = None, gpus: Any = None, gpus_per_job: int = 1) -> None:
        self.workers = workers
        self.gpus = OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus
        self.gpus_per_job = gpus_per_job
        self._procs: set = set()
        self._stopping = False

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _plan(self, idx: int, overrides: Sequence[str], sweep_dir: Path, label: str) -> _Job:
        """The job's config, directory and single-run command."""
        from skipstudy.launchers.jobs import job_config, single_run_command

        config, _, subdir = job_config(self.hydra_context, self.config, overrides, idx)
        run_dir = (sweep_dir / subdir).absolute()
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(run_dir)
        command = single_run_command(
            list(overrides), OmegaConf.to_container(self.config.hydra.overrides.hydra), str(run_dir), job_num=idx,
            extra=[f"++hydra.callbacks.skipstudy_pool_return._target_={__name__}.ReturnValueWriter"])
        pool_dir = sweep_dir / POOL_DIR
        return _Job(idx, list(overrides), config, run_dir, command, pool_dir / f"job{idx}.log",
                    pool_dir / f"job{idx}.json", label)

    def _run(self, job: _Job) -> None:
        from skipstudy.launchers.jobs import failure_reason
        from skipstudy.runs.stopping import EXIT_DIVERGED

        with self._free_gpus.take() as gpus:
            if self._stopping:
                job.status, job.reason = "cancelled", "sweep interrupted"
                return
            job.gpus, job.started = gpus, time.time()
            log.info(f"\t#{job.idx} : {job.label} : started on {'GPU ' + ','.join(gpus) if gpus else 'CPU'}")
            env = {"OMP_NUM_THREADS": str(self._cpu_threads), **os.environ,
                   "CUDA_VISIBLE_DEVICES": ",".join(gpus),  # "": CPU jobs touch no GPU
                   "PYTHONUNBUFFERED": "1", RETURN_ENV: str(job.return_file)}  # unbuffered: the log is current
            job.log_file.parent.mkdir(parents=True, exist_ok=True)
            job.return_file.unlink(missing_ok=True)
            with open(job.log_file, "ab") as out:
                out.write(("$ " + " ".join(job.command) + "\n").encode())
                out.flush()
                proc = subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                self._procs.add(proc)
                job.returncode = proc.wait()
                self._procs.discard(proc)
            job.ended = time.time()
        seconds = job.ended - job.started
        if job.returncode == 0:
            result = json.loads(job.return_file.read_text()) if job.return_file.is_file() else {}
            job.status, job.return_value = "completed", result.get("return_value")
            log.info(f"\t#{job.idx} : {job.label} : done in {seconds:.1f} s")
            return
        job.reason = failure_reason(job.log_file.read_text(errors="replace"), job.returncode)
        # As under the basic launcher, a diverged run (a deep plain net) counts as done.
        job.status = "diverged" if job.returncode == EXIT_DIVERGED else "failed"
        (log.warning if job.status == "diverged" else log.error)(
            f"\t#{job.idx} : {job.label} : {job.status.upper() if job.status == 'failed' else job.status} "
            f"after {seconds:.1f} s: {job.reason}")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from pydantic import create_model

        from skipstudy.keys import Options, key, validate

        gpus = visible_gpus(self.gpus)
        ranges = create_model("PoolLauncher", __base__=Options, workers=(Optional[int], key(None, ge=1, eg=2)),
                              gpus_per_job=(int, key(1, ge=1, le=len(gpus) or None)))
        validate(ranges, {"workers": self.workers, "gpus_per_job": self.gpus_per_job}, "hydra.launcher.", "the launcher")
        workers = min(self.workers or max(len(gpus) // self.gpus_per_job, 1), len(job_overrides))
        self._cpu_threads = max(1, (os.cpu_count() or 1) // workers)
        self._free_gpus = GpuQueue(gpus, self.gpus_per_job)
        where = (f"{len(gpus)} GPU(s) [{','.join(gpus)}], {self.gpus_per_job} per job (a job waits for a free one)"
                 if gpus else f"CPU only, {self._cpu_threads} thread(s) per job")
        log.info(f"Pool launcher: {len(job_overrides)} jobs, {workers} at a time, {where}; sweep dir {sweep_dir}")

        jobs = [self._plan(initial_job_idx + i, o, sweep_dir, label)
                for i, (o, label) in enumerate(zip(job_overrides, swept_labels(job_overrides)))]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool-job") as executor:
            try:
                list(executor.map(self._run, jobs))  # raises a job thread's error, or Ctrl-C
            except BaseException:
                self._stopping = True
                for proc in list(self._procs):
                    proc.terminate()
                executor.shutdown(cancel_futures=True)
                raise

        self._write_status(sweep_dir / "jobs.json", jobs)
        failed = [job for job in jobs if job.status not in DONE]
        summary = "\n".join([f"Sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed, "
                             f"{len(failed)} failed:", *(f"  #{job.idx} {job.label}: {job.reason}" for job in failed),
                             f"Each job's output: {sweep_dir / POOL_DIR}/job<#>.log; all jobs: {sweep_dir / 'jobs.json'}"])
        if not failed:
            diverged = sum(job.status == "diverged" for job in jobs)
            log.info(f"All {len(jobs)} jobs completed{f' ({diverged} diverged)' if diverged else ''}; sweep dir {sweep_dir}")
        # Hydra raises the first failed job's value: here, the list of every failure.
        return [JobReturn(overrides=job.overrides, hydra_cfg=job.config, working_dir=os.getcwd(),
                          cfg=OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"]),
                          task_name=JobRuntime.instance().get("name"),
                          status=JobStatus.COMPLETED if job.status in DONE else JobStatus.FAILED,
                          _return_value=job.return_value if job.status in DONE else SweepFailed(summary))
                for job in jobs]

    @staticmethod
    def _write_status(path: Path, jobs: List[_Job]) -> None:
        """One entry per job, merged over the sweeper's batches (each is a launch)."""
        entries = {e["num"]: e for e in json.loads(path.read_text())} if path.is_file() else {}
        for job in jobs:
            entries[job.idx] = {
                "num": job.idx, "overrides": job.overrides, "dir": str(job.run_dir), "log": str(job.log_file),
                "status": job.status, "reason": job.reason, "returncode": job.returncode, "gpus": job.gpus,
                "seconds": None if job.ended is None else round(job.ended - job.started, 3),
                "started": job.started, "ended": job.ended}
        path.write_text(json.dumps([entries[k] for k in sorted(entries)], indent=2, default=repr))
