"""How a run stops early and cleanly: on a signal (SLURM preemption, Ctrl-C) after writing
``last.ckpt``, or at a non-finite gradient without applying it.

Exit status of ``python -m skipstudy.train``: 2 refused input, 3 diverged and stopped,
128 + N stopped by signal N after writing a checkpoint, or during set-up before the first step
(the shell's convention, so a scheduler sees the job as not finished).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint

from skipstudy.monitor.taps import PendingStep, UpdateGuard, _to_host
from skipstudy.runs.resume import pending_metrics

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
DIVERGED_TAG = "train/diverged"


class Interrupted(Exception):
    """Training stopped on a signal: after writing a checkpoint, or during set-up before training."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step = int(signum), step
        self.exit_code = 128 + self.signum
        where = f"checkpoint {checkpoint}" if checkpoint.is_file() else "no checkpoint yet (the run starts over)"
        super().__init__(f"{signal.Signals(self.signum).name} received: stopped after step {step}; {where}; "
                         f"continue with: python -m skipstudy.train resume={checkpoint.parent.parent}")


class Diverged(Exception):
    """Training stopped at a non-finite loss or gradient (``monitor.on_nonfinite=stop``)."""

    def __init__(self, step: int, layer: str, metrics: dict[str, float]) -> None:
        self.step, self.layer, self.metrics = step, layer, metrics
        super().__init__(f"non-finite gradient at step {step}, first layer {layer}; training stopped and marked "
                         f"{DIVERGED_TAG}=1 (lower optimizer.lr, or monitor.on_nonfinite=warn to train on)")


def checkpoint_callbacks(ckpt: Any, run_dir: Path, validates: bool = True) -> list[Checkpoint]:
    """``<run>/checkpoints/``: the best by ``checkpoint.monitor``, and ``last.ckpt``. Without
    validation (``validates=False``) there is no best by a ``val/`` metric: Lightning would warn
    at every epoch end that it cannot find the monitored key."""
    out: list[Checkpoint] = []
    if ckpt.monitor and ckpt.save_top_k and (validates or not str(ckpt.monitor).startswith("val/")):
        out.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best-{epoch}-{step}",
                                   monitor=ckpt.monitor, mode=ckpt.mode, save_top_k=ckpt.save_top_k,
                                   auto_insert_metric_name=False))
    return [*out, LastCheckpoint(run_dir / "checkpoints" / "last.ckpt", ckpt.every_n_train_steps, ckpt.save_last)]


class ValidateAtMaxSteps(Callback):
    """A run that reaches ``trainer.max_steps`` inside an epoch validates once before it ends.
    Lightning validates at epoch ends only, so a short run (``max_steps`` below one epoch) would
    end with no ``val/*`` at all; asking it to stop is what makes its epoch loop validate now
    (as early stopping does). The run ends at that step in any case."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.enable_validation:
            trainer.should_stop = True


class LastCheckpoint(Checkpoint):
    """``last.ckpt``, what ``resume=`` continues from, and the clean stop on SIGTERM/SIGINT
    (Lightning meets SIGTERM only to requeue under SLURM).

    Written at every epoch end (after validation) and every ``every_n_train_steps`` steps when
    ``periodic``; after a signal, at the end of the current step, and then training raises
    :class:`Interrupted` (a second Ctrl-C aborts at once). Never on an epoch's last batch:
    Lightning would resume it in the next epoch, past the validation and epoch end not reached
    yet. Each checkpoint holds the metrics Lightning writes only after the hook that wrote it
    (``pending``), for a resume to write once it has cut the logs back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, path: Path, every_n_train_steps: int | None, periodic: bool) -> None:
        self.path = path
        self.every_n = every_n_train_steps if periodic else None
        self.periodic = periodic
        self.received: int | None = None
        self.pending: dict[str, Any] | None = None
        self._previous: dict[int, Any] = {}
        self._step_before = -1

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict["pending"]

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self.pending = self.pending, None
        if pending and trainer.is_global_zero and trainer.ckpt_path is not None:  # after RunState cut the logs
            trainer.logger.log_metrics(pending["metrics"], step=pending["step"])
        # A SIGTERM during set-up reached Lightning's handler, which would stop at a later batch
        # without a checkpoint: stop now, before training; last.ckpt (if any) holds this state.
        if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            raise Interrupted(signal.SIGTERM, trainer.global_step, self.path)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = signum
        print(f"{signal.Signals(signum).name} received: writing a checkpoint after this step, then stopping"
              + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: not set from Python
                signal.signal(sig, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)

    def _requested(self, trainer) -> bool:
        stop = self.received is not None
        return trainer.strategy.reduce_boolean_decision(stop, all=False) if trainer.world_size > 1 else stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Only after a batch that stepped the optimizer (not one that accumulates gradients).
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.global_step == self._step_before:
            return
        stop = self._requested(trainer)
        if stop or (self.every_n and trainer.global_step % self.every_n == 0):
            self._save(trainer, "batch", stop)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stop = self._requested(trainer)
        if stop or self.periodic:
            self._save(trainer, "epoch", stop)

    def _save(self, trainer, where: str, stop: bool) -> None:
        # Every rank computes them (compute() syncs torchmetrics); the logger writes on rank 0.
        self.pending = pending_metrics(trainer, where)
        trainer.save_checkpoint(str(self.path), weights_only=False)  # to a temporary file, then renamed
        pending, self.pending = self.pending, None
        if not stop:
            return
        # Written now too, so the logs end at the step the run stopped; a resume cuts and rewrites them.
        for logger in trainer.loggers:  # TensorBoard first; CSV, MLflow, W&B too
            if pending:
                logger.log_metrics(pending["metrics"], step=pending["step"])
            logger.save()  # flushes the event file
        raise Interrupted(self.received or signal.SIGTERM, trainer.global_step, self.path)


class DivergenceGuard(Callback):
    """``monitor.on_nonfinite`` on the steps the gradient monitor does not record (all with
    ``monitor=off``). ``stop`` drops the non-finite update, writes ``train/diverged = 1`` and ends
    training; ``warn`` warns once. ``verdict`` is the run's, the monitor's if there is one.

    Each step's flags (which gradients and which weights are not finite: two fused float64
    ``_foreach_norm``, which neither overflow nor underflow for float32 values) are copied to
    the host without blocking, as the monitor's values are. On the CPU they are read at once. On
    a GPU they are read when they have landed, normally at the next step, so the check adds no
    host-device sync to a step: a fused optimizer (the default on CUDA, ``optimizer.fused=null``)
    gets them as a device-side ``found_inf`` and skips a non-finite update itself, and the stop
    then names the step and layer where it started, one step late. Any other optimizer has them
    read before its update (one wait a step: the price of never applying a non-finite update).
    """

    def __init__(self, on_nonfinite: str, monitor: Any) -> None:
        self.on_nonfinite = on_nonfinite
        self.monitor = monitor
        self.diverged_at: tuple[int, str] | None = None
        self.nonfinite_steps: list[int] = []
        self._pending: list[PendingStep] = []  # steps whose flags are on their way to the host
        self._guard = UpdateGuard()  # a non-finite update skipped though read late

    @property
    def verdict(self) -> tuple[int, str] | None:
        return self.monitor.diverged_at if self.monitor is not None else self.diverged_at

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._drain(trainer, pl_module, wait=trainer.world_size > 1)  # earlier steps' flags (every rank alike)
        if self.verdict is not None and self.on_nonfinite == "stop":
            return  # stopping: this step's gradients were dropped
        if self.monitor is not None and (self.on_nonfinite != "stop"
                                         or self.monitor.recording_step == trainer.global_step):
            return  # warn keeps a sparse schedule free of per-step checks; recorded steps are the monitor's
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return  # fp16: the GradScaler skips overflowing steps itself
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        with torch.no_grad():
            grads = torch._foreach_norm([p.grad for _, p in named], 2, dtype=torch.float64)
            weights = torch._foreach_norm([p for _, p in named], 2, dtype=torch.float64)
            flags = torch.stack([*grads, *weights]).isfinite().logical_not()
        names = [n for n, _ in named]
        host, event = _to_host(flags)
        pending = PendingStep(trainer.global_step, host, event, lambda h: (names, h))
        self._pending.append(pending)
        if self.on_nonfinite == "stop":
            self._guard.arm(optimizer, pending, trainer.world_size, lambda: flags[: len(named)].any().float(),
                            partial(self._drain, trainer, pl_module, wait=True))
        self._drain(trainer, pl_module, wait=False)  # on the CPU: now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._guard.disarm()

    # Where the run's state is taken or ends, every step's flags are read first.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def state_dict(self) -> dict[str, Any]:
        # Before any on_save_checkpoint, where RunState takes the event files' sizes: a verdict
        # read now is in the files the checkpoint points at. Nothing to save (an empty dict).
        if self._pending:
            self._drain(self._trainer, self._trainer.lightning_module, wait=True)
        return {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._drain(trainer, pl_module, wait=False)

    def _drain(self, trainer, pl_module, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].ready()):
            pending = self._pending.pop(0)
            names, flags = pending.read()
            if flags[: len(names)].any() and (self.verdict is None or self.on_nonfinite != "stop"):
                self._nonfinite(trainer, pl_module, pending.step, names, flags)

    def _nonfinite(self, trainer, pl_module, step: int, names: list[str], flags) -> None:
        # Where non-finiteness shows first in computation order: a non-finite weight (forward order)
        # if any, else the non-finite gradient nearest the loss (backward order), named relative to
        # LitClassifier.net as the gradient monitor names it. The weights are the step's own.
        grad_bad, weight_bad = flags[: len(names)], flags[len(names):]
        index = int(weight_bad.nonzero()[0][0]) if weight_bad.any() else int(grad_bad.nonzero()[0][-1])
        layer = names[index].rpartition(".")[0].removeprefix("net.")
        self.nonfinite_steps.append(step)
        message = f"non-finite gradient at step {step}, first layer {layer}"
        if self.on_nonfinite == "warn":
            if len(self.nonfinite_steps) == 1 and trainer.is_global_zero:
                log.warning("%s; monitor.on_nonfinite=warn: training goes on", message)
            return
        self.diverged_at = (step, layer)
        if self.monitor is not None:
            message += " (a step the gradient monitor does not record)"
            self.monitor.mark_diverged(step, layer)
        if trainer.is_global_zero:
            log.error(message)
            for logger in trainer.loggers:
                logger.log_metrics({DIVERGED_TAG: 1.0}, step=step)
                logger.save()
        for p in pl_module.parameters():  # skip the update of the step running now
            p.grad = None
        trainer.should_stop = True
