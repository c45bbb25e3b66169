"""Rebuild a trained network from its run directory: the saved config, then the checkpoint's weights.

A run directory (``logs/<name>/<overrides>/<time>``) holds the composed config in
``.hydra/config.yaml`` and Lightning checkpoints of :class:`~skipstudy.runs.module.LitClassifier` in
``checkpoints/``. The network is rebuilt through the same builders ``skipstudy.train`` uses
(``build_datamodule`` -> ``build_network``), and the ``net.*`` entries of the checkpoint's
state dict are loaded into it with ``strict=True``, so a checkpoint that does not match its
config is refused instead of probed half-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from skipstudy.errors import ConfigError

CONFIG = Path(".hydra") / "config.yaml"
HINT = ("pass a run directory (it has .hydra/config.yaml and checkpoints/last.ckpt), its checkpoints/ folder "
        "or a .ckpt file inside one")


def locate(ckpt: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_file)`` for ``ckpt=`` a run directory, its ``checkpoints/`` folder,
    or a checkpoint file in one.

    A run directory or its ``checkpoints/`` folder means ``checkpoints/last.ckpt``; a file means
    that file, and its run directory is the folder above ``checkpoints/``.

    Raises:
        ConfigError: the path does not exist, is not inside a run directory, or the run has
            no checkpoint.
    """
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt}: no such file or directory; {HINT}")
    if path.is_dir():
        run_dir = path
        if path.name == "checkpoints" and not (path / CONFIG).is_file() and (path.parent / CONFIG).is_file():
            run_dir = path.parent
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"ckpt={ckpt} is not a run directory: {run_dir / CONFIG} is missing; {HINT}")
        ckpt_file = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt_file.is_file():
            others = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            choices = f"; available: {', '.join(others)} (pass ckpt=<run>/checkpoints/<file>)" if others else \
                " and the run saved no checkpoint (did it finish an epoch?)"
            raise ConfigError(f"ckpt={ckpt}: {ckpt_file} does not exist{choices}")
        return run_dir, ckpt_file
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(
            f"ckpt={ckpt}: no run config at {run_dir / CONFIG}; the probe rebuilds the network from its "
            f"run's config, so {HINT}"
        )
    return run_dir, path


def run_dir_or_none(ckpt: Any) -> str | None:
    """The run directory of ``ckpt``, or None when there is none (Hydra resolver; never raises)."""
    if ckpt in (None, ""):
        return None
    try:
        return str(locate(ckpt)[0])
    except ConfigError:
        return None


@dataclass
class LoadedRun:
    cfg: DictConfig
    net: nn.Module
    datamodule: Any
    run_dir: Path
    ckpt_file: Path
    step: int
    epoch: int


def read_checkpoint(ckpt_file: Path) -> dict:
    """The checkpoint dict, loaded on the CPU.

    Tensors-only loading is tried first; callbacks may store numpy arrays or other objects in
    their state, and then the file is loaded in full, as Lightning does when it resumes a run
    (the user points at their own run's checkpoint).
    """
    import pickle

    try:
        try:
            return torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(ckpt_file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file ends the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"ckpt={ckpt_file}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                          f"{first[:200]}); {HINT}") from err


def network_state(state: dict, ckpt_file: Path) -> dict[str, torch.Tensor]:
    """The network's weights: the ``net.``-prefixed entries of a LitClassifier state dict."""
    sd = state.get("state_dict") if isinstance(state, dict) else None
    net_sd = {k[len("net."):]: v for k, v in (sd or {}).items() if k.startswith("net.")}
    if not net_sd:
        raise ConfigError(f"ckpt={ckpt_file} holds no 'net.*' weights; it is not a checkpoint of "
                          f"skipstudy.runs.module.LitClassifier; {HINT}")
    return net_sd


def load_run(ckpt: str | Path, data_dir: str | None = None) -> LoadedRun:
    """Rebuild the run's data module and network and load the checkpoint's weights (on the CPU).

    Args:
        ckpt: a run directory or a checkpoint file inside one (see :func:`locate`).
        data_dir: replaces the run's ``paths.data_dir`` (the data moved since training).
    """
    from skipstudy.train import build_datamodule, build_network

    run_dir, ckpt_file = locate(ckpt)
    cfg = OmegaConf.load(run_dir / CONFIG)
    if data_dir is not None:
        OmegaConf.update(cfg, "paths.data_dir", data_dir, force_add=True)
    state = read_checkpoint(ckpt_file)
    dm = build_datamodule(cfg)
    net = build_network(cfg, dm)
    net_sd = network_state(state, ckpt_file)
    try:
        result = net.load_state_dict(net_sd, strict=False)
    except RuntimeError as err:  # shape mismatches: the config was edited after training
        raise ConfigError(f"ckpt={ckpt_file} does not fit the network its run config builds "
                          f"({cfg.model.get('_target_')}): {str(err).splitlines()[-1].strip()}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "",
        ) if part)
        raise ConfigError(f"ckpt={ckpt_file} does not fit the network its run config builds "
                          f"({cfg.model.get('_target_')}): {detail}")
    return LoadedRun(cfg, net, dm, run_dir, ckpt_file, int(state.get("global_step", 0)), int(state.get("epoch", 0)))
