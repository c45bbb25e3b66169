"""``python -m skipstudy.train [overrides]``: the config builds the parts (data, network,
optimizer, monitor, probes), Lightning runs them.

Every check that can refuse bad input runs before the Trainer is built and before anything
is written, so a typo costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from skipstudy import config, overrides
from skipstudy.analysis.callback import build_report_callback
from skipstudy.analysis.summary import run_summary
from skipstudy.errors import ConfigError
from skipstudy.runs import dirs, fast, stopping
from skipstudy.runs.build import build, build_datamodule, build_network
from skipstudy.runs.layout import conf_dir
from skipstudy.runs.loggers import build_loggers, close_loggers
from skipstudy.runs.module import LitClassifier
from skipstudy.runs.resume import RunState, checkpoint_record, cut_logs
from skipstudy.runs.stopping import checkpoint_callbacks
from skipstudy.launchers.ddp import needs_own_process, run_in_own_process
from skipstudy.launchers.final_metrics import TAGS as FINAL_METRIC_TAGS
from skipstudy.launchers.final_metrics import FinalMetrics
from skipstudy.launchers.hparams import hparams_summaries, lead_keys, sweep_keys

# Metrics the HParams dashboard shows beside each run's settings, read from the run's own series.
HPARAM_METRICS = ("val/acc", "val/loss", "train/loss", *FINAL_METRIC_TAGS)


def build_module(cfg: DictConfig, net: torch.nn.Module, num_classes: int, speed: fast.FastSettings) -> LitClassifier:
    scheduler, interval = None, "epoch"
    if cfg.get("scheduler") and "_target_" in cfg.scheduler:
        sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
        interval = sched_cfg.pop("interval", "epoch")
        scheduler = instantiate(sched_cfg)
    return LitClassifier(net, num_classes, instantiate(cfg.optimizer), scheduler, scheduler_interval=interval,
                         channels_last=speed.channels_last, compile=speed.compile)


def build_callbacks(cfg: DictConfig, net: torch.nn.Module, run_dir: Path) -> tuple[list[L.Callback], Any]:
    """The Trainer's callbacks, and the one that holds the divergence verdict. Unknown monitor
    layers or probes, and probes that cannot work on ``net``, fail here."""
    monitor = None
    if cfg.get("monitor") and "_target_" in cfg.monitor:
        monitor = build(cfg.monitor)
        monitor.resolve(net)
    # RunState first: a resume restores the RNG states before other callbacks start. (Lightning
    # runs checkpoint callbacks last.) trainer.enable_checkpointing=false: no checkpoint at all, not even on SIGTERM
    # (Lightning refuses a Checkpoint callback beside it); such a run cannot be resumed.
    callbacks: list[L.Callback] = [RunState(run_dir)]
    validates = cfg.trainer.get("limit_val_batches") not in (0, 0.0)
    if cfg.trainer.get("enable_checkpointing") is not False:
        callbacks += checkpoint_callbacks(cfg.checkpoint, run_dir, validates)
    callbacks.append(stopping.ValidateAtMaxSteps())
    guard = stopping.DivergenceGuard((cfg.get("monitor") or {}).get("on_nonfinite", "stop"), monitor)
    callbacks += [c for c in (monitor, guard) if c is not None]
    probes = cfg.get("probes")
    if probes and (probes.get("names") or probes.get("at_epochs")):
        from skipstudy.probes.callback import build_probe_callback

        callbacks.append(build_probe_callback(probes, net, seed=cfg.seed, model=cfg.model))
    report = build_report_callback(cfg.get("report"))  # custom-scalars layout; figures as images (opt-in)
    # HParams summary scalars at the end of fit, read back from the run's event file.
    return [*callbacks, *([report] if report else []), FinalMetrics()], guard


def flat_hparams(node: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config (``OmegaConf.to_container``) flattened to TensorBoard-friendly scalars and strings."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flat_hparams(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node if isinstance(node, (bool, int, float, str)) else str(node)}


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")  # "💡 Tip: ... try installing litlogger"


def quiet_lightning() -> None:
    """Silence start-up noise no user can act on: Lightning's product tips at every fit, and
    torch's FutureWarning at Lightning's use of ``LeafSpec``. Idempotent, as addFilter is."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_no_tips)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def oom_message(cfg: DictConfig, precision: str) -> str:
    """The ConfigError text for a CUDA out-of-memory error during training."""
    batch_size, image_size = cfg.dataset.get("batch_size"), cfg.dataset.get("image_size")
    size = f", dataset.image_size={image_size}" if image_size is not None else ""
    fix = (f"try dataset.batch_size={batch_size // 2}" if isinstance(batch_size, int) and batch_size > 1
           else "use a smaller model or dataset.image_size")
    return (f"GPU out of memory at dataset.batch_size={batch_size}{size} (trainer.precision={precision}); {fix}, "
            f"or trainer.precision=bf16-mixed / fast.channels_last=true to save memory")


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, float]:
    """Build everything from ``cfg`` and fit in ``run_dir``; returns the final logged metrics."""
    run_dir = Path(run_dir)
    config.check(cfg)
    # resume=<run dir>: continue from its last checkpoint, or start over in place without one.
    resuming = bool(cfg.get("resume"))
    ckpt_path = dirs.last_checkpoint(run_dir) if resuming else None
    speed = fast.resolve(cfg)
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = build_datamodule(cfg)
    net = build_network(cfg, dm)
    callbacks, guard = build_callbacks(cfg, net, run_dir)
    module = build_module(cfg, net, dm.num_classes, speed)
    # The job's overrides: what tells the runs of a sweep apart (HParams column, logger run names).
    run_overrides = dirs.run_name(HydraConfig.get().job.override_dirname) if HydraConfig.initialized() else ""
    loggers = build_loggers(cfg.get("logger"), run_dir, run_overrides or run_dir.name, resumed=resuming)
    logger = loggers[0]  # TensorBoard: what resume, the report and the HParams read
    # config.check built a Trainer from these trainer.* values already: Lightning's refusal came there, in one line.
    trainer = L.Trainer(**{**OmegaConf.to_container(cfg.trainer, resolve=True), "precision": speed.precision,
                           "benchmark": speed.cudnn_benchmark},
                        logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir))
    if needs_own_process(trainer):
        # DDP would re-execute this multirun's command line (the whole sweep) in ranks > 0;
        # the job runs as a single run in a fresh process instead (skipstudy/launchers/ddp.py).
        return run_in_own_process(run_dir)

    if trainer.is_global_zero:
        info = {**dirs.run_info(), "resolved": fast.record(speed, cfg)}  # the values that ran, no auto left
        if not resuming:
            dirs.claim(run_dir)  # a new run never writes into another run's directory
        else:
            if ckpt_path is None:  # killed before its first checkpoint: logs start over too
                cut_logs(run_dir, None)
            info = dirs.with_resumes(run_dir, info, ckpt_path and checkpoint_record(ckpt_path)[0])
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        if ckpt_path is None:  # a resumed run keeps the HParams it wrote when it started
            resolved = {k: v for k, v in info["resolved"].items() if v is not None}
            hparams = {**flat_hparams(OmegaConf.to_container(cfg, resolve=True)), **resolved, "overrides": run_overrides}
            for other in loggers[1:]:  # CSV, MLflow, W&B; Hydra's own settings are not the run's
                other.log_hyperparams({k: v for k, v in hparams.items() if not k.startswith("hydra.")})
            # TensorBoard: not Lightning's log_hyperparams(params, metrics), which logs each metric
            # at step 0, an invented point in every curve; the study's keys lead the HParams tab.
            lead = lead_keys(hparams, sweep_keys(run_dir))
            for summary in hparams_summaries(hparams, {m: 0.0 for m in HPARAM_METRICS}, lead):
                logger.experiment.file_writer.add_summary(summary)

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError as err:
        raise ConfigError(oom_message(cfg, speed.precision)) from err
    finally:
        close_loggers(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        try:
            final = next(c for c in trainer.callbacks if isinstance(c, FinalMetrics))
            print(run_summary(run_dir, final.run), flush=True)  # the logs FinalMetrics read
        except Exception as err:  # noqa: BLE001 - a summary that cannot be read must not fail a finished run
            print(f"Run finished: {run_dir} (summary unavailable: {err})", flush=True)
    if guard.verdict is not None:
        raise stopping.Diverged(*guard.verdict, metrics)
    return metrics


@overrides.entry("train", "resume")
@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        if cfg.get("resume"):
            cfg = dirs.resume_config(cfg, list(hc.overrides.task))
        return train(cfg, hc.runtime.output_dir).get("val/acc")
    except ConfigError as err:
        dirs.refuse(err, cfg.paths.log_dir, cfg.get("resume"))
    except stopping.Diverged as err:
        print(f"Diverged: {err}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return err.metrics.get("val/acc")  # the sweep goes on; the run is marked diverged
        sys.exit(stopping.EXIT_DIVERGED)
    except stopping.Interrupted as err:
        print(f"Interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
