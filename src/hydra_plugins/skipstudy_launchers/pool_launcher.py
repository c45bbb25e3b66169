"""``hydra/launcher=pool``: run a sweep's jobs in parallel on one machine, one GPU per job.

Why a launcher of our own: none of Hydra's launchers gives one-GPU-per-job on a multi-GPU
box. The basic launcher runs jobs one after another in the sweep's own process. The joblib
launcher runs N jobs at once but cannot tell a job which GPU is free; pinning a job to
``job number % GPU count`` puts two jobs on one GPU as soon as run times differ (a 110-layer
net next to a 20-layer one) while another GPU idles. submitit's local executor starts every
job at once, and Ray needs a cluster runtime for what is a queue and a few processes. Here:

- each job runs as its own single run, ``python -m skipstudy.train <job overrides>
  hydra.mode=RUN hydra.run.dir=<sweep dir>/<job subdir>`` (see :mod:`skipstudy.sweep.jobs`),
  so it has its own CUDA context and memory, its crash cannot take the sweep down, and
  Lightning's DDP (which re-executes ``sys.argv`` for ranks > 0) relaunches that job only;
- ``workers`` threads take jobs in order; before starting its process a job takes
  ``gpus_per_job`` ids from a queue of free GPU ids (``CUDA_VISIBLE_DEVICES=<ids>``) and puts
  them back when the process ends, so no two jobs ever share a GPU and a job waits while
  all GPUs are busy;
- a failed job does not stop the others. At the end the launcher lists every failed job's
  overrides with a one-line reason (its ``Error: ...`` line or exception) and the sweep exits
  with status 1. ``<sweep dir>/jobs.json`` records every job's status, reason, GPUs and time;
  ``<sweep dir>/.pool/job<#>.log`` holds each job's stdout and stderr.

With no GPU (or ``hydra.launcher.gpus=[]``) it runs ``workers`` CPU jobs at once, each with
``OMP_NUM_THREADS`` = cores / workers unless set, so parallel jobs do not oversubscribe the CPU.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.

import json
import logging
import os
import queue
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

# The child writes its task function's return value here (see ReturnValueWriter).
RETURN_ENV = "SKIPSTUDY_POOL_RETURN"
# Per-job files of the launcher live in <sweep dir>/.pool/, not in the job's run directory:
# skipstudy.train removes the run directory of a job it refuses (bad input leaves no run
# behind), and the job's output must survive to say why.
POOL_DIR = ".pool"
# Job statuses that count as done (a diverged run is a result, not a failure).
DONE = ("completed", "diverged")


@dataclass
class PoolLauncherConf:
    _target_: str = "hydra_plugins.skipstudy_launchers.pool_launcher.PoolLauncher"
    # Jobs running at once. null: one per free GPU slot (GPUs // gpus_per_job), 1 without a GPU.
    workers: Optional[int] = None
    # GPU ids to hand out (e.g. [0, 2, 3]); null: every visible GPU (CUDA_VISIBLE_DEVICES or all);
    # []: CPU jobs only.
    gpus: Optional[Any] = None
    # GPUs each job takes from the queue (e.g. 2 with trainer=ddp trainer.devices=2).
    gpus_per_job: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="pool", node=PoolLauncherConf, provider="skipstudy")


class JobFailed(Exception):
    """A pool job's process ended with a non-zero status; the message is the one-line reason."""


class SweepFailed(SystemExit):
    """Ends the sweep with status 1 after every job has run; the message lists the failures.

    A ``SystemExit`` so that Hydra prints the list as it is, without a traceback of the
    launcher: the failures happened in other processes and their logs hold the details.
    """

    def __init__(self, summary: str) -> None:
        super().__init__(summary)


class ReturnValueWriter(Callback):
    """Hydra callback in the job's process: writes the task function's return value (or the
    exception's first line) to ``$SKIPSTUDY_POOL_RETURN`` for the launcher to read."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        path = os.environ.get(RETURN_ENV)
        if not path:
            return
        value = job_return._return_value
        doc: dict[str, Any] = {"status": job_return.status.name}
        if job_return.status == JobStatus.COMPLETED:
            doc["return_value"] = value
        else:
            first = (str(value).strip().splitlines() or [""])[0]
            doc["error"] = f"{type(value).__name__}: {first}" if first else type(value).__name__
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, default=repr))


def visible_gpus(spec: Any = None) -> list[str]:
    """GPU ids the pool hands out: ``spec`` if given, else ``CUDA_VISIBLE_DEVICES``, else all."""
    if spec is not None:
        if isinstance(spec, (int, str)):
            spec = [s for s in str(spec).split(",") if s.strip()]
        return [str(s).strip() for s in spec]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = []
        for s in env.split(","):
            s = s.strip()
            if not s or s.startswith("-"):
                break  # CUDA ignores every id after an invalid one
            ids.append(s)
        return ids
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


class GpuQueue:
    """Free GPU ids; a job takes ``per_job`` of them and gives them back when it ends.

    A queue, not ``job number % GPU count``: a job gets whichever GPU was freed first, so two
    jobs never share a GPU however their run times differ. Taking is serialised so that two
    jobs never each hold half of the GPUs they need (which would deadlock with per_job > 1).
    """

    def __init__(self, ids: Sequence[str], per_job: int) -> None:
        self.ids = list(ids)
        self.per_job = per_job
        self._free: queue.Queue[str] = queue.Queue()
        for i in self.ids:
            self._free.put(i)
        self._take = threading.Lock()

    @contextmanager
    def take(self) -> Iterator[list[str]]:
        if not self.ids:
            yield []  # CPU jobs
            return
        with self._take:
            got = [self._free.get() for _ in range(self.per_job)]
        try:
            yield got
        finally:
            for i in got:
                self._free.put(i)


@dataclass
class _Job:
    idx: int
    overrides: List[str]
    config: DictConfig
    run_dir: Path
    command: List[str]
    return_file: Path
    log_file: Path
    status: str = "pending"
    returncode: Optional[int] = None
    reason: Optional[str] = None
    gpus: Optional[List[str]] = None
    seconds: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    return_value: Any = None
    label: str = ""


def swept_labels(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Each job's overrides that differ between the jobs (the swept ones), for log lines; all
    of them when there is a single job."""
    lists = [filter_overrides(list(o)) for o in job_overrides]
    if len(lists) > 1:
        common = set(lists[0]).intersection(*map(set, lists[1:]))
        lists = [[o for o in lst if o not in common] for lst in lists]
    return [" ".join(lst) or "(no overrides)" for lst in lists]


def _diverged_exit() -> Optional[int]:
    """skipstudy.train's exit status for a run that diverged (None if it has none)."""
    try:
        from skipstudy.runs.stopping import EXIT_DIVERGED
    except ImportError:
        return None
    return EXIT_DIVERGED


class PoolLauncher(Launcher):
    def __init__(self, workers: Optional[int] = None, gpus: Any = None, gpus_per_job: int = 1) -> None:
        self.workers = workers
        self.gpus = OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus
        self.gpus_per_job = gpus_per_job
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # ------------------------------------------------------------------ planning

    def _slots(self, gpus: list[str]) -> tuple[int, int]:
        """(workers, GPU slots) after checking the launcher's settings."""
        per_job = self.gpus_per_job
        if isinstance(per_job, bool) or not isinstance(per_job, int) or per_job < 1:
            raise ValueError(f"hydra.launcher.gpus_per_job={per_job!r} must be a positive integer")
        if gpus and per_job > len(gpus):
            raise ValueError(f"hydra.launcher.gpus_per_job={per_job} but only {len(gpus)} GPU(s) are available "
                             f"({','.join(gpus)}); lower it or list more in hydra.launcher.gpus")
        slots = len(gpus) // per_job if gpus else 0
        workers = self.workers
        if workers is None:
            workers = max(slots, 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"hydra.launcher.workers={workers!r} must be a positive integer (or null: one per GPU)")
        return workers, slots

    def _plan(self, idx: int, overrides: Sequence[str], sweep_dir: Path) -> _Job:
        """The job's composed config, directory and single-run command."""
        from skipstudy.sweep.jobs import single_run_command

        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        # The job's subdir may use ${hydra:...}; resolve it as Hydra's run_job does.
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(sweep_config)
        try:
            subdir = str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
        finally:
            HydraConfig.instance().cfg = previous
        run_dir = (sweep_dir / subdir).absolute()
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = str(run_dir)
        hydra_overrides = OmegaConf.to_container(self.config.hydra.overrides.hydra)
        return_file = sweep_dir / POOL_DIR / f"job{idx}.json"
        log_file = sweep_dir / POOL_DIR / f"job{idx}.log"
        command = single_run_command(
            list(overrides), hydra_overrides, str(run_dir), job_num=idx,
            extra=[f"++hydra.callbacks.skipstudy_pool_return._target_={__name__}.ReturnValueWriter"],
        )
        return _Job(idx, list(overrides), sweep_config, run_dir, command, return_file, log_file)

    # ------------------------------------------------------------------ running

    def _env(self, job: _Job, gpus: list[str], cpu_threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # "" for CPU jobs: no job touches a GPU
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads))
        env["PYTHONUNBUFFERED"] = "1"  # the job log is current while the job runs
        env[RETURN_ENV] = str(job.return_file)
        return env

    def _run(self, job: _Job, pool: GpuQueue, cpu_threads: int) -> _Job:
        if self._stopping:
            job.status, job.reason = "cancelled", "sweep interrupted"
            return job
        with pool.take() as gpus:
            if self._stopping:
                job.status, job.reason = "cancelled", "sweep interrupted"
                return job
            job.gpus = gpus
            where = f"GPU {','.join(gpus)}" if gpus else "CPU"
            log.info(f"\t#{job.idx} : {job.label} : started on {where}")
            job.log_file.parent.mkdir(parents=True, exist_ok=True)
            job.return_file.unlink(missing_ok=True)
            log_path = job.log_file
            start = time.perf_counter()
            job.started = time.time()
            with open(log_path, "ab") as out:
                out.write(("$ " + " ".join(job.command) + "\n").encode())
                out.flush()
                proc = subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self._env(job, gpus, cpu_threads))
                with self._lock:
                    self._procs[job.idx] = proc
                try:
                    job.returncode = proc.wait()
                finally:
                    with self._lock:
                        self._procs.pop(job.idx, None)
            job.seconds = time.perf_counter() - start
            job.ended = time.time()
        self._finish(job, log_path)
        return job

    def _finish(self, job: _Job, log_path: Path) -> None:
        from skipstudy.sweep.jobs import failure_reason

        result: dict[str, Any] = {}
        if job.return_file.is_file():
            try:
                result = json.loads(job.return_file.read_text())
            except (OSError, ValueError):
                result = {}
        if job.returncode == 0 and result.get("status", "COMPLETED") == "COMPLETED":
            job.status = "completed"
            job.return_value = result.get("return_value")
            log.info(f"\t#{job.idx} : {job.label} : done in {job.seconds:.1f} s")
            return
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        reason = failure_reason(text, job.returncode)
        if job.returncode == _diverged_exit():
            # A run that diverged is a result of the study (a deep plain net), not a failed job:
            # as under the basic launcher, the sweep counts it as done and marks it diverged.
            job.status, job.reason = "diverged", reason
            log.warning(f"\t#{job.idx} : {job.label} : diverged after {job.seconds:.1f} s: {reason}")
            return
        job.status = "failed"
        if not reason.startswith("Error: ") and result.get("error"):
            reason = result["error"]  # the exception itself, as the job's Hydra reported it
        job.reason = reason
        log.error(f"\t#{job.idx} : {job.label} : FAILED after {job.seconds:.1f} s: {reason}")

    def _stop(self) -> None:
        self._stopping = True
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    # ------------------------------------------------------------------ the launcher API

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)

        gpus = visible_gpus(self.gpus)
        workers, slots = self._slots(gpus)
        workers = min(workers, len(job_overrides))
        cpu_threads = max(1, (os.cpu_count() or 1) // workers)
        where = (f"{len(gpus)} GPU(s) [{','.join(gpus)}], {self.gpus_per_job} per job" if gpus
                 else f"CPU only, {cpu_threads} thread(s) per job")
        log.info(f"Pool launcher: {len(job_overrides)} jobs, {workers} at a time, {where}; sweep dir {sweep_dir}")
        if gpus and workers > slots:
            log.info(f"{workers} workers for {slots} GPU slot(s): a job waits until a GPU is free")

        jobs = [self._plan(initial_job_idx + i, o, sweep_dir) for i, o in enumerate(job_overrides)]
        for job, label in zip(jobs, swept_labels(job_overrides)):
            job.label = label
        pool = GpuQueue(gpus, self.gpus_per_job)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool-job")
        try:
            pending = {executor.submit(self._run, job, pool, cpu_threads) for job in jobs}
            while pending:
                # A timeout keeps the main thread responsive to Ctrl-C.
                _, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        except BaseException:
            self._stop()
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        executor.shutdown(wait=True)

        self._write_status(sweep_dir, jobs)
        returns = [self._job_return(job) for job in jobs]
        failed = [job for job in jobs if job.status not in DONE]
        if failed:
            summary = self._summary(jobs, failed, sweep_dir)
            for job, ret in zip(jobs, returns):
                if job.status not in DONE:
                    ret.return_value = SweepFailed(summary)
        else:
            diverged = sum(job.status == "diverged" for job in jobs)
            note = f" ({diverged} diverged)" if diverged else ""
            log.info(f"All {len(jobs)} jobs completed{note}; sweep dir {sweep_dir}")
        return returns

    def _job_return(self, job: _Job) -> JobReturn:
        ret = JobReturn()
        ret.overrides = job.overrides
        ret.hydra_cfg = job.config
        task_cfg = OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"])
        ret.cfg = task_cfg
        ret.working_dir = os.getcwd()
        ret.task_name = JobRuntime.instance().get("name")
        if job.status in DONE:
            ret.status = JobStatus.COMPLETED
            ret.return_value = job.return_value
        else:
            ret.status = JobStatus.FAILED
            ret.return_value = JobFailed(job.reason or job.status)
        return ret

    @staticmethod
    def _summary(jobs: list[_Job], failed: list[_Job], sweep_dir: Path) -> str:
        lines = [f"Sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed, "
                 f"{len(failed)} failed:"]
        for job in failed:
            lines.append(f"  #{job.idx} {job.label}: {job.reason}")
        lines.append(f"Each job's output: {sweep_dir / POOL_DIR}/job<#>.log; all jobs: {sweep_dir / 'jobs.json'}")
        return "\n".join(lines)

    @staticmethod
    def _write_status(sweep_dir: Path, jobs: list[_Job]) -> None:
        """``<sweep dir>/jobs.json``: one entry per job (merged over the sweeper's batches)."""
        path = sweep_dir / "jobs.json"
        entries: dict[str, Any] = {}
        if path.is_file():
            try:
                entries = {str(e["num"]): e for e in json.loads(path.read_text())}
            except (OSError, ValueError, KeyError, TypeError):
                entries = {}
        for job in jobs:
            entries[str(job.idx)] = {
                "num": job.idx,
                "overrides": job.overrides,
                "dir": str(job.run_dir),
                "log": str(job.log_file),
                "status": job.status,
                "reason": job.reason,
                "returncode": job.returncode,
                "gpus": job.gpus,
                "seconds": None if job.seconds is None else round(job.seconds, 3),
                "started": job.started,
                "ended": job.ended,
            }
        ordered = [entries[k] for k in sorted(entries, key=int)]
        path.write_text(json.dumps(ordered, indent=2, default=repr))
