"""Why a run stops early, and how it stops cleanly: a signal (SLURM preemption, Ctrl-C) or a
non-finite loss or gradient.

* :class:`GracefulStop`: SIGTERM or SIGINT sets a flag; at the end of the current optimizer step
  the run writes ``checkpoints/last.ckpt``, flushes its logs and raises :class:`Interrupted`
  (``skipstudy.train`` exits with 128 + the signal number, the shell's convention for "ended
  by a signal", so a scheduler sees the job as not finished). A second Ctrl-C aborts at once.
  Lightning handles SIGTERM itself only to requeue under SLURM and then without a checkpoint.
* :class:`DivergenceGuard`: the reaction to non-finite values, ``monitor.on_nonfinite`` (``stop``
  or ``warn``), the same switch as the gradient monitor's. On the steps the monitor records, the
  monitor detects (it already moves each recorded step's gradient norms to the host, so
  detection costs nothing more); with ``monitor=off``, and with ``stop`` on the steps a sparse
  schedule (``monitor.every_n_steps > 1``, ``monitor.schedule=log``) leaves out, the guard
  checks the gradients itself before the optimizer step: one fused ``torch._foreach_norm``
  over all gradients and one device-to-host sync per step. That sync is the price of never applying a non-finite update; it is small
  next to a step, and training logs ``train/loss`` every step anyway (``log_every_n_steps=1``),
  which syncs too. Either way ``stop`` skips the poisoned update (the weights and any
  checkpoint stay those of the last good step), writes ``train/diverged = 1`` at that step and
  ends training; ``skipstudy.train`` then prints one line naming the step and the first layer
  and exits with :data:`EXIT_DIVERGED`. The HParams dashboard gets the run's verdict from
  ``skipstudy.launchers.final_metrics`` (``hparams/diverged``), which reads ``train/diverged``
  and the non-finite values back from the event file.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from skipstudy.errors import ConfigError

log = logging.getLogger(__name__)

ON_NONFINITE = ("warn", "stop")
# Exit status of `python -m skipstudy.train`: 2 refused input (ConfigError), 3 diverged and
# stopped, 128 + N ended by signal N after writing a checkpoint (143 SIGTERM, 130 SIGINT).
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
DIVERGED_TAG = "train/diverged"


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(self.signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        resume = f"; continue with: python -m skipstudy.train resume={checkpoint.parent.parent}" if checkpoint else ""
        super().__init__(f"{name} received: stopped after step {step}{where}{resume}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Diverged(Exception):
    """Training stopped at a non-finite loss or gradient (``monitor.on_nonfinite=stop``)."""

    def __init__(self, step: int, layer: str, metrics: dict[str, float] | None = None) -> None:
        self.step = step
        self.layer = layer
        self.metrics = metrics or {}
        super().__init__(
            f"non-finite gradient at step {step}, first layer {layer}; training stopped and marked "
            f"{DIVERGED_TAG}=1 (lower optimizer.lr, or monitor.on_nonfinite=warn to train on)"
        )


# ---------------------------------------------------------------------------- signals


class GracefulStop(Checkpoint):
    """SIGTERM/SIGINT: checkpoint to ``checkpoint_path`` at the end of the current step, stop.

    Handlers are installed when training starts (after Lightning's own) and the previous ones
    put back when it ends. A signal during an epoch's last batch or its validation stops at
    the epoch end instead, after the epoch's validation and checkpoints (a checkpoint on the
    last batch would resume in the next epoch without them). A Checkpoint subclass, so that
    Lightning runs it after the checkpoint callbacks. Under DDP every rank takes the same
    decision (one all-reduce of a flag per step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if getattr(trainer, "received_sigterm", False):  # arrived while setting up
            self.received = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = signum
        print(f"{signal.Signals(signum).name} received: writing a checkpoint after this step, then stopping"
              + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}

    def _requested(self, trainer) -> bool:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.fit_loop._should_accumulate():
            return
        if self._requested(trainer):
            self._stop(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._requested(trainer):
            self._stop(trainer, "epoch")

    def _stop(self, trainer, where: str) -> None:
        from skipstudy.resume import pending_metrics

        trainer.save_checkpoint(str(self.checkpoint_path), weights_only=False)
        # What Lightning would write right after this hook (the step's train/loss, or the
        # epoch means): the logs end at the step the run stopped. A resume cuts and rewrites them.
        # Every rank computes them (an epoch's torchmetrics compute() syncs across ranks);
        # Lightning's loggers write on rank 0 only.
        pending = pending_metrics(trainer, where)
        for logger in trainer.loggers:
            if pending:
                logger.log_metrics(pending["metrics"], step=pending["step"])
            logger.save()
            experiment = getattr(logger, "_experiment", None)
            if experiment is not None and hasattr(experiment, "flush"):
                experiment.flush()
        signum = self.received if self.received is not None else signal.SIGTERM
        raise Interrupted(signum, trainer.global_step, self.checkpoint_path)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()


# ---------------------------------------------------------------------------- divergence


class DivergenceGuard(Callback):
    """Non-finite gradients on the steps the monitor does not check; the run's verdict.

    Args:
        on_nonfinite: ``stop`` or ``warn`` (``monitor.on_nonfinite``).
        monitor: the GradientFlowMonitor when it is on. It checks the steps it records; this
            guard checks the others only for ``stop`` (reporting through its
            ``mark_diverged``) and reads the verdict from it (``diverged_at``).
    """

    def __init__(self, on_nonfinite: str = "stop", monitor: Any = None) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"monitor.on_nonfinite={on_nonfinite!r} is not one of: {', '.join(ON_NONFINITE)}")
        self.on_nonfinite = on_nonfinite
        self.monitor = monitor
        self.diverged_at: tuple[int, str] | None = None
        self.nonfinite_steps: list[int] = []

    @property
    def verdict(self) -> tuple[int, str] | None:
        """``(step, layer)`` where training stopped, or None."""
        if self.monitor is not None:
            return getattr(self.monitor, "diverged_at", None)
        return self.diverged_at

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": list(self.nonfinite_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_steps = list(state_dict.get("nonfinite_steps", []))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is not None:
            # The monitor checks the steps it records. The others are checked here only for
            # ``stop``, whose promise is that no non-finite update is ever applied; ``warn``
            # keeps a sparse schedule free of per-step syncs and reports at recorded steps.
            if self.on_nonfinite != "stop" or getattr(self.monitor, "recording_step", None) == trainer.global_step:
                return
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return  # fp16: the GradScaler skips overflowing steps itself
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch._foreach_norm([p.grad for _, p in named])
        bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
        if not bool(bad.any()):  # the one host sync of the check
            return
        step = trainer.global_step
        layer = _first_layer(pl_module, named, bad)
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
            _log_scalar(trainer, DIVERGED_TAG, 1.0, step)
        for p in pl_module.parameters():  # skip the poisoned update
            p.grad = None
        trainer.should_stop = True


def _first_layer(pl_module, named: list[tuple[str, torch.nn.Parameter]], bad: torch.Tensor) -> str:
    """The layer where non-finiteness shows first in computation order: a non-finite weight
    (forward order) if any, else the non-finite gradient nearest the loss (backward order),
    as the gradient monitor names it. Names are relative to ``pl_module.net``."""
    params = [p for _, p in named]
    with torch.no_grad():
        weight_bad = ~torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(params)]))
    if bool(weight_bad.any()):
        index = int(weight_bad.nonzero()[0])
    else:
        index = int(bad.nonzero()[-1])
    return _layer_name(named[index][0], pl_module)


def _layer_name(param_name: str, pl_module) -> str:
    module = param_name.rsplit(".", 1)[0] if "." in param_name else param_name
    return module[len("net."):] if hasattr(pl_module, "net") and module.startswith("net.") else module


def _log_scalar(trainer, tag: str, value: float, step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics({tag: value}, step=step)
        logger.save()


def oom_message(batch_size: Any, precision: str, image_size: Any = None) -> str:
    """The ConfigError text for a CUDA out-of-memory error during training."""
    size = f", dataset.image_size={image_size}" if image_size is not None else ""
    if isinstance(batch_size, int) and batch_size > 1:
        fix = f"try dataset.batch_size={batch_size // 2}"
    else:
        fix = "use a smaller model or dataset.image_size"
    return (f"GPU out of memory at dataset.batch_size={batch_size}{size} (trainer.precision={precision}); {fix}, "
            f"or trainer.precision=bf16-mixed / fast.channels_last=true to save memory")
