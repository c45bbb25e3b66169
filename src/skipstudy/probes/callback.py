"""Probes during training: a Lightning callback that runs chosen probes at chosen epochs.

``probes.at_epochs`` counts finished epochs: ``0`` runs before the first optimisation step (the
network at initialisation), ``k`` at the end of epoch ``k`` (after its validation). Every probe
writes into the run (``<run>/probes/<name>/<name>_step<N>.*`` and the run's TensorBoard at
the global step), exactly as ``python -m skipstudy.probe ckpt=<run>`` would for a checkpoint
taken at that step. Probes leave the network's weights, buffers and train/eval mode as they
found them, and run under a forked RNG so the training's random stream is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.runs.layout import conf_dir
from skipstudy.probes import PROBES, get_probe
from skipstudy.probes.context import ProbeContext


def probe_options(name: str, overrides: Any = None, batches: int | None = None) -> DictConfig:
    """``conf/probe/<name>.yaml`` with ``overrides`` (a dict) merged in; unknown keys are refused."""
    options = OmegaConf.merge(OmegaConf.load(Path(conf_dir()) / "probe" / f"{name}.yaml"), overrides or {})
    if batches is not None:
        options.batches = batches
    config.check_probe(name, options, key=f"probes.options.{name}")
    return options


class ProbeCallback(L.Callback):
    """Run ``names`` at the epochs in ``at_epochs`` (0 = before training, k = after epoch k).

    Args:
        names: probe names (see :data:`skipstudy.probes.PROBES`).
        at_epochs: epochs after which to run them.
        options: ``{name: options}`` (as in ``conf/probe/<name>.yaml``).
        seed: seeds the probes' random draws.
        model: the run's ``model`` config, recorded in the probes' JSON.
    """

    def __init__(self, names: list[str], at_epochs: list[int], options: dict[str, Any],
                 seed: int = 0, model: dict | None = None) -> None:
        super().__init__()
        self.names = list(names)
        self.at_epochs = sorted(set(int(e) for e in at_epochs))
        self.options = options
        self.seed = seed
        self.model = dict(model or {})
        self.results: dict[tuple[str, int], dict[str, float]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run starts at its checkpoint's epoch; epoch 0 means the untrained network only.
        if 0 in self.at_epochs and trainer.current_epoch == 0 and trainer.global_step == 0:
            self.run_probes(trainer, pl_module, epoch=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.at_epochs:
            self.run_probes(trainer, pl_module, epoch=epoch)

    def run_probes(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        from skipstudy.monitor.writers import find_summary_writer, run_dir

        directory = run_dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("probes.names needs training with a data module (skipstudy.train provides one)")
        device = pl_module.device
        forked = [device.index or 0] if device.type == "cuda" else []
        for name in self.names:
            options = self.options[name]
            ctx = ProbeContext(
                net=pl_module.net, datamodule=dm, run_dir=directory, step=int(trainer.global_step),
                device=device, writer=find_summary_writer(trainer), trained=trainer.global_step > 0,
                model=self.model, seed=self.seed, batches=options.get("batches"),
            )
            with torch.random.fork_rng(devices=forked):
                self.results[(name, epoch)] = get_probe(name).run(ctx, options)


def build_probe_callback(cfg: Any, net: torch.nn.Module, seed: int = 0, model: Any = None) -> ProbeCallback | None:
    """The callback for ``cfg`` (the ``probes`` node of train.yaml), or None when it is off.

    Checks everything before training starts: probe names, epochs, options, and each probe's
    own refusals on ``net`` (e.g. a lesion study of a plain twin).
    """
    if not cfg:
        return None
    names = list(cfg.get("names") or [])
    at_epochs = list(cfg.get("at_epochs") or [])
    if not names and not at_epochs:
        return None
    if not names:
        raise ConfigError(f"probes.at_epochs={at_epochs} needs probes.names; e.g. probes.names=[feature_maps]; "
                          f"valid: {', '.join(PROBES)}")
    if not at_epochs:
        raise ConfigError(f"probes.names={names} needs probes.at_epochs; e.g. probes.at_epochs=[0,10] "
                          "(0 = before training, k = after epoch k)")
    for e in at_epochs:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ConfigError(f"probes.at_epochs={at_epochs}: {e!r} is not an epoch; use integers >= 0, "
                              "e.g. probes.at_epochs=[0,10]")
    batches = cfg.get("batches")
    all_options = cfg.get("options") or {}
    unknown = sorted(set(all_options) - set(names))
    if unknown:
        raise ConfigError(f"probes.options.{unknown[0]} is not among probes.names={names}")
    options = {}
    for name in names:
        module = get_probe(name, key="probes.names")
        options[name] = probe_options(name, all_options.get(name), batches)
        module.check(net, options[name])
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else model
    return ProbeCallback(names, at_epochs, options, seed=seed, model=model)
