"""Per-run summary numbers for TensorBoard's HParams dashboard, logged once at the end of fit.

The dashboard shows, for each run of a sweep, its overrides next to metrics that it reads
as the last value of a scalar series of that run. ``val/acc`` and ``val/loss`` are series
already; the two written here summarise a whole run in one number:

- ``hparams/min_first_layer_grad_rms``: the smallest RMS of the loss gradient w.r.t. the
  output of the first tracked layer over the recorded steps (the monitor's
  ``grad_rms/output/<first layer>``). The first layer is where a vanishing gradient is
  smallest, so this is the number a plain-vs-residual sweep compares (He et al. 2016).
- ``hparams/grad_decay_slope``: the median over the recorded steps of the monitor's
  ``grad_decay/slope`` (least-squares slope of log10 output-gradient RMS against layer
  index), so the dashboard ranks runs by how fast gradients vanish towards the input.
- ``hparams/diverged``: 1 when training diverged (the monitor met a non-finite gradient, or
  the last training or validation loss is not finite), else 0.

Only measured values are written: without a monitor (``monitor=off``) or with no recorded
step there is no gradient RMS, and the dashboard leaves that cell empty.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np

MIN_FIRST_LAYER_GRAD_RMS = "hparams/min_first_layer_grad_rms"
DIVERGED = "hparams/diverged"
GRAD_DECAY_SLOPE = "hparams/grad_decay_slope"
TAGS = (MIN_FIRST_LAYER_GRAD_RMS, GRAD_DECAY_SLOPE, DIVERGED)


def min_first_layer_grad_rms(monitor: Any) -> float | None:
    """Smallest finite ``grad_rms/output/<first tracked layer>`` the monitor recorded, or None."""
    series = getattr(monitor, "series", None)
    names = getattr(monitor, "layer_names", None)
    if series is None or not names or not series.rows:
        return None
    tag = f"grad_rms/output/{names[0]}"
    if tag not in series.tags:
        return None
    column = np.asarray([row[series.tags.index(tag)] for row in series.rows], dtype=np.float64)
    column = column[np.isfinite(column)]
    return float(column.min()) if column.size else None


def grad_decay_slope(monitor: Any) -> float | None:
    """Median of the finite ``grad_decay/slope`` values the monitor recorded, or None."""
    series = getattr(monitor, "series", None)
    if series is None or not series.rows or "grad_decay/slope" not in series.tags:
        return None
    j = series.tags.index("grad_decay/slope")
    column = np.asarray([row[j] for row in series.rows], dtype=np.float64)
    column = column[np.isfinite(column)]
    return float(np.median(column)) if column.size else None


def diverged(trainer: Any, monitor: Any) -> float | None:
    """1.0 if the run diverged, 0.0 if not, None when nothing ran that could tell."""
    if monitor is not None and (getattr(monitor, "diverged_at", None) is not None
                                or getattr(monitor, "nonfinite_steps", None)):
        return 1.0
    losses = [trainer.callback_metrics.get(k) for k in ("train/loss", "val/loss")]
    losses = [float(v) for v in losses if v is not None and getattr(v, "numel", lambda: 1)() == 1]
    if not losses:
        return None
    return 0.0 if all(math.isfinite(v) for v in losses) else 1.0


def final_metrics(trainer: Any, monitor: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    rms = min_first_layer_grad_rms(monitor) if monitor is not None else None
    if rms is not None:
        out[MIN_FIRST_LAYER_GRAD_RMS] = rms
    slope = grad_decay_slope(monitor) if monitor is not None else None
    if slope is not None:
        out[GRAD_DECAY_SLOPE] = slope
    div = diverged(trainer, monitor)
    if div is not None:
        out[DIVERGED] = div
    return out


class FinalMetrics(L.Callback):
    """Logs :func:`final_metrics` at the last global step when fit ends (rank 0 only).

    Args:
        monitor: the run's ``GradientFlowMonitor``, or None with ``monitor=off``.
    """

    def __init__(self, monitor: Any = None) -> None:
        super().__init__()
        self.monitor = monitor

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = final_metrics(trainer, self.monitor)
        if not values:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()
