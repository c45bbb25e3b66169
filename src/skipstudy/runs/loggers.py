"""The run's Lightning loggers from the ``logger`` config group (``conf/logger/``): TensorBoard
first (the run's own record, which resume, the report and the HParams read), then any of CSV,
MLflow and W&B. Every logger gets every scalar (Lightning's own metrics and the gradient
monitor's, through ``log_metrics``) and the flattened config as hyperparameters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from skipstudy.runs.build import build

PRIMARY = "tensorboard"


def build_loggers(node: DictConfig | None, run_dir: Path, run_name: str, resumed: bool = False) -> list[Logger]:
    """``node`` is ``cfg.logger`` (``{name: {_target_, options}}``), already checked by
    ``config.check``; ``run_name`` names the run where a logger keeps runs side by side. A
    ``resumed`` run continues its TensorBoard record; the CSV logger starts a file of its own
    beside the earlier ones (Lightning's would delete them), MLflow and W&B a new run."""
    options = OmegaConf.to_container(node, resolve=True) if node is not None else {PRIMARY: {}}
    # TensorBoard writes straight into the run directory (no name/version subfolders).
    tb = {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", **(options.pop(PRIMARY, None) or {})}
    loggers = [build(tb, save_dir=str(run_dir), name="", version="", default_hp_metric=False)]
    for name, spec in options.items():
        loggers.append(build(spec, **_placed(name, spec, run_dir, run_name, resumed)))
    return loggers


def _placed(name: str, spec: dict[str, Any], run_dir: Path, run_name: str, resumed: bool) -> dict[str, Any]:
    """Where each logger writes: into the run directory, or (MLflow) a store shared by runs."""
    if name == "csv":
        # <run>/csv/metrics.csv; after the n-th resume <run>/csv/resume-<n>/metrics.csv.
        n = len(list((run_dir / "csv").glob("resume-*"))) + 1 if resumed else 0
        return {"save_dir": str(run_dir), "name": "csv", "version": f"resume-{n}" if n else ""}
    if name == "wandb":
        return {"save_dir": str(run_dir), "name": run_name}
    if name == "mlflow":
        placed: dict[str, Any] = {"run_name": run_name}
        if spec.get("tracking_uri") is None:
            # An absolute file: URI, so the store does not move with the working directory.
            # MLflow 3 keeps its file store in maintenance mode and refuses it without this opt-out.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            placed["tracking_uri"] = Path(spec.get("save_dir") or "mlruns").resolve().as_uri()
        return placed
    return {}


def close_loggers(loggers: list[Logger]) -> None:
    """End the W&B run of this training: jobs of a sweep that run in one process (Hydra's basic
    launcher) would otherwise all log into the first job's run, which WandbLogger reuses."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
