"""GradientFlowMonitor: the Lightning adapter of :class:`~skipstudy.monitor.taps.LayerTaps`:
which steps are recorded, and where their numbers go.

A recorded step is packed in ``on_before_optimizer_step`` (after DDP's all-reduce and AMP
unscaling, before clipping) over all micro-batches of the step, and its one host transfer starts
without blocking. On a GPU its values are read when the copy has landed, normally at the next
step's ``on_before_optimizer_step`` (at the latest at an epoch end, a checkpoint or the end of
fit, which wait for it): the host never waits for the device inside a step. On the CPU they are
read at once. Under DDP the sums are all-reduced and divided by the world size, so every rank
takes the same stop decision; rank 0 writes. fp16 output gradients are divided by the loss
scale; a step whose gradients overflowed is the GradScaler's to skip. Under torch.compile each
tracked layer is a graph break.

``on_nonfinite=stop`` read a step late still names the step and layer where it started, and no
update with a non-finite gradient is applied: an optimizer built with ``fused=True`` gets a
device-side ``found_inf`` (what the GradScaler gives it), so it skips that update itself; with
any other optimizer the values are read before its update, which on a GPU waits for the device
once a recorded step (the price of the guarantee; ``on_nonfinite=warn`` does not pay it).

A module with a ``step_metrics`` attribute (``LitClassifier``) puts its per-step device scalars
there instead of ``self.log``; on each step Lightning would log, recorded or not, the monitor
copies them to the host the same way and writes them to every logger as Lightning would.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from skipstudy.monitor import writers
from skipstudy.monitor.layers import find_blocks, select_layers
from skipstudy.monitor.options import Monitor
from skipstudy.monitor.sums import SUM_DTYPE
from skipstudy.monitor.taps import LayerTaps, PendingStep, UpdateGuard, _to_host

log = logging.getLogger(__name__)


def on_log_schedule(step: int, points_per_decade: int) -> bool:
    """Steps ``floor(10**(k / points_per_decade))`` for k = 0, 1, ... plus step 0:
    0, 1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, ... for 10 points per decade."""
    if step <= 1:
        return True
    k = math.ceil(points_per_decade * math.log10(step))
    return any(math.floor(10 ** (j / points_per_decade) + 1e-9) == step for j in (k - 1, k, k + 1))


class GradientFlowMonitor(Callback):
    """Per-layer gradient norms, activation statistics and gradient-flow figures; the arguments
    are the keys of ``monitor/options.py``'s ``Monitor``, documented there.

    The tracked network is ``pl_module.net`` if there is one, else the LightningModule.
    Scalars go to TensorBoard as one event per step, and through ``log_metrics`` to any
    other logger. ``recording_step`` is the running optimizer step if it is recorded (the
    others are ``skipstudy.runs.stopping.DivergenceGuard``'s to check); ``overflow_steps``
    counts fp16 steps the GradScaler skipped; ``series`` holds rank 0's recorded rows.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        # The keys, their defaults and ranges: monitor/options.py (checked there, by config.check).
        o = Monitor.model_construct(**options)
        self.layers = o.layers if o.layers is None or isinstance(o.layers, str) else [str(x) for x in o.layers]
        self.every_n_steps, self.schedule, self.points_per_decade = o.every_n_steps, o.schedule, o.points_per_decade
        self.hist_every_n_epochs, self.activations, self.on_nonfinite = o.hist_every_n_epochs, o.activations, o.on_nonfinite
        self.export, self.figure, self.blocks = o.export, o.figure, o.blocks
        self.layer_names: list[str] | None = None
        self.diverged_at: tuple[int, str] | None = None
        self.nonfinite_steps: list[int] = []
        self.overflow_steps = 0
        self.recording_step: int | None = None
        self.taps: LayerTaps | None = None
        self.series: writers.SeriesExport | None = None
        self._rank_zero = True
        self._tb = None  # rank 0's SummaryWriter
        self._hist_pending = False  # a run resumed mid-epoch starts no epoch
        self._epoch_nonfinite = 0
        self._pending: list = []  # recorded steps whose values are on their way to the host
        self._guard = UpdateGuard()  # a non-finite update skipped though read late

    def resolve(self, net: nn.Module) -> None:
        """Check ``monitor.layers`` against the network before training (ConfigError naming
        the closest names), and ``monitor.blocks`` (undeclared blocks: a warning, refused if true)."""
        self.layer_names = select_layers(getattr(net, "_orig_mod", net), self.layers)  # torch.compile(net)
        if self.blocks is not False:  # monitor.blocks=true: a block that declares nothing is refused now
            find_blocks(getattr(net, "_orig_mod", net), strict=self.blocks is True)

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.taps is not None:
            self.taps.remove()
        # Under torch.compile, Dynamo compiles the code after each graph break (each hook) once per
        # distinct shape: a ResNet-50 has more than the default limit of 8 per code object, beyond
        # which it silently runs eagerly. A global, kept for the process (an older torch without it: slower).
        if hasattr(config := getattr(torch.compiler, "config", None), "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, 256)
        self.taps = LayerTaps(getattr(pl_module, "net", pl_module), self.layers, self.activations, self.blocks)
        self.layer_names = self.taps.layer_names
        self._open_step = None
        self._trainer = trainer  # state_dict() has no trainer argument
        self._rank_zero = trainer.is_global_zero
        # trainer.log_dir is the Hydra output dir in skipstudy; a collective under DDP: every rank asks.
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        loggers = trainer.loggers if self._rank_zero else []
        self._tb = next((lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
        self._others = [lg for lg in loggers if not isinstance(lg, TensorBoardLogger)]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.taps is not None:
            self.taps.remove()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)
        self._flush()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Copies that have landed are whole earlier steps (on a GPU the last good step's values and
        # its train/loss land a step late): written. The rest, the failed step's, are dropped; a
        # device in an error state may refuse even the question, which must not hide the exception.
        with contextlib.suppress(Exception):
            self._drain(trainer, pl_module, wait=False)
        self._pending = []
        self._flush()

    def state_dict(self) -> dict[str, Any]:
        # The event files and the export then hold every step the checkpoint has trained: a run
        # killed after it resumes with them whole (skipstudy/runs/resume.py cuts later rows).
        # Lightning asks every callback's state_dict before any on_save_checkpoint, where
        # RunState takes the event files' sizes.
        if self.taps is not None:
            self._drain(self._trainer, self._trainer.lightning_module, wait=True)
            self._flush()
        return {}

    # ------------------------------------------------------------------ when

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        n = self.hist_every_n_epochs
        self._hist_pending = n > 0 and trainer.current_epoch % n == 0
        self._epoch_nonfinite = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._open_step:
            return  # another micro-batch of the same optimizer step: keep adding
        self._open_step = step
        hist, self._hist_pending = self._hist_pending, False
        scheduled = on_log_schedule(step, self.points_per_decade) if self.schedule == "log" \
            else step % self.every_n_steps == 0
        self.recording_step = step if hist or scheduled else None
        if hasattr(pl_module, "step_metrics"):
            pl_module.step_metrics = {}  # the module's per-step scalars come here (on_train_batch_end)
        self.taps.arm(hist=hist)
        self.taps.armed = self.recording_step is not None

    # ------------------------------------------------------------------ one recorded step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Earlier steps whose copies have landed; under DDP all earlier steps, so that every rank
        # handles (and stops at) the same step whatever its copies' timing.
        self._drain(trainer, pl_module, wait=trainer.world_size > 1)
        if not self.taps.armed or (self.diverged_at is not None and self.on_nonfinite == "stop"):
            return  # stopping: this step's gradients were just dropped
        step = trainer.global_step
        scale = torch.full((), 1.0 / trainer.world_size, dtype=SUM_DTYPE, device=next(pl_module.parameters()).device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fp16 = scaler is not None and scaler.is_enabled()
        if fp16:  # scaler.scale(1) is the loss scale on the device (in float64); get_scale() would sync
            scale = scale / scaler.scale(torch.ones_like(scale))
        reduce = torch.distributed.all_reduce if trainer.world_size > 1 else None
        pending = self.taps.pack(list(pl_module.parameters()), scale, reduce)
        pending.step, pending.epoch, pending.fp16 = step, trainer.current_epoch, fp16
        self._pending.append(pending)
        if self.on_nonfinite == "stop" and not fp16:
            self._guard.arm(optimizer, pending, trainer.world_size, pending.grads_nonfinite,
                            partial(self._drain, trainer, pl_module, wait=True))
        self._drain(trainer, pl_module, wait=False)  # on the CPU: now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._guard.disarm()
        metrics = getattr(pl_module, "step_metrics", None)
        if not metrics or trainer.global_step == self._open_step:
            return  # a micro-batch that only accumulated: the step's last one is logged, as by self.log
        trainer.callback_metrics.update(metrics)  # as Lightning has them after a step: device tensors
        every = trainer.log_every_n_steps  # Lightning's condition for writing a step's self.log values
        if not (trainer.fast_dev_run or (every > 0 and trainer.global_step % every == 0) or trainer.should_stop):
            return
        trainer.logged_metrics.update(metrics)
        host, event = _to_host(torch.stack([t.reshape(()) for t in metrics.values()]))  # stack: exact promotion
        tags = tuple(metrics)
        self._pending.append(PendingStep(self._open_step, host, event, lambda h: dict(zip(tags, h.tolist())),
                                         epoch=trainer.current_epoch, metrics=True))
        self._drain(trainer, pl_module, wait=False)  # on the CPU: now

    def _drain(self, trainer, pl_module, wait: bool) -> None:
        """Handle the recorded steps whose values have reached the host, in step order (all of
        them, waiting for the copies, with ``wait``)."""
        def ready(pending) -> bool:  # under DDP only what is there at once (the CPU), the same on every rank
            return pending.ready() if trainer.world_size == 1 else pending.event is None

        while self._pending and (wait or ready(self._pending[0])):
            pending = self._pending.pop(0)
            if pending.metrics:  # the module's scalars, to every logger as Lightning's logger connector writes them
                for logger in trainer.loggers if self._rank_zero else []:
                    logger.log_metrics({**pending.read(), "epoch": pending.epoch}, step=pending.step)
            else:
                self._record(trainer, pl_module, pending, *pending.read())

    def _record(self, trainer, pl_module, pending, scalars, row, whole, out_scale) -> None:
        step = pending.step
        self.layer_names = self.taps.layer_names
        grads = ("grad_norm/output/", "grad_norm/weight/", "grad_norm/total")
        finite = all(math.isfinite(v) for tag, v in scalars.items() if tag.startswith(grads))
        if not finite and pending.fp16:
            self.overflow_steps += 1  # fp16 overflow: the GradScaler skips the update and lowers its scale
            return
        if self._rank_zero:
            if self.series is None:
                fmt = self.export if self.export != "none" else "json"
                self.series = writers.SeriesExport(self._run_dir / f"grad_stats.{fmt}", fmt, self.layer_names,
                                                   self.taps.tags(), self.taps.block_names)
                if step > 0 and self.export != "none":
                    self.series.keep_earlier(before=step)  # resumed run: continue the export
            self.series.append(step, pending.epoch, row)
            # Non-finite values are written as such; what does not exist is not written at all.
            for logger in self._others:
                logger.log_metrics(scalars, step=step)
            if self._tb is not None:
                writers.write_scalars(self._tb, scalars, step)
                if "hist" in whole:
                    writers.write_histograms(self._tb, self.layer_names, whole["hist"], out_scale, step)
        if not finite:
            self._nonfinite(trainer, pl_module, step, scalars)

    # ------------------------------------------------------------------ epoch summaries (rank 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)  # the epoch's summaries need all its rows
        if self.on_nonfinite == "warn" and self._epoch_nonfinite > 1 and self._rank_zero:
            log.warning("%d recorded steps of epoch %d had non-finite gradients", self._epoch_nonfinite,
                        trainer.current_epoch)
        if not self._rank_zero or self.series is None:
            return
        epoch, n = trainer.current_epoch, self.hist_every_n_epochs
        rows = [r for r, e in zip(self.series.rows, self.series.epochs) if e == epoch]
        if n > 0 and epoch % n == 0 and rows:
            self._write_epoch_summaries(trainer.global_step, epoch, np.stack(rows))
        self._flush()

    def _write_epoch_summaries(self, step: int, epoch: int, table: np.ndarray) -> None:
        names, blocks, tags = self.layer_names, self.taps.block_names, self.series.tags

        def columns(name: str, units: list[str]) -> np.ndarray:
            return table[:, [tags.index(f"{name}/{u}") for u in units]]

        norms = {kind: columns(f"grad_norm/{kind}", names) for kind in ("output", "weight")}
        if self._tb is not None:
            # What the Tiny ImageNet study animated: how the epoch's per-step norms spread.
            for kind, data in norms.items():
                for j, layer in enumerate(names):
                    v = data[:, j][np.isfinite(data[:, j]) & (data[:, j] > 0)]
                    if v.size:
                        self._tb.add_histogram(f"grad_norm_dist/{kind}/{layer}", np.log10(v), step)
        if not self.figure:
            return
        title = f"epoch {epoch} ({table.shape[0]} recorded steps)"
        figures = {"gradient_flow": writers.gradient_flow_figure(names, norms["output"], norms["weight"],
                                                                 f"Gradient flow, {title}")}
        if blocks:
            panels = {side: {label: columns(q, blocks) for q, label in panel.items()}
                      for side, panel in writers.SPP_PANELS.items()}
            figures["signal_propagation"] = writers.profile_figure(blocks, panels, f"Signal propagation, {title}",
                                                                   "residual block (forward order)")
        (self._run_dir / "figures").mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            fig.savefig(self._run_dir / "figures" / f"{name}_epoch{epoch}.png")
            if self._tb is not None:
                self._tb.add_image(f"figures/{name}", writers.figure_rgb(fig), step, dataformats="HWC")

    def _flush(self) -> None:
        if not self._rank_zero:
            return
        if self.series is not None and self.export != "none":
            self.series.flush(self.nonfinite_steps, self.diverged_at)
        if self._tb is not None:
            self._tb.flush()

    # ------------------------------------------------------------------ non-finite

    def _origin(self, scalars: dict[str, float]) -> tuple[str, str]:
        """The layer where non-finiteness first appears in computation order, and how."""

        def bad(*tags: str) -> bool:
            return not all(math.isfinite(scalars.get(tag, 0.0)) for tag in tags)

        for name in self.layer_names:
            if bad(f"act/mean/{name}", f"act/std/{name}"):
                return name, "first non-finite output in forward order"
        for kind in ("output", "weight"):
            for name in reversed(self.layer_names):
                if bad(f"grad_norm/{kind}/{name}"):
                    return name, f"first non-finite {kind} gradient in backward order"
        return "(untracked parameters)", "only the total norm over all parameters is non-finite"

    def mark_diverged(self, step: int, layer: str) -> None:
        """Training stopped at a non-finite step this monitor did not record: keep the verdict
        with the recorded series, so the export, the HParams and the exit status agree."""
        self.nonfinite_steps.append(step)
        self.diverged_at = (step, layer)
        self._flush()

    def _nonfinite(self, trainer, pl_module, step: int, scalars: dict[str, float]) -> None:
        layer, where = self._origin(scalars)
        self.nonfinite_steps.append(step)
        self._epoch_nonfinite += 1
        message = f"non-finite gradient at step {step}, first layer {layer}"
        if self.on_nonfinite == "warn":
            if self._rank_zero and len(self.nonfinite_steps) == 1:
                log.warning("%s (%s); monitor.on_nonfinite=warn: training goes on", message, where)
            return
        self.diverged_at = (step, layer)
        if self._rank_zero:
            log.error("%s (%s)", message, where)
            if self._tb is not None:
                writers.write_scalars(self._tb, {"train/diverged": 1.0}, step)
        # Skip the poisoned update: with no .grad the optimizer leaves every parameter and its
        # state as they were, so the weights (and any checkpoint saved on the way out) stay
        # those of the last good step. Every rank sees the same all-reduced values.
        for p in pl_module.parameters():
            p.grad = None
        trainer.should_stop = True
        self._flush()
