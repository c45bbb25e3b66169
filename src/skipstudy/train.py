"""Hydra entry point: ``python -m skipstudy.train [overrides]``.

The config builds the parts (data, network, optimizer, monitor), Lightning runs them.
Every check that can refuse bad input runs before the Trainer is built, so a typo costs
seconds: the data module validates its files, the model builder its options, and the
monitor its layer names.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from skipstudy import config, fast, runs, stopping
from skipstudy.analysis.callback import build_report_callback
from skipstudy.analysis.summary import run_summary
from skipstudy.errors import ConfigError
from skipstudy.layout import conf_dir as _conf_dir
from skipstudy.fast import resolve_precision  # noqa: F401 - kept importable from here
from skipstudy.module import LitClassifier
from skipstudy.resume import RunState, checkpoint_callbacks, cut_logs
from skipstudy.launchers.ddp import needs_own_process, run_in_own_process
from skipstudy.launchers.final_metrics import TAGS as FINAL_METRIC_TAGS
from skipstudy.launchers.final_metrics import FinalMetrics


def run_name(override_dirname: str) -> str:
    """A run directory name from the job's overrides, safe as one path component."""
    name = override_dirname.replace("/", "_").replace(os.sep, "_")
    return (name or "defaults")[:200]


# Keys left out of override_dirname that still tell sweep jobs apart (see sweep_subdir).
NAMING_KEYS = ("experiment", "name")


def sweep_subdir(override_dirname: str, task_overrides: Any) -> str:
    """A sweep job's subdirectory: its overrides, led by any ``experiment=``/``name=`` it sets.

    Those keys stay out of override_dirname because they already name a single run's parent
    folder; in a sweep every job shares one parent, so jobs that differed only in them would
    share a directory and Hydra would write the second job's ``.hydra/`` over the first's.
    """
    lead = [str(o).lstrip("+~") for o in (task_overrides or [])
            if str(o).lstrip("+~").split("=", 1)[0] in NAMING_KEYS]
    return run_name(",".join([*sorted(lead), override_dirname] if override_dirname else sorted(lead)))


if not OmegaConf.has_resolver("skipstudy.run_name"):
    OmegaConf.register_new_resolver("skipstudy.run_name", run_name)
if not OmegaConf.has_resolver("skipstudy.sweep_subdir"):
    OmegaConf.register_new_resolver("skipstudy.sweep_subdir", sweep_subdir)


def validate(cfg: DictConfig) -> None:
    """Refuse any key outside its declared type or range (skipstudy/config.py), before anything is built."""
    config.check(cfg)


def _accepts(target: Any, name: str) -> bool:
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a builder's ConfigError reaches the user unwrapped.

    Hydra wraps every exception raised inside a ``_target_`` in InstantiationException,
    which would turn a one-line refusal into Hydra's "Error in call to target" text.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    target = hydra.utils.get_class(cfg.dataset._target_)
    kwargs = {"seed": cfg.seed} if _accepts(target, "seed") else {}
    dm = build(cfg.dataset, **kwargs)
    # Data modules check their files here, so a missing data set fails before training.
    dm.prepare_data()
    return dm


def build_network(cfg: DictConfig, dm: L.LightningDataModule) -> torch.nn.Module:
    # The data set decides the class count and input channels; no user passes them.
    net = build(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels)
    from skipstudy import models

    check = getattr(models, "check_input_size", None)
    if check is not None:
        check(net, dm.image_size)
    return net


def build_module(cfg: DictConfig, net: torch.nn.Module, num_classes: int,
                 speed: fast.FastSettings | None = None) -> LitClassifier:
    speed = speed or fast.resolve(cfg)
    optimizer = instantiate(cfg.optimizer)
    scheduler, interval = None, "epoch"
    if cfg.scheduler and "_target_" in cfg.scheduler:
        sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
        interval = sched_cfg.pop("interval", "epoch")
        scheduler = instantiate(sched_cfg)
    return LitClassifier(net, num_classes, optimizer, scheduler, scheduler_interval=interval,
                         channels_last=speed.channels_last, compile=speed.compile)


def build_monitor(cfg: DictConfig, net: torch.nn.Module):
    """The gradient monitor, or None with ``monitor=off``; unknown layer names fail here."""
    if not cfg.get("monitor") or "_target_" not in cfg.monitor:
        return None
    monitor = build(cfg.monitor)
    monitor.resolve(net)
    return monitor


def build_probes(cfg: DictConfig, net: torch.nn.Module):
    """The probe callback (``probes.names`` at ``probes.at_epochs``), or None while it is off.

    Unknown probes or options, and probes that cannot work on ``net`` (a lesion study of a
    plain twin), fail here, before training.
    """
    probes = cfg.get("probes")
    if not probes or not (probes.get("names") or probes.get("at_epochs")):
        return None
    from skipstudy.probes.callback import build_probe_callback

    return build_probe_callback(cfg.probes, net, seed=cfg.seed, model=cfg.model)


def run_info() -> dict[str, Any]:
    """What produced a run: git commit, package versions, machine."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        repo = Path(__file__).resolve().parents[2]
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    versions = {}
    for pkg in ("skipstudy", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["packages"] = versions
    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return info


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to TensorBoard-friendly scalars and strings."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:
            out[prefix] = str(node)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


class _NoAdverts(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger"), which it prints
    at every fit because this project logs to TensorBoard rather than to Lightning's cloud."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence the start-up noise a run would otherwise print on every fit: Lightning's
    product tips, and the FutureWarning torch raises at Lightning's use of ``LeafSpec`` in
    its data-loader code (nothing a user of this project can act on). Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def print_summary(run_dir: Path) -> None:
    """The few lines every run ends with (skipstudy/analysis/summary.py), read back from its logs."""
    try:
        print(run_summary(run_dir), flush=True)
    except Exception as err:  # noqa: BLE001 - a summary that cannot be read must not fail a finished run
        print(f"Run finished: {run_dir} (summary unavailable: {err})", flush=True)


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, float]:
    """Build everything from ``cfg`` and fit; returns the final logged metrics."""
    run_dir = Path(run_dir)
    validate(cfg)
    # resume=<run dir> (see skipstudy/runs.py): continue from its last checkpoint, or start
    # over in place when it was killed before writing one.
    resuming = bool(cfg.get("resume"))
    ckpt_path = runs.last_checkpoint(run_dir) if resuming else None
    speed = fast.resolve(cfg)
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = build_datamodule(cfg)
    net = build_network(cfg, dm)
    monitor = build_monitor(cfg, net)
    probes = build_probes(cfg, net)
    module = build_module(cfg, net, dm.num_classes, speed)

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = speed.precision
    trainer_kwargs["benchmark"] = speed.cudnn_benchmark

    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    # RunState first: it sees each hook before the checkpoint callbacks (Lightning runs those
    # last) and adds RNG, data position and log sizes to every checkpoint (skipstudy/resume.py).
    # trainer.enable_checkpointing=false: no checkpoints at all, not even on SIGTERM (Lightning
    # refuses any Checkpoint callback beside it); such a run cannot be resumed.
    saving = cfg.trainer.get("enable_checkpointing") is not False
    callbacks: list[L.Callback] = [RunState(), *(checkpoint_callbacks(cfg.checkpoint, run_dir) if saving else [])]
    if monitor is not None:
        callbacks.append(monitor)
    # Non-finite loss/gradients (monitor.on_nonfinite, also with monitor=off) and SIGTERM/SIGINT.
    guard = stopping.DivergenceGuard((cfg.get("monitor") or {}).get("on_nonfinite", "stop"), monitor)
    callbacks += [guard, *([stopping.GracefulStop(run_dir / runs.LAST)] if saving else [])]
    if probes is not None:
        callbacks.append(probes)
    # Custom-scalars layout at fit start; the report's figures as TB images at fit end (opt-in).
    report = build_report_callback(cfg.get("report"))
    if report is not None:
        callbacks.append(report)

    # HParams summary scalars at the end of fit, read back from the run's event file.
    callbacks.append(FinalMetrics())

    try:
        trainer = L.Trainer(**trainer_kwargs, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))
    except (TypeError, ValueError, MisconfigurationException) as err:  # a trainer.<key> Lightning refuses
        raise ConfigError(f"trainer: {err} (conf/trainer/default.yaml lists the keys)") from err
    if needs_own_process(trainer):
        # DDP would re-execute this multirun's command line (the whole sweep) in ranks > 0;
        # the job runs as a single run in a fresh process instead (skipstudy/launchers/ddp.py).
        return run_in_own_process(run_dir)

    if trainer.is_global_zero:
        runs.claim(run_dir, resuming)  # a new run never writes into another run's directory
        if resuming and ckpt_path is None:
            # Killed before its first checkpoint: it starts over, its logs with it. (With a
            # checkpoint, RunState cuts the logs back to it when training resumes.)
            cut_logs(run_dir, None)
        info = run_info()
        # The values that ran (no auto/null left), incl. those that change the numbers.
        resolved = fast.record(speed, cfg)
        info["resolved"] = resolved
        info = runs.with_resumes(run_dir, info, ckpt_path) if resuming else info
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        hparams = flat_hparams(cfg)
        hparams.update({k: v for k, v in resolved.items() if v is not None})
        # The job's overrides in one column: what tells the runs of a sweep apart.
        hparams["overrides"] = run_name(HydraConfig.get().job.override_dirname) if HydraConfig.initialized() else ""
        if ckpt_path is None:  # a resumed run keeps the HParams it wrote when it started
            write_hparams(logger, hparams)

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError as err:
        raise ConfigError(stopping.oom_message(cfg.dataset.get("batch_size"), speed.precision,
                                               cfg.dataset.get("image_size"))) from err
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        print_summary(run_dir)
    if guard.verdict is not None:
        raise stopping.Diverged(*guard.verdict, metrics)
    return metrics


# Metrics the HParams dashboard shows beside each run's settings. Declaring them does not
# write a value: the dashboard reads them from the run's own scalar series.
HPARAM_METRICS = ("val/acc", "val/loss", "train/loss", *FINAL_METRIC_TAGS)


def write_hparams(logger: TensorBoardLogger, hparams: dict[str, Any]) -> None:
    """Declare the run's settings to TensorBoard's HParams plugin, without fake metric points.

    Lightning's ``log_hyperparams(params, metrics)`` would log the metric values at step 0,
    which puts an invented point into every curve, so the summary is written directly.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    exp, ssi, sei = hparams_summary(hparams, {m: 0.0 for m in HPARAM_METRICS})
    writer = logger.experiment.file_writer
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)


def _report(err: BaseException) -> None:
    print(f"Error: {err}", file=sys.stderr)


@runs.resume_argument_quoted  # resume=<run dir> pasted as it is, though dir names hold '=' and ','
@hydra.main(config_path=_conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        if cfg.get("resume"):
            cfg = runs.resume_config(cfg, list(hc.overrides.task))
        metrics = train(cfg, hc.runtime.output_dir)
    except ConfigError as err:
        # In a sweep the launcher records the failure and goes on; alone, one short line.
        if hc.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _report(err)
        runs.remove_if_unused(Path(hc.runtime.output_dir), cfg.get("resume"))
        sys.exit(stopping.EXIT_CONFIG)
    except stopping.Diverged as err:
        print(f"Diverged: {err}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return err.metrics.get("val/acc")  # the sweep goes on; the run is marked diverged
        sys.exit(stopping.EXIT_DIVERGED)
    except stopping.Interrupted as err:
        print(f"Interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    return metrics.get("val/acc")


if __name__ == "__main__":
    main()
