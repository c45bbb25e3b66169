"""Resuming a killed run exactly. Lightning restores weights, optimizer, schedulers, loop
counters, the persistent torchmetrics states and the state of a stateful training loader
(:class:`EpochLoader`: the data position); :class:`RunState` adds the global RNG states, under
DDP each rank's own RNG and metric states, and the size of each event file, so that
:func:`cut_logs` truncates the files back to the checkpoint and every tag keeps each step once
(TensorBoard's ``SessionLog.START`` purge is not used: tbparse reads each file on its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, DistributedSampler

from skipstudy.runs.layout import EVENT_PREFIX

log = logging.getLogger(__name__)

STATE_KEY = "RunState"
RANKS_KEY = "per_rank"


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


class EpochLoader:
    """The training loader, able to resume an epoch part-way through. Lightning saves and
    restores it as any stateful loader (``state_dict``/``load_state_dict``, kept in the fit
    loop's checkpoint state), and restarts a half-done epoch of a plain loader from its first
    batch.

    Each pass records the global RNG states it starts from: they are the state. A pass that
    starts after Lightning restored them and its progress counters mid-epoch
    (``done_batches() > 0``) replays the epoch from them, without moving the global RNGs, and
    drops the batches already done, loading them without a forward pass. A pass started
    without a restored state (a probe reading training batches mid-run) is whole.
    """

    def __init__(self, loader: Any, done_batches: Callable[[], int]) -> None:
        self.loader = loader
        self._done_batches = done_batches
        self.epoch_rng: dict[str, Any] | None = None  # states at the start of the current pass
        self.resume_rng: dict[str, Any] | None = None  # restored, for the first pass

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_rng": self.epoch_rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_rng = state_dict.get("epoch_rng")

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size, ...
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def worker_init_fn(self) -> Any:
        return self.loader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:  # Lightning's seed_everything(workers=True) reaches the loader
        self.loader.worker_init_fn = fn

    def __iter__(self) -> Iterator[Any]:
        # A generator: the body runs at the first next(), after Lightning has restored the
        # progress counters and called set_epoch, and its RNG draws come after RunState's restore.
        resume_rng, self.resume_rng = self.resume_rng, None
        skip = int(self._done_batches()) if resume_rng is not None else 0
        self.epoch_rng = resume_rng if skip else rng_states()
        # What the replayed shuffle and the skipped batches draw must not move the RNGs.
        with isolate_rng(include_cuda=torch.cuda.is_initialized()) if skip else contextlib.nullcontext():
            if skip:
                set_rng_states(resume_rng)
            it = iter(self.loader)
            for _ in range(skip):
                if next(it, None) is None:
                    break
        yield from it


class RunState(Callback):
    """Saves and restores what an exact resume needs beyond Lightning's state (module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        # Built before the loggers: event files not listed here are this run's own.
        self.earlier_events = {p.name for p in self.run_dir.glob(EVENT_PREFIX + "*")}
        self._loaded: dict[str, Any] | None = None
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument
        dm = trainer.datamodule
        make = dm.train_dataloader

        def train_dataloader():
            loader = make()
            if trainer.world_size > 1 and isinstance(loader, DataLoader) and not isinstance(
                    loader.sampler, DistributedSampler):
                # Lightning shards only a bare DataLoader: left to it (skipstudy's data modules shard
                # their own), its mid-epoch resume restarts the epoch's data, as Lightning warns.
                return loader
            return EpochLoader(loader, lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready)

        dm.train_dataloader = train_dataloader

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        own: dict[str, Any] = {"rng": rng_states()}
        state: dict[str, Any] = dict(own)
        if trainer.world_size > 1:
            # The module's state dict holds rank 0's torchmetrics states; each rank has its share.
            own["metrics"] = _metric_states(trainer.lightning_module)
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, own)  # every rank builds the checkpoint
            state[RANKS_KEY] = gathered
        return state

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # After every callback's state_dict, where the gradient monitor writes the values still on
        # their way from the device: the sizes then cover every step the checkpoint has trained.
        if trainer.is_global_zero:
            trainer.logger.experiment.flush()
            checkpoint["callbacks"][self.state_key]["event_files"] = {
                p.name: p.stat().st_size for p in self.run_dir.glob(EVENT_PREFIX + "*")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        ranks, trainer = self._loaded.pop(RANKS_KEY, None), self._trainer
        if ranks and len(ranks) == trainer.world_size:
            self._loaded.update(ranks[trainer.global_rank])
        elif ranks:  # the shards differ: rank 0's states (the top-level copy) keep the run going
            log.warning("resuming a %d-process checkpoint on %d processes: rank 0's RNG and metric states "
                        "are used", len(ranks), trainer.world_size)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fit = checkpoint.get("loops", {}).get("fit_loop", {})  # Lightning keeps the loader's state there
        batches = fit.get("epoch_loop.batch_progress", {})
        if batches.get("current", {}).get("completed") and not batches.get("is_last_batch") \
                and not fit.get("state_dict", {}).get("combined_loader"):
            log.warning("resuming mid-epoch from a checkpoint without the data position; the epoch's data restarts")

    def on_train_start(self, trainer, pl_module) -> None:
        loaded, self._loaded = self._loaded, None
        if not loaded:
            return
        if trainer.is_global_zero and trainer.ckpt_path is not None:
            # Only now that training really goes on (a finished run resumed keeps its logs); the
            # checkpoint's pending metrics are written next, by LastCheckpoint (a later callback).
            own = {p.name for p in self.run_dir.glob(EVENT_PREFIX + "*")} - self.earlier_events
            cut_logs(self.run_dir, trainer.ckpt_path, keep=own)
            if loaded.get("pending"):  # a checkpoint from before LastCheckpoint held them
                trainer.logger.log_metrics(loaded["pending"]["metrics"], step=loaded["pending"]["step"])
        if "metrics" in loaded:
            pl_module.load_state_dict({k: v.to(pl_module.device) for k, v in loaded["metrics"].items()}, strict=False)
        set_rng_states(loaded["rng"])  # last: nothing above may draw after it


def _metric_states(module) -> dict[str, torch.Tensor]:
    """The persistent torchmetrics states of ``module``, as its state dict names them."""
    from torchmetrics import Metric

    return {f"{name}.{key}": value.detach().cpu() for name, m in module.named_modules() if isinstance(m, Metric)
            for key, value in m.state_dict().items()}


def pending_metrics(trainer, where: str) -> dict[str, Any] | None:
    """The scalars Lightning has computed for this step (``where="batch"``, called only on a batch
    that stepped the optimizer) or epoch but writes only after the checkpoint hooks, at the step
    and under the condition its logger connector uses (``update_train_step_metrics``, after
    ``on_train_batch_end``; ``update_train_epoch_metrics``, after ``on_train_epoch_end``, at the
    last batch's step). Lightning has no public view of them: ``trainer.logged_metrics`` mixes in
    the values of earlier steps, so its result collection is read (``_results``)."""
    results = trainer.fit_loop.epoch_loop._results
    if where == "batch":
        every = trainer.log_every_n_steps
        if not (trainer.fast_dev_run or (every and (trainer.global_step % every == 0 or trainer.should_stop))):
            return None
        metrics = results.metrics(True)["log"]
    else:
        metrics = results.metrics(False)["log"]
    if not metrics:
        return None
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars.setdefault("epoch", trainer.current_epoch)  # as Lightning's log_metrics does
    return {"step": trainer.global_step - 1, "metrics": scalars}


def checkpoint_record(ckpt_path: str | os.PathLike) -> tuple[int, dict[str, int] | None]:
    """``(global_step, {event file: size})``; sizes None for another tool's checkpoint."""
    ckpt = torch.load(str(ckpt_path), map_location="cpu", mmap=True, weights_only=True)
    state = (ckpt.get("callbacks") or {}).get(STATE_KEY) or {}
    return int(ckpt.get("global_step", 0)), state.get("event_files")


def cut_logs(run_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None, keep: set[str] = frozenset()) -> int:
    """Cut ``run_dir``'s event files back to what they held when ``ckpt_path`` was written (truncated
    to the recorded sizes; without the record, events at or after its step dropped); without a
    checkpoint the run starts over and they go. Files in ``keep`` (the resumed run's own) are left
    alone. Idempotent, so a resume killed while cutting can be rerun. Returns the checkpoint's step.
    """
    run_dir = Path(run_dir)
    events = sorted(p for p in run_dir.glob(EVENT_PREFIX + "*") if p.is_file() and p.name not in keep)
    for tmp in run_dir.glob(".cut-*"):
        tmp.unlink()
    if ckpt_path is None:
        for path in events:
            path.unlink()
        return 0
    step, sizes = checkpoint_record(ckpt_path)
    for path in events:
        if sizes is None:
            _drop_steps_from(path, step)
        elif path.name not in sizes:
            path.unlink()
        elif path.stat().st_size > sizes[path.name]:
            os.truncate(path, sizes[path.name])
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
            if not (event.HasField("summary") and event.step >= step and not hparams):
                writer.write(raw)
    os.replace(tmp, path)
