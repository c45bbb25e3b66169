"""ReportCallback: the report's TensorBoard side, inside a training run.

* At fit start, a custom-scalars layout (TensorBoard's CUSTOM SCALARS tab): one multi-line
  chart per monitored quantity with all tracked layers in it (``grad_rms/output`` of every
  layer in one chart, and so on), plus loss and accuracy charts with train and val together.
* At fit end (opt-in, ``report.figures_to_tensorboard=true``), the comparison report's
  figures for this one run, as TensorBoard images ``report/<figure>``. They are drawn from
  the run's own event file, exactly as ``python -m skipstudy.report <run>`` would draw
  them. It is opt-in because reading back a long run's events takes time at the end of
  every training.

Only rank 0 writes. Configured by the ``report:`` node of ``conf/train.yaml``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from lightning.pytorch.callbacks import Callback


log = logging.getLogger(__name__)

# The training charts every run gets, monitor or not.
TRAINING_CHARTS = {
    "loss (train, val)": ["train/loss", "val/loss", "train/loss_epoch"],
    "accuracy (train, val)": ["train/acc", "val/acc", "train/acc_epoch"],
    "gradient norm, all parameters": ["grad_norm/total"],
}


def _exact(tag: str) -> str:
    # Chart entries are regular expressions; anchor them so `fc` does not match `layer1.fc2`.
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(layers: list[str], quantities: list[str]) -> dict[str, dict[str, list]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: one multi-line chart per
    per-layer quantity (all ``layers`` in it, in the given order) and the training charts.

    Args:
        layers: tracked layer names (the monitor's ``layer_names``); empty for no monitor.
        quantities: per-layer quantity names, e.g. ``["grad_rms/output", "act/std"]``.
    """
    layout: dict[str, dict[str, list]] = {"training": {title: ["Multiline", [_exact(t) for t in tags]]
                                                        for title, tags in TRAINING_CHARTS.items()}}
    if layers:
        for q in quantities:
            category = "activations (all layers)" if q.startswith("act/") else "gradients (all layers)"
            layout.setdefault(category, {})[q] = ["Multiline", [_exact(f"{q}/{layer}") for layer in layers]]
    return layout


def _summary_writer(trainer) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _monitor(trainer):
    from skipstudy.monitor import GradientFlowMonitor

    return next((cb for cb in trainer.callbacks if isinstance(cb, GradientFlowMonitor)), None)


class ReportCallback(Callback):
    """Custom-scalars layout at fit start, the run's report figures as images at fit end.

    Args:
        custom_scalars: write the multi-line chart layout (``report.custom_scalars``).
        figures_to_tensorboard: at the end of fit, draw the report's figures for this run and
            add them as images ``report/<figure>`` (``report.figures_to_tensorboard``).
    """

    def __init__(self, custom_scalars: bool = True, figures_to_tensorboard: bool = False) -> None:
        super().__init__()
        self.custom_scalars = custom_scalars
        self.figures_to_tensorboard = figures_to_tensorboard

    def on_fit_start(self, trainer, pl_module) -> None:
        if not (self.custom_scalars and trainer.is_global_zero) or trainer.ckpt_path is not None:
            return  # a resumed run keeps the layout it wrote when it started
        writer = _summary_writer(trainer)
        if writer is None:
            return
        monitor = _monitor(trainer)
        layers = list(monitor.layer_names or []) if monitor is not None else []
        from skipstudy.monitor import QUANTITIES

        quantities = [q.name for q in QUANTITIES.values()
                      if q.per_layer and (monitor is None or monitor.activations or q.needs != "activation")]
        writer.add_custom_scalars(custom_scalars_layout(layers, quantities))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.figures_to_tensorboard:
            return
        run_dir = trainer.log_dir  # broadcasts under DDP, so every rank must ask, not rank 0 alone
        if not trainer.is_global_zero or run_dir is None:
            return
        writer = _summary_writer(trainer)
        if writer is None:
            return
        writer.flush()  # the figures are drawn from what is on disk
        try:
            self._write_figures(trainer, writer, run_dir)
        except Exception:  # noqa: BLE001 - the run is finished and saved; a figure must not fail it
            log.exception("report.figures_to_tensorboard: drawing the run's figures failed")

    @staticmethod
    def _write_figures(trainer, writer, run_dir: str) -> None:
        from skipstudy.analysis.figures import figure_rgb, run_figures
        from skipstudy.analysis.logs import assign_labels, load_run

        run = load_run(run_dir)
        assign_labels([run])
        for name, fig in run_figures([run]).items():
            if name == "depth_sweep":
                continue  # one run, one depth: nothing to compare
            writer.add_image(f"report/{name}", figure_rgb(fig), trainer.global_step, dataformats="HWC")
        writer.flush()


def build_report_callback(node: Any) -> ReportCallback | None:
    """The callback from the ``report:`` config node (checked by skipstudy/config.py), or None
    when the node is missing or turns everything off."""
    if not node:
        return None
    callback = ReportCallback(**dict(node))
    if not (callback.custom_scalars or callback.figures_to_tensorboard):
        return None
    return callback
