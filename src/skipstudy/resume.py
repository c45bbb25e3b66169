"""Resuming a killed run exactly: what a checkpoint holds beyond Lightning's own state, and how
the run directory's logs are cut back to the checkpoint.

Lightning 2.6 restores the weights, the optimizer, the schedulers and the loops' progress
counters from a checkpoint. For a resumed run to log the same numbers as an uninterrupted one,
:class:`RunState` adds what Lightning leaves out:

* **RNG states** (torch CPU and CUDA, numpy, Python), restored when training starts again.
* **The data-loader position.** With a non-stateful loader, Lightning restarts a half-done
  epoch from its first batch (it only warns). :class:`EpochLoader` wraps the training loader:
  a resumed epoch is replayed from the RNG states of the epoch's start (so a shuffle drawn
  from the global RNG, as ``DataLoader(shuffle=True)`` does, gives the same order; samplers
  seeded per epoch, like :class:`~skipstudy.data.augment.EpochSampler` or the DistributedSampler
  Lightning puts in under DDP, give it anyway) and the batches already trained on are skipped
  (under DDP each rank skips its own). Skipping iterates them: it costs the loading of
  those batches, no forward or backward pass.
* **Half-finished epoch means.** ``train/loss_epoch`` and ``train/acc_epoch`` accumulate over
  the epoch; Lightning 2.x does not checkpoint its result collection nor torchmetrics' states
  (they are not persistent buffers), so a mid-epoch resume would average only the batches
  after the restart. Both are saved and merged back in.
* **What the event files held.** At every checkpoint the TensorBoard writer is flushed and
  the size of each ``events.out.tfevents.*`` file is recorded. When a resumed run starts
  training, :func:`cut_logs` truncates each file to that size and deletes event files written after the checkpoint, so
  every tag keeps each step exactly once. The metrics Lightning computes for the checkpoint's
  own step but writes only after the checkpoint hook (the step's ``train/loss`` is logged
  after ``on_train_batch_end``, the epoch means after ``on_train_epoch_end``) are stored in
  the checkpoint and written again on resume.

TensorBoard's own answer to restarts (an event with ``SessionLog.START`` at the restart step
makes *its* loader discard later steps) is not used: tbparse and our report read each event
file on its own, where no purge applies; cutting the files makes every reader agree.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint

from skipstudy.layout import EVENT_PREFIX

log = logging.getLogger(__name__)

# The gradient monitor's exports (skipstudy.monitor.writers.SeriesExport): one row per recorded step.
EXPORTS = ("grad_stats.json", "grad_stats.csv")
STATE_KEY = "RunState"


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_callbacks(ckpt: Any, run_dir: str | os.PathLike) -> list[Checkpoint]:
    """``<run>/checkpoints/``: the best by ``checkpoint.monitor`` and ``last.ckpt``."""
    dirpath = Path(run_dir) / "checkpoints"
    out: list[Checkpoint] = []
    if ckpt.monitor and ckpt.save_top_k:
        out.append(ModelCheckpoint(dirpath=str(dirpath), filename="best-{epoch}-{step}", monitor=ckpt.monitor,
                                   mode=ckpt.mode, save_top_k=ckpt.save_top_k, auto_insert_metric_name=False))
    if ckpt.save_last:
        out.append(LastCheckpoint(dirpath / "last.ckpt", ckpt.every_n_train_steps))
    return out


class LastCheckpoint(Checkpoint):
    """``last.ckpt``, what ``resume=`` continues from: at the end of every epoch (after
    validation and the best checkpoint) and every ``every_n_train_steps`` optimizer steps,
    so a killed run loses at most that many steps.

    Not a ModelCheckpoint: a monitored ModelCheckpoint skips step saves until its metric
    exists (all of epoch 0), and one without a monitor never saves ``last`` at epoch ends.
    No step save on an epoch's last batch: Lightning resumes such a checkpoint in the next
    epoch, skipping the validation and epoch end it had not reached yet.
    """

    def __init__(self, path: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        self.path = Path(path)
        self.every_n_train_steps = every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if (n and trainer.global_step % n == 0 and not trainer.fit_loop._should_accumulate()
                and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            trainer.save_checkpoint(str(self.path), weights_only=False)  # written to a temporary file, then renamed

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)


# ---------------------------------------------------------------------------- RNG


def rng_states() -> dict[str, Any]:
    """Every global RNG a training step may draw from, as tensors and plain values (what
    ``torch.load(weights_only=True)``, Lightning's default, accepts)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer visible GPUs than when saved
            torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Draws inside do not move the global RNGs."""
    saved = rng_states()
    try:
        yield
    finally:
        set_rng_states(saved)


# ---------------------------------------------------------------------------- loader


class EpochLoader:
    """The training loader, able to resume an epoch part-way through.

    Each pass records the RNG states it starts from. When a pass starts with
    ``done_batches() > 0`` (Lightning restored a checkpoint taken mid-epoch) and the states
    of that epoch's start came with the checkpoint, the pass replays the epoch from those
    states and drops the batches already done, without moving the global RNGs; training then
    continues with exactly the batches the uninterrupted run would have seen.

    Lightning finds the sampler through ``sampler``/``batch_sampler`` (it calls ``set_epoch``
    on it every epoch), and takes the epoch length from ``len()``.
    """

    def __init__(self, loader: Any, done_batches: Callable[[], int]) -> None:
        self.loader = loader
        self._done_batches = done_batches
        self.epoch_rng: dict[str, Any] | None = None  # states at the start of the current pass
        self.resume_rng: dict[str, Any] | None = None  # from a checkpoint, for the first pass

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    def __getattr__(self, name: str) -> Any:
        # dataset, batch_size, ...: whatever a reader of the loader asks for.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        # A generator: the body runs at the first next(), after Lightning has restored the
        # progress counters and called set_epoch, never at iter() time.
        skip = int(self._done_batches())
        resume_rng, self.resume_rng = self.resume_rng, None
        if skip and resume_rng is not None:
            self.epoch_rng = resume_rng
            with isolated_rng():
                set_rng_states(resume_rng)
                it = iter(self.loader)
                if not _advance(it, skip):
                    return
        else:
            self.epoch_rng = rng_states()
            it = iter(self.loader)
            if skip:
                # A checkpoint without this epoch's start states (written by another tool):
                # the order may differ from the original pass; at least no batch count is off.
                log.warning("resuming mid-epoch without the epoch's RNG states; the data order may differ")
                if not _advance(it, skip):
                    return
        yield from it


def _advance(it: Iterator[Any], n: int) -> bool:
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            return False
    return True


def needs_lightning_sampler(loader: Any, world_size: int) -> bool:
    """True when Lightning must still put a DistributedSampler into ``loader`` (DDP), which it
    does only for a bare ``DataLoader``: it is asked to do so before the loader is wrapped."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    return world_size > 1 and isinstance(loader, DataLoader) and not isinstance(loader.sampler, DistributedSampler)


# ---------------------------------------------------------------------------- callback


class RunState(Callback):
    """Saves and restores what an exact resume needs beyond Lightning's state (module docstring).

    Must come before the checkpoint callbacks in the Trainer's list (Lightning moves
    ModelCheckpoint last anyway) and before :class:`~skipstudy.stopping.GracefulStop`, so that
    it knows at which hook a checkpoint is being written.
    """

    def __init__(self) -> None:
        self.loader: EpochLoader | None = None
        self._where: str | None = None  # the hook a checkpoint written now would be written in
        self._loaded: dict[str, Any] | None = None
        self._merge_results: dict[str, tuple] | None = None
        self._trainer = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    # -- the training loader -------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer  # state_dict() has no trainer argument
        if trainer.datamodule is None:
            return
        dm = trainer.datamodule
        make = dm.train_dataloader
        if getattr(make, "_skipstudy_epoch_loader", False):
            return
        state = self

        def train_dataloader():
            loader = make()
            # Only the loader Lightning trains from is wrapped; others (a probe reading a few
            # training batches mid-run) get the data module's own.
            fit_loop = trainer.fit_loop
            for_training = fit_loop._combined_loader is None or fit_loop._should_reload_train_dl
            if not for_training:
                return loader
            if needs_lightning_sampler(loader, trainer.world_size):
                # DDP with a bare DataLoader: Lightning puts a DistributedSampler in only while
                # the loader is still a DataLoader, i.e. not once it is wrapped. Let Lightning do
                # it here, with its own code and arguments (seed, shuffle, drop_last), so the
                # wrapped loader shards exactly as Lightning would and a mid-epoch resume can skip
                # this rank's done batches (the sampler's order depends only on seed and epoch).
                from lightning.pytorch.trainer.states import RunningStage

                loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
            state.loader = EpochLoader(loader, lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            # Lightning warns that a mid-epoch resume of a loader without state_dict() is
            # unreliable; EpochLoader makes it exact (its state travels in RunState's).
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
            if state._loaded is not None:
                state.loader.resume_rng = state._loaded.get("epoch_rng")
            _seed_workers(loader, trainer.global_rank)
            return state.loader

        train_dataloader._skipstudy_epoch_loader = True
        dm.train_dataloader = train_dataloader

    # -- where a checkpoint written now would be written -----------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._where = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._where = "batch"
        if self._merge_results is not None:
            _merge_epoch_results(trainer, self._merge_results)
            self._merge_results = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._where = "validation"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._where = "epoch"

    # -- saving ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        state: dict[str, Any] = {"rng": rng_states(), "epoch_rng": self.loader.epoch_rng if self.loader else None}
        if trainer is None:
            return state
        mid_epoch = self._where != "epoch"
        if mid_epoch:
            state["epoch_results"] = _epoch_results(trainer)
            state["metric_states"] = _metric_states(trainer.lightning_module)
        state["pending"] = pending_metrics(trainer, self._where)
        state[RANKS_KEY] = _gather_per_rank(trainer, {k: state[k] for k in PER_RANK if k in state})
        if trainer.is_global_zero:
            state["event_files"] = _flush_and_measure(trainer)
        return state

    # -- restoring ---------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = _for_this_rank(dict(state_dict), self._trainer)
        if self.loader is not None:
            self.loader.resume_rng = self._loaded.get("epoch_rng")

    def on_train_start(self, trainer, pl_module) -> None:
        loaded, self._loaded = self._loaded, None
        if not loaded:
            return
        # trainer.log_dir is a broadcast from rank 0 under DDP: every rank must ask, or rank 0
        # waits in it while the others start training (a hang).
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero and trainer.ckpt_path is not None:
            # Only now, when training really goes on (a run resumed after its last epoch
            # skips it and keeps its logs as they are): cut the logs back to the checkpoint,
            # then write what Lightning logged after the checkpoint hook.
            cut_logs(run_dir, trainer.ckpt_path, keep=_live_event_files(trainer))
            pending = loaded.get("pending")
            if pending:
                for logger in trainer.loggers:
                    logger.log_metrics(pending["metrics"], step=pending["step"])
        if "metric_states" in loaded:
            _set_metric_states(pl_module, loaded["metric_states"])
        if loaded.get("epoch_results"):
            self._merge_results = loaded["epoch_results"]
        if "rng" in loaded:
            set_rng_states(loaded["rng"])  # last: nothing above may draw after it


# What each DDP rank has of its own: its RNG streams, the RNG states its epoch started from,
# and its share of the epoch's metric states (torchmetrics syncs them across ranks only at
# compute()). The checkpoint is written by rank 0 alone, so the ranks' copies are gathered
# into it and each rank takes back its own.
PER_RANK = ("rng", "epoch_rng", "metric_states")
RANKS_KEY = "per_rank"


def _gather_per_rank(trainer, local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local``, in rank order (a collective: Lightning builds the checkpoint's
    state on every rank, so every rank is here)."""
    dist = torch.distributed
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, local)
        return gathered
    return [local]


def _for_this_rank(state: dict[str, Any], trainer) -> dict[str, Any]:
    ranks = state.pop(RANKS_KEY, None)
    if not ranks or trainer is None:
        return state
    if len(ranks) != trainer.world_size:
        # Resumed on another number of processes: the shards differ, so no rank's own
        # state fits; rank 0's (the top-level copy) keeps the run going.
        log.warning("resuming a %d-process checkpoint on %d processes: rank 0's RNG and metric states are used",
                    len(ranks), trainer.world_size)
        return state
    state.update(ranks[trainer.global_rank])
    return state


def _seed_workers(loader: Any, rank: int) -> None:
    """What Lightning does for a bare DataLoader under ``seed_everything(workers=True)``
    (it skips loaders it does not recognise, like the wrapper)."""
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and loader.num_workers > 0 and loader.worker_init_fn is None:
        if os.environ.get("PL_SEED_WORKERS") == "1":
            from functools import partial

            from lightning.fabric.utilities.seed import pl_worker_init_function

            loader.worker_init_fn = partial(pl_worker_init_function, rank=rank)


def _epoch_results(trainer) -> dict[str, tuple]:
    """The training epoch's running sums of values logged with ``on_epoch=True``."""
    out: dict[str, tuple] = {}
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    for key, rm in results.items():
        if getattr(rm, "is_tensor", False) and rm.meta.on_epoch:
            count = rm.cumulated_batch_size.detach().cpu() if rm.meta.is_mean_reduction else None
            out[key] = (rm.value.detach().cpu(), count)
    return out


def _merge_epoch_results(trainer, saved: dict[str, tuple]) -> None:
    """Add the sums saved mid-epoch to those of the first batch after the restart.

    After one batch a mean's sum is exactly ``0 + v*b``, so ``saved + current`` gives the
    bits the uninterrupted run had.
    """
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    for key, (value, count) in saved.items():
        rm = results.get(key)
        if rm is None or not rm.is_tensor:
            continue
        value = value.to(rm.value.device, rm.value.dtype)
        if rm.meta.is_max_reduction or rm.meta.is_min_reduction:
            rm.value = rm.meta.reduce_fx(value, rm.value)
        else:
            rm.value = value + rm.value
        if count is not None and rm.meta.is_mean_reduction:
            rm.cumulated_batch_size = count.to(rm.cumulated_batch_size.device) + rm.cumulated_batch_size


def _metric_states(module) -> dict[str, dict[str, Any]]:
    """torchmetrics states (e.g. the epoch's accuracy counts); not in the module's state_dict."""
    from torchmetrics import Metric

    out = {}
    for name, metric in module.named_modules():
        if isinstance(metric, Metric) and name:
            states = {k: _cpu(getattr(metric, k)) for k in metric._defaults}
            out[name] = {"states": states, "update_count": metric._update_count}
    return out


def _set_metric_states(module, saved: dict[str, dict[str, Any]]) -> None:
    modules = dict(module.named_modules())
    for name, entry in saved.items():
        metric = modules.get(name)
        if metric is None:
            continue
        for k, v in entry["states"].items():
            current = getattr(metric, k, None)
            device = current.device if isinstance(current, torch.Tensor) else None
            setattr(metric, k, _to(v, device))
        metric._update_count = entry["update_count"]
        metric._computed = None


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    return v


def _to(v: Any, device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device) if device is not None else v
    if isinstance(v, list):
        return [_to(x, device) for x in v]
    return v


def pending_metrics(trainer, where: str | None) -> dict[str, Any] | None:
    """The scalars Lightning has computed for this step (or epoch) but writes only after the
    checkpoint hooks; the resumed run does not recompute them, so the checkpoint carries them.

    Mirrors ``_LoggerConnector.update_train_step_metrics`` (after ``on_train_batch_end``) and
    ``update_train_epoch_metrics`` (after ``on_train_epoch_end``, at the last batch's step).
    """
    if where not in ("batch", "epoch") or not trainer.loggers:
        return None
    connector = trainer._logger_connector
    loop = trainer.fit_loop
    step = loop.epoch_loop._batches_that_stepped
    if where == "batch":
        if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
            return None
        if not (connector.should_update_logs or trainer.fast_dev_run):
            return None
        metrics = loop.epoch_loop._results.metrics(True)["log"]
    else:
        step -= 1
        metrics = loop.epoch_loop._results.metrics(False)["log"]
    if not metrics:
        return None
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars.setdefault("epoch", trainer.current_epoch)  # as Lightning's log_metrics does
    return {"step": int(step), "metrics": scalars}


def _live_event_files(trainer) -> set[str]:
    """Names of the event files this process's TensorBoard writers already opened."""
    from lightning.pytorch.loggers import TensorBoardLogger

    names = set()
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger._experiment is not None:
            writer = getattr(logger.experiment, "file_writer", None)
            name = getattr(getattr(writer, "event_writer", None), "_file_name", None)
            if name:
                names.add(Path(name).name)
    return names


def _flush_and_measure(trainer) -> dict[str, int]:
    """Flush the TensorBoard writers; the byte size of each event file in the run directory."""
    from lightning.pytorch.loggers import TensorBoardLogger

    dirs = set()
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            if logger._experiment is not None:
                logger.experiment.flush()
            dirs.add(Path(logger.log_dir))
    sizes = {}
    for d in dirs:
        for path in d.glob(EVENT_PREFIX + "*"):
            if path.is_file():
                sizes[path.name] = path.stat().st_size
    return sizes


# ---------------------------------------------------------------------------- logs on disk


def checkpoint_record(ckpt_path: str | os.PathLike) -> tuple[int, dict[str, int] | None]:
    """``(global_step, {event file: size})`` of a checkpoint; sizes None when it has none."""
    ckpt = torch.load(str(ckpt_path), map_location="cpu", mmap=True, weights_only=True)
    state = (ckpt.get("callbacks") or {}).get(STATE_KEY) or {}
    return int(ckpt.get("global_step", 0)), state.get("event_files")


def cut_logs(run_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None, keep: set[str] = frozenset()) -> int:
    """Cut ``run_dir``'s logs back to what they held when ``ckpt_path`` was written.

    Event files are truncated to their recorded sizes; event files the checkpoint does not
    know were written after it and are removed. For a checkpoint without the record (written
    by another tool) every event with a step at or after the checkpoint's global step is
    dropped instead. The monitor's ``grad_stats`` exports keep the rows of earlier steps.
    Without a checkpoint (killed before the first one) the run starts over: all event files
    and exports are removed. Files named in ``keep`` (the resumed run's own, already open)
    are left alone. Idempotent, so a resume that is killed while cutting can be rerun.

    Returns the checkpoint's global step (0 without one).
    """
    run_dir = Path(run_dir)
    events = sorted(p for p in run_dir.glob(EVENT_PREFIX + "*") if p.is_file() and p.name not in keep)
    for tmp in run_dir.glob(".cut-*"):
        tmp.unlink()
    if ckpt_path is None:
        for path in events:
            path.unlink()
        for name in EXPORTS:
            (run_dir / name).unlink(missing_ok=True)
        return 0
    step, sizes = checkpoint_record(ckpt_path)
    for path in events:
        if sizes is None:
            _drop_steps_from(path, step)
        elif path.name in sizes:
            if path.stat().st_size > sizes[path.name]:
                os.truncate(path, sizes[path.name])
        else:
            path.unlink()
    for name in EXPORTS:
        if (run_dir / name).is_file():
            _cut_export(run_dir / name, step)
    return step


def _drop_steps_from(path: Path, step: int) -> None:
    """Rewrite an event file without the summaries of ``step`` and later (HParams are kept)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    tmp = path.with_name(".cut-" + path.name)
    with open(tmp, "wb") as f:
        writer = RecordWriter(f)
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            hparams = any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value)
            if event.HasField("summary") and event.step >= step and not hparams:
                continue
            writer.write(raw)
    os.replace(tmp, path)


def _cut_export(path: Path, step: int) -> None:
    """Keep the rows of steps before ``step`` in the monitor's JSON or CSV export."""
    tmp = path.with_name(".cut-" + path.name)
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        keep = [i for i, s in enumerate(doc.get("step", [])) if s < step]
        doc["step"] = [doc["step"][i] for i in keep]
        if "epoch" in doc:
            doc["epoch"] = [doc["epoch"][i] for i in keep]
        doc["series"] = {tag: [values[i] for i in keep] for tag, values in doc.get("series", {}).items()}
        doc["nonfinite_steps"] = [s for s in doc.get("nonfinite_steps", []) if s < step]
        if doc.get("diverged_at") and doc["diverged_at"].get("step", math.inf) >= step:
            doc["diverged_at"] = None
        tmp.write_text(json.dumps(doc, allow_nan=False))
    else:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            for i, row in enumerate(rows):
                if i == 0 or (row and _int(row[0]) is not None and _int(row[0]) < step):
                    out.writerow(row)
    os.replace(tmp, path)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
