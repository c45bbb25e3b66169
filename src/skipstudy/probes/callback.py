"""Probes during training: epoch ``0`` before the first optimisation step, ``k`` at the end of
epoch ``k``. They write into the run at the global step as ``python -m skipstudy.probe ckpt=<run>``
would, under a forked RNG, so the training's random stream is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from skipstudy.errors import ConfigError
from skipstudy.probes import PROBES, get_probe
from skipstudy.probes.context import ProbeContext
from skipstudy.keys import defaults
from skipstudy.probes.options import PROBE_OPTIONS


class ProbeCallback(L.Callback):
    def __init__(self, options: dict[str, DictConfig], at_epochs: list[int], seed: int = 0, model: dict | None = None):
        super().__init__()
        self.options, self.at_epochs, self.seed, self.model = options, sorted(set(at_epochs)), seed, model or {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run starts at its checkpoint's epoch; epoch 0 means the untrained network only.
        if 0 in self.at_epochs and trainer.current_epoch == 0 and trainer.global_step == 0:
            self.run_probes(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 in self.at_epochs:
            self.run_probes(trainer, pl_module)

    def run_probes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        device = pl_module.device
        for name, options in self.options.items():
            ctx = ProbeContext(net=pl_module.net, datamodule=trainer.datamodule, run_dir=run_dir,
                               step=trainer.global_step, device=device, writer=writer, trained=trainer.global_step > 0,
                               model=self.model, seed=self.seed, batches=options.batches)
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                get_probe(name).run(ctx, options)


def build_probe_callback(cfg: Any, net: torch.nn.Module, seed: int = 0, model: Any = None) -> ProbeCallback | None:
    """The callback for the ``probes`` node of train.yaml, None while it is off. Refuses, before
    training starts, what config.check (which checked each option) cannot see: a half-set node,
    options of probes not named, and what a probe refuses on ``net`` (a lesion study of a plain twin)."""
    names, at_epochs = list(cfg.get("names") or []), list(cfg.get("at_epochs") or [])
    if not names and not at_epochs:
        return None
    if not names:
        raise ConfigError(f"probes.at_epochs={at_epochs} needs probes.names; e.g. probes.names=[feature_maps]; "
                          f"valid: {', '.join(PROBES)}")
    if not at_epochs:
        raise ConfigError(f"probes.names={names} needs probes.at_epochs; e.g. probes.at_epochs=[0,10] "
                          "(0 = before training, k = after epoch k)")
    all_options = cfg.get("options") or {}
    unknown = sorted(set(all_options) - set(names))
    if unknown:
        raise ConfigError(f"probes.options.{unknown[0]} is not among probes.names={names}")
    options = {}
    for name in names:
        module = get_probe(name, key="probes.names")
        options[name] = OmegaConf.merge({**defaults(PROBE_OPTIONS[name]), "name": name}, all_options.get(name) or {})
        if cfg.get("batches") is not None:
            options[name].batches = cfg.batches
        if hasattr(module, "check"):
            module.check(net, options[name])
    return ProbeCallback(options, at_epochs, seed, OmegaConf.to_container(model, resolve=True) if model else None)
