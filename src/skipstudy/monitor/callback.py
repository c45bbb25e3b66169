"""GradientFlowMonitor: when the per-layer gradient quantities are taken and written.

How it works, per recorded optimizer step (the hooks themselves are a framework-free
:class:`~skipstudy.monitor.taps.LayerTaps`, which this callback arms and collects; the
per-residual-block split and signal-propagation hooks are described there):

* Forward: a forward hook on each tracked layer (active only while training with grad
  enabled, so never in validation or sanity checks) adds the output's activation sums and
  registers a tensor hook on the output (``output.register_hook``). It returns nothing, so
  the layer's output is left as it is.
* Backward: the tensor hook adds the output gradient's sums (and, once per epoch, a device
  histogram of log10|g|). If the output is later changed in place (``ReLU(inplace=True)``
  right after a conv), autograd still hands this hook the gradient w.r.t. the output *as
  the layer produced it*, i.e. before the in-place op (PyTorch autograd notes, "Behavior of
  Tensor hooks when Tensor is modified in-place"); tests/test_monitor.py checks this
  against ``torch.autograd.grad``. ``register_full_backward_hook`` is not used: it wraps
  outputs in an extra autograd node and breaks on in-place ops.
* ``on_before_optimizer_step`` (once per optimizer step, after DDP's all-reduce, after AMP
  unscaling, before gradient clipping): weight-gradient norms of the accumulated gradients
  with one fused ``torch._foreach_norm``, then every quantity is stacked into one tensor
  and moved to the host with a single ``_to_host`` call: one host-device sync per recorded
  step for all layers and quantities together, none on other steps.

Definitions:

* Gradient accumulation: output gradients of the step's micro-batches are combined as
  ``sqrt(sum_k ||dL/dy_k||^2)``: the norm of the gradient of the loss the optimizer
  minimises (Lightning divides each micro-batch loss by the number of micro-batches)
  w.r.t. the layer's output over the whole effective batch. Activation statistics are over
  all micro-batches' outputs. Weight gradients are the accumulated ``.grad``, read once.
* DDP: output-gradient and activation sums are all-reduced, and the output gradient is
  divided by the world size (DDP averages gradients), so values are those of the global
  batch; weight gradients are read after DDP's all-reduce. Every rank computes the same
  numbers (and so takes the same stop decision); only rank 0 writes.
* AMP: bf16 needs no loss scaling; with fp16 and a GradScaler the output gradients are
  divided by the step's loss scale (weight gradients are already unscaled by Lightning),
  and a step whose gradients overflowed is skipped by the scaler and not recorded.
* torch.compile: the forward hook is wrapped in ``torch.compiler.disable``, so Dynamo
  breaks the graph at each tracked layer and runs the hook eagerly on the real output
  tensor; the compiled segments between tracked layers (norms, activations, additions,
  where most fusion happens) stay compiled, and autograd hands the tensor hook the same
  gradient as in eager mode (tests/test_monitor.py compares both with autograd). Fewer
  tracked layers (``monitor.layers``) leave longer compiled segments.
* Non-finite: decided on the gradients (output, weight, total) of a recorded step. The
  layer named is where non-finiteness first appears in computation order: the first
  layer in forward order whose *output* is non-finite if there is one, otherwise the first
  layer in backward order (nearest the loss) whose output gradient is non-finite,
  otherwise the first in backward order whose weight gradient is non-finite. With
  ``every_n_steps > 1`` (or the log schedule) and ``on_nonfinite=stop``,
  ``skipstudy.runs.stopping.DivergenceGuard`` checks the steps the monitor does not record
  (``recording_step``) and reports through :meth:`GradientFlowMonitor.mark_diverged`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from skipstudy import config
from skipstudy.monitor import writers
from skipstudy.monitor.layers import select_layers
from skipstudy.monitor.quantities import SUM_DTYPE
from skipstudy.monitor.taps import LayerTaps

log = logging.getLogger(__name__)

# Each tracked layer's call becomes a graph break, and Dynamo compiles the code after it
# (a block's "resume" function, a layer's forward) once per distinct shape it sees there:
# a ResNet-50 has more than Dynamo's default limit of 8 per code object, beyond which it
# silently falls back to eager. A monitor set up on a compiled network raises the limit to
# this many for the process (Dynamo's config is global; lowering it back later would not
# undo compiles already made).
COMPILED_RECOMPILE_LIMIT = 256


def on_log_schedule(step: int, points_per_decade: int) -> bool:
    """Steps ``floor(10**(k / points_per_decade))`` for k = 0, 1, ... plus step 0:
    0, 1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, ... for 10 points per decade."""
    if step <= 1:
        return True
    k = math.ceil(points_per_decade * math.log10(step))
    return any(math.floor(10 ** (j / points_per_decade) + 1e-9) == step for j in (k - 1, k, k + 1))


def _unwrap(module: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(module)`` (whose names gain ``_orig_mod.``)."""
    return getattr(module, "_orig_mod", module)


def _is_compiled(module: nn.Module) -> bool:
    """Compiled by ``torch.compile(module)`` (a wrapper) or ``module.compile()`` (in place)."""
    return module is not _unwrap(module) or getattr(module, "_compiled_call_impl", None) is not None


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, key) < COMPILED_RECOMPILE_LIMIT:
        setattr(config, key, COMPILED_RECOMPILE_LIMIT)


class GradientFlowMonitor(Callback):
    """Per-layer gradient norms, activation statistics and gradient-flow figures.

    Args:
        layers: ``None`` for every Conv2d and Linear (in forward order), or a list of module
            names relative to ``pl_module.net`` and glob patterns (``layer3.*.conv*``).
        every_n_steps: record every n-th optimizer step (``schedule=every``).
        schedule: ``every`` (every_n_steps) or ``log`` (log-spaced steps, dense early on:
            ``points_per_decade`` per factor of ten; every_n_steps is then not used).
        points_per_decade: density of the log schedule.
        hist_every_n_epochs: every n-th epoch write the per-epoch outputs: output-gradient
            histograms (``grad_hist/output/<layer>``, the epoch's first step), the
            distribution of the epoch's per-step norms (``grad_norm_dist/...``) and the
            gradient-flow figure; 0 turns them off.
        activations: also record ``act/mean``, ``act/std``, ``act/zero_frac`` of each
            tracked layer's output.
        on_nonfinite: ``warn`` (log and go on) or ``stop`` (log, write ``train/diverged``,
            skip the poisoned update, end training cleanly; see ``diverged_at``).
        export: ``json`` (``<run>/grad_stats.json``), ``csv`` (``<run>/grad_stats.csv``) or
            ``none``; written at each epoch end and at the end of fit.
        figure: write the gradient-flow figure (PNG in ``<run>/figures`` and TensorBoard
            image ``figures/gradient_flow``) and, with ``blocks``, the signal-propagation
            figure (``figures/signal_propagation``).
        blocks: also record, per residual block, the skip/branch split of its input gradient
            (``grad_split/*``) and the signal-propagation statistics (``spp/*``).

    Any LightningModule works: the tracked network is ``pl_module.net`` if the module has
    one, else the LightningModule itself. Scalars go to the trainer's TensorBoard logger in
    one event per step, and through ``log_metrics`` to every other logger (CSV, W&B...).

    Attributes:
        layer_names: tracked layer names; forward order once the first step is recorded.
        diverged_at: ``(step, layer)`` of the non-finite step that stopped training, or None.
        nonfinite_steps: recorded steps whose gradients were non-finite.
        overflow_steps: with an fp16 GradScaler, recorded steps the scaler skipped for
            overflowing gradients (not recorded, not counted as non-finite).
        recording_step: the optimizer step now running if the monitor records it, else None.
    """

    def __init__(
        self,
        layers: str | list[str] | None = None,
        every_n_steps: int = 1,
        schedule: str = "every",
        points_per_decade: int = 10,
        hist_every_n_epochs: int = 1,
        activations: bool = True,
        on_nonfinite: str = "stop",
        export: str = "json",
        figure: bool = True,
        blocks: bool = True,
    ) -> None:
        super().__init__()
        # The same declaration the config check uses (skipstudy/config.py), also without Hydra.
        config.check_args("monitor", self, every_n_steps=every_n_steps, points_per_decade=points_per_decade,
                          hist_every_n_epochs=hist_every_n_epochs, schedule=schedule, on_nonfinite=on_nonfinite,
                          export=export, activations=activations, figure=figure, blocks=blocks)
        if layers is not None and not isinstance(layers, str):
            layers = [str(x) if not isinstance(x, str) else x for x in layers]  # ListConfig -> list
        self.layers = layers
        self.every_n_steps = every_n_steps
        self.schedule = schedule
        self.points_per_decade = points_per_decade
        self.hist_every_n_epochs = hist_every_n_epochs
        self.activations = activations
        self.on_nonfinite = on_nonfinite
        self.export = export
        self.figure = figure
        self.blocks = blocks

        self.layer_names: list[str] | None = None
        self.diverged_at: tuple[int, str] | None = None
        self.nonfinite_steps: list[int] = []
        self.taps: LayerTaps | None = None
        self.recording_step: int | None = None
        self._hist_pending = False
        self._open_step: int | None = None
        self._rank_zero = True
        self._tb: writers.TensorBoardWriter | None = None
        self._run_dir = None
        self.series: writers.SeriesExport | None = None  # rank 0: the recorded rows
        self._other_loggers: list = []
        self._epoch_nonfinite = 0
        self.overflow_steps = 0

    # ------------------------------------------------------------------ configuration

    def resolve(self, net: nn.Module) -> list[str]:
        """Check ``monitor.layers`` against the bare network; returns the tracked names.

        Raises:
            ConfigError: a name that matches nothing (with the closest real names).
        """
        self.layer_names = select_layers(_unwrap(net), self.layers)
        return list(self.layer_names)

    def _scheduled(self, step: int) -> bool:
        if self.schedule == "log":
            return on_log_schedule(step, self.points_per_decade)
        return step % self.every_n_steps == 0

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        net = _unwrap(getattr(pl_module, "net", pl_module))
        if _is_compiled(pl_module) or _is_compiled(getattr(pl_module, "net", pl_module)):
            _raise_recompile_limit()
        self.resolve(net)
        self.taps = LayerTaps(net, self.layer_names, self.activations, self.blocks)
        self._open_step = None
        self._rank_zero = trainer.is_global_zero
        # trainer.log_dir broadcasts from rank 0 under DDP: every rank must ask, or rank 0 waits.
        self._run_dir = writers.run_dir(trainer)
        if self._rank_zero:
            summary_writer = writers.find_summary_writer(trainer)
            self._tb = writers.TensorBoardWriter(summary_writer) if summary_writer is not None else None
            self._other_loggers = writers.other_loggers(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        self._flush()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._flush()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # The export on disk then holds every step the checkpoint has trained: a run killed
        # after it resumes with the export whole (skipstudy/runs/resume.py cuts later rows).
        self._flush()

    def _remove_hooks(self) -> None:
        if self.taps is not None:
            self.taps.remove()

    @property
    def _layers(self) -> list:
        return self.taps._layers if self.taps is not None else []

    # ------------------------------------------------------------------ when

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        n = self.hist_every_n_epochs
        self._hist_pending = n > 0 and trainer.current_epoch % n == 0
        self._epoch_nonfinite = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._open_step:
            return  # another micro-batch of the same optimizer step: keep accumulating
        self._open_step = step
        hist, self._hist_pending = self._hist_pending, False
        recording = hist or self._scheduled(step)
        self.recording_step = step if recording else None
        if self.taps is None:
            return
        if recording:
            self.taps.arm(hist=hist)
        else:
            self.taps.armed = False

    # ------------------------------------------------------------------ one recorded step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.taps is None or not self.taps.armed:
            return
        step = trainer.global_step
        world = trainer.world_size
        param = next(pl_module.parameters())
        scale = torch.full((), 1.0 / world, dtype=SUM_DTYPE, device=param.device)
        loss_scale = self._loss_scale(trainer)
        if loss_scale is not None:
            scale = scale / loss_scale.to(SUM_DTYPE)
        reduce = None
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            reduce = torch.distributed.all_reduce
        host, row_present = self.taps.collect(list(pl_module.parameters()), scale, reduce)
        self.layer_names = list(self.taps.layer_names)
        self._handle_step(trainer, pl_module, step, host, row_present)
        for unit in (*self.taps._layers, *self.taps._blocks):
            unit.reset()

    @staticmethod
    def _loss_scale(trainer) -> Tensor | None:
        """The GradScaler's current scale as a device tensor (``get_scale()`` would sync)."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)

    def _handle_step(self, trainer, pl_module, step: int, host: dict, row_present: np.ndarray) -> None:
        values, present, row = host["values"], host["present"], host["row"]
        hist, scale = host["hist"], host["scale"]
        grads_finite = all(
            np.isfinite(values[q.name][present[q.needs]]).all()
            for q in self.taps.quantities
            if q.needs in ("output", "weight", "params")
        )
        if not grads_finite and self._loss_scale(trainer) is not None:
            # fp16 overflow: the GradScaler skips this update and lowers its scale.
            self.overflow_steps += 1
            return

        if self._rank_zero:
            self._write_step(trainer, step, row, row_present, hist, scale)
        if not grads_finite:
            self._nonfinite(trainer, pl_module, step, values, present)

    # ------------------------------------------------------------------ where (rank 0)

    def _write_step(self, trainer, step, row, row_present, hist, scale) -> None:
        taps = self.taps
        if self.series is None:
            fmt = self.export if self.export != "none" else "json"
            path = self._run_dir / f"grad_stats.{fmt}"
            self.series = writers.SeriesExport(path, fmt, list(self.layer_names), taps.tags(), list(taps.block_names))
            if step > 0 and self.export != "none":
                self.series.keep_earlier(before=step)  # resumed run: continue the export
        self.series.append(step, trainer.current_epoch, row)
        # A non-finite gradient is written as such (NaN/inf); what does not exist (a weight
        # gradient of a ReLU, the shortcut part of a plain block) is not written at all.
        scalars = {tag: float(v) for tag, v, ok in zip(taps.tags(), row, row_present) if ok}
        for logger in self._other_loggers:
            logger.log_metrics(scalars, step=step)
        if self._tb is None:
            return
        self._tb.scalars(scalars, step)
        if hist.size:
            self._write_histograms(step, hist, scale)

    def _write_histograms(self, step: int, hist: np.ndarray, scale: float) -> None:
        """Device-binned log10|g| histograms. The bins were filled with the raw (micro-batch,
        per-process, loss-scaled) gradient elements; shifting the edges by log10(scale)
        makes them elements of the gradient of the optimised loss."""
        bins = self.taps.bins
        width = bins.bins + 2
        shift = math.log10(scale)
        edges = np.asarray(bins.edges()) + shift
        for j, layer in enumerate(self._layers):
            h = hist[j * width : (j + 1) * width]
            counts, s1, s2 = h[:-2], h[-2], h[-1]
            n = counts.sum()
            s1_true = s1 + n * shift
            s2_true = s2 + 2 * shift * s1 + n * shift * shift
            self._tb.histogram_raw(f"grad_hist/output/{layer.name}", edges, counts, s1_true, s2_true, step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.on_nonfinite == "warn" and self._epoch_nonfinite > 1 and self._rank_zero:
            log.warning("%d recorded steps of epoch %d had non-finite gradients", self._epoch_nonfinite, trainer.current_epoch)
        if not self._rank_zero or self.series is None:
            return
        n = self.hist_every_n_epochs
        epoch = trainer.current_epoch
        rows = [r for r, e in zip(self.series.rows, self.series.epochs) if e == epoch]
        if n > 0 and epoch % n == 0 and rows:
            self._write_epoch_summaries(trainer, epoch, np.stack(rows))
        self._flush()

    def _columns(self, table: np.ndarray, name: str) -> np.ndarray:
        """``[steps, layers or blocks]`` slice of the rows for quantity ``name``."""
        widths = {"layers": len(self.taps.layer_names), "blocks": len(self.taps.block_names), "step": 1}
        start = 0
        for q in self.taps.quantities:
            if q.name == name:
                return table[:, start : start + widths[q.over]]
            start += widths[q.over]
        raise KeyError(name)

    def _write_epoch_summaries(self, trainer, epoch: int, table: np.ndarray) -> None:
        step = trainer.global_step
        out = self._columns(table, "grad_norm/output").astype(np.float64)
        weight = self._columns(table, "grad_norm/weight").astype(np.float64)
        if self._tb is not None:
            # What the Tiny ImageNet study animated: how the epoch's per-step norms spread.
            for kind, data in (("output", out), ("weight", weight)):
                for j, layer in enumerate(self._layers):
                    v = data[:, j]
                    v = v[np.isfinite(v) & (v > 0)]
                    self._tb.histogram(f"grad_norm_dist/{kind}/{layer.name}", np.log10(v), step)
        if self.figure:
            fig = writers.gradient_flow_figure(
                self.layer_names, out, weight, f"Gradient flow, epoch {epoch} ({table.shape[0]} recorded steps)"
            )
            path = self._run_dir / "figures" / f"gradient_flow_epoch{epoch}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
            if self._tb is not None:
                self._tb.image("figures/gradient_flow", writers.figure_rgb(fig), step)
            if self.taps.block_names:
                spp = {name: self._columns(table, name).astype(np.float64)
                       for name in writers.SPP_PANELS if any(q.name == name for q in self.taps.quantities)}
                fig = writers.signal_propagation_figure(
                    self.taps.block_names, spp, f"Signal propagation, epoch {epoch} ({table.shape[0]} recorded steps)"
                )
                fig.savefig(self._run_dir / "figures" / f"signal_propagation_epoch{epoch}.png")
                if self._tb is not None:
                    self._tb.image("figures/signal_propagation", writers.figure_rgb(fig), step)

    def _flush(self) -> None:
        if not self._rank_zero:
            return
        if self.series is not None and self.export != "none":
            self.series.nonfinite_steps = list(self.nonfinite_steps)
            self.series.diverged_at = self.diverged_at
            self.series.flush()
        if self._tb is not None:
            self._tb.flush()

    # ------------------------------------------------------------------ non-finite

    def _origin(self, values: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> tuple[str, str]:
        """The layer where non-finiteness first appears in computation order, and where."""
        names = [l.name for l in self._layers]

        def bad(name: str, needs: str) -> np.ndarray:
            if name not in values:
                return np.zeros(len(names), dtype=bool)
            return present[needs] & ~np.isfinite(values[name])

        act_bad = bad("act/mean", "activation") | bad("act/std", "activation")
        if act_bad.any():
            return names[int(np.flatnonzero(act_bad)[0])], "first non-finite output in forward order"
        out_bad = bad("grad_norm/output", "output")
        if out_bad.any():
            return names[int(np.flatnonzero(out_bad)[-1])], "first non-finite output gradient in backward order"
        w_bad = bad("grad_norm/weight", "weight")
        if w_bad.any():
            return names[int(np.flatnonzero(w_bad)[-1])], "first non-finite weight gradient in backward order"
        return "(untracked parameters)", "only the total norm over all parameters is non-finite"

    def mark_diverged(self, step: int, layer: str) -> None:
        """Training stopped at a non-finite step this monitor did not record (found by
        ``skipstudy.runs.stopping.DivergenceGuard``): keep the verdict with the recorded series,
        so the export, the HParams and the exit status tell one story."""
        self.nonfinite_steps.append(step)
        self.diverged_at = (step, layer)
        self._flush()

    def _nonfinite(self, trainer, pl_module, step: int, values, present) -> None:
        layer, where = self._origin(values, present)
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
                self._tb.scalars({"train/diverged": 1.0}, step)
        # Skip the poisoned update: with no .grad the optimizer leaves every parameter (and its
        # state) as it was, so the weights, and any checkpoint saved on the way out, stay those
        # of the last good step. Every rank sees the same all-reduced values and does the same.
        for p in pl_module.parameters():
            p.grad = None
        trainer.should_stop = True
        self._flush()
