"""Per-run numbers for TensorBoard's HParams dashboard (it shows a scalar series' last value),
written once at the end of fit from the run's own event file; only measured values are written."""

from __future__ import annotations

import math

import lightning as L
import numpy as np

from skipstudy.analysis.logs import Run, load_run

MIN_FIRST_LAYER_GRAD_RMS = "hparams/min_first_layer_grad_rms"  # the first tracked layer, where gradients vanish
GRAD_DECAY_SLOPE = "hparams/grad_decay_slope"  # median grad_decay/slope: how fast they vanish towards the input
DIVERGED = "hparams/diverged"  # 1 after non-finite gradients or a non-finite last loss
TAGS = (MIN_FIRST_LAYER_GRAD_RMS, GRAD_DECAY_SLOPE, DIVERGED)


def final_metrics(run: Run) -> dict[str, float]:
    out = {}
    rms = run.series(f"grad_rms/output/{run.layers[0]}") if run.layers else None
    if rms is not None and np.isfinite(rms.values).any():
        out[MIN_FIRST_LAYER_GRAD_RMS] = float(rms.values[np.isfinite(rms.values)].min())
    slope = run.series("grad_decay/slope")
    if slope is not None and np.isfinite(slope.values).any():
        out[GRAD_DECAY_SLOPE] = float(np.median(slope.values[np.isfinite(slope.values)]))
    losses = [s.last() for tag in ("train/loss", "val/loss") if (s := run.series(tag)) is not None]
    if run.diverged or losses:  # nothing ran that could tell: no verdict
        out[DIVERGED] = float(run.diverged or not all(map(math.isfinite, losses)))
    return out


class FinalMetrics(L.Callback):
    """Also keeps the run it read (``run``), so the end-of-run summary reads the event file no
    second time."""

    def __init__(self) -> None:
        self.trained = False
        self.run: Run | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trained = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = trainer.log_dir  # broadcasts under DDP: every rank must ask
        # A finished run resumed trains nothing (Lightning skips on_train_start) and keeps its
        # logs whole, these numbers included: writing them again would repeat them.
        if not trainer.is_global_zero or not self.trained:
            return
        trainer.logger.experiment.flush()  # read back what was logged
        self.run = load_run(run_dir)
        if values := final_metrics(self.run):
            for logger in trainer.loggers:  # TensorBoard first; CSV, MLflow, W&B get them too
                logger.log_metrics(values, step=trainer.global_step)
                logger.save()
