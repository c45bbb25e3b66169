"""The parts of a run built from its config: the data module and the network. Shared by
``python -m skipstudy.train``, the probe command and the probes that reload a run, so a probed
network is the one that was trained."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from skipstudy import models
from skipstudy.errors import ConfigError


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a builder's ConfigError reaches the user as its one line,
    not inside Hydra's InstantiationException text."""
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
    # A user's own data module (any _target_ is allowed) need not take a seed.
    target = get_class(cfg.dataset._target_)
    dm = build(cfg.dataset, **({"seed": cfg.seed} if "seed" in inspect.signature(target).parameters else {}))
    dm.prepare_data()  # checks the files: a missing data set fails before training
    return dm


def build_network(cfg: DictConfig, dm: L.LightningDataModule) -> torch.nn.Module:
    # The data set decides the class count and input channels; no user passes them.
    net = build(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels)
    models.check_input_size(net, dm.image_size)
    return net
