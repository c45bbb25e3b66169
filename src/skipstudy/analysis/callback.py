"""The report inside a training run (``report:`` in conf/train.yaml): a CUSTOM SCALARS layout at
fit start (a multi-line chart per monitored quantity, every tracked layer in it), and, opt-in
because reading a long run's events back takes time, the run's report figures as images
``report/<figure>`` at fit end, drawn from its own event file as ``skipstudy.report`` would."""

from __future__ import annotations

import logging
import re
from typing import Any

from lightning.pytorch.callbacks import Callback

TRAINING_CHARTS = {
    "loss (train, val)": ["train/loss", "val/loss", "train/loss_epoch"],
    "accuracy (train, val)": ["train/acc", "val/acc", "train/acc_epoch"],
    "gradient norm, all parameters": ["grad_norm/total"],
}


def custom_scalars_layout(layers: list[str], quantities: list[str]) -> dict[str, dict[str, list]]:
    """For ``SummaryWriter.add_custom_scalars``. Entries are regular expressions, anchored so that
    ``fc`` does not match ``layer1.fc2``."""
    layout = {"training": {title: ["Multiline", [f"^{re.escape(t)}$" for t in tags]]
                           for title, tags in TRAINING_CHARTS.items()}}
    for q in quantities if layers else []:
        category = "activations (all layers)" if q.startswith("act/") else "gradients (all layers)"
        layout.setdefault(category, {})[q] = ["Multiline", [f"^{re.escape(f'{q}/{layer}')}$" for layer in layers]]
    return layout


class ReportCallback(Callback):
    def __init__(self, custom_scalars: bool = True, figures_to_tensorboard: bool = False) -> None:
        self.custom_scalars = custom_scalars
        self.figures_to_tensorboard = figures_to_tensorboard

    def on_fit_start(self, trainer, pl_module) -> None:
        if not (self.custom_scalars and trainer.is_global_zero) or trainer.ckpt_path is not None:
            return  # a resumed run keeps the layout it wrote when it started
        from skipstudy.monitor import QUANTITIES, GradientFlowMonitor

        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, GradientFlowMonitor)), None)
        layers = list(monitor.layer_names or []) if monitor is not None else []
        quantities = [q.name for q in QUANTITIES.values()
                      if q.per_layer and (monitor is None or monitor.activations or q.needs != "activation")]
        trainer.logger.experiment.add_custom_scalars(custom_scalars_layout(layers, quantities))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.figures_to_tensorboard:
            return
        run_dir = trainer.log_dir  # broadcasts under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        from skipstudy.analysis.figures import run_figures
        from skipstudy.monitor.writers import figure_rgb
        from skipstudy.analysis.logs import assign_labels, load_run

        writer = trainer.logger.experiment
        writer.flush()  # the figures are drawn from what is on disk
        try:
            run = load_run(run_dir)
            assign_labels([run])
            for name, fig in run_figures([run]).items():
                if name != "depth_sweep":  # one run, one depth: nothing to compare
                    writer.add_image(f"report/{name}", figure_rgb(fig), trainer.global_step, dataformats="HWC")
            writer.flush()
        except Exception:  # noqa: BLE001 - the run is finished and saved; a figure must not fail it
            logging.getLogger(__name__).exception("report.figures_to_tensorboard: drawing the run's figures failed")


def build_report_callback(node: Any) -> ReportCallback | None:
    """From the ``report:`` node; None when it is missing or turns everything off."""
    callback = ReportCallback(**node) if node else None
    return callback if callback and (callback.custom_scalars or callback.figures_to_tensorboard) else None
