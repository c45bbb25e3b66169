"""A trained network rebuilt from its run directory as ``skipstudy.train`` builds it, then the
checkpoint's ``net.*`` weights loaded strictly: a checkpoint that does not fit is refused, not
probed half-loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.runs.layout import CONFIG, LAST

HINT = ("pass a run directory (it has .hydra/config.yaml and checkpoints/last.ckpt), its checkpoints/ folder "
        "or a .ckpt file inside one")


def locate(ckpt: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_file)`` for a run directory or its ``checkpoints/`` folder (both mean
    ``checkpoints/last.ckpt``), or a checkpoint file in one."""
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt={ckpt}: no such file or directory; {HINT}")
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" and not (path / CONFIG).is_file() else path
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"ckpt={ckpt} is not a run directory: {run_dir / CONFIG} is missing; {HINT}")
        if not (run_dir / LAST).is_file():
            others = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            choices = f"; available: {', '.join(others)} (pass ckpt=<run>/checkpoints/<file>)" if others else \
                " and the run saved no checkpoint (did it finish an epoch?)"
            raise ConfigError(f"ckpt={ckpt}: {run_dir / LAST} does not exist{choices}")
        return run_dir, run_dir / LAST
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"ckpt={ckpt}: no run config at {run_dir / CONFIG}; the probe rebuilds the network from "
                          f"its run's config, so {HINT}")
    return run_dir, path


def run_dir_or_none(ckpt: Any) -> str | None:
    """For Hydra resolvers, which cannot print a short error: None where ``ckpt`` names no run."""
    try:
        return str(locate(ckpt)[0]) if ckpt not in (None, "") else None
    except ConfigError:
        return None


# conf/probe.yaml's directories: with ckpt, Hydra's files go into <run>/probes/ (and no .hydra/
# there: it is not a run of its own). Registered by skipstudy.overrides.register.
RESOLVERS = {
    "skipstudy.probe_dir": lambda ckpt, default: str(Path(run_dir_or_none(ckpt)) / "probes")
    if run_dir_or_none(ckpt) else default,
    "skipstudy.probe_subdir": lambda ckpt: None if run_dir_or_none(ckpt) else ".hydra",
}


@dataclass
class LoadedRun:
    cfg: DictConfig
    net: nn.Module
    datamodule: Any
    run_dir: Path
    ckpt_file: Path
    step: int
    epoch: int


def load_run(ckpt: str | Path, data_dir: str | None = None) -> LoadedRun:
    """The run's data module and network with the checkpoint's weights, on the CPU; ``data_dir``
    replaces the run's ``paths.data_dir`` (the data moved since training)."""
    from skipstudy.runs.build import build_datamodule, build_network

    run_dir, ckpt_file = locate(ckpt)
    cfg = OmegaConf.load(run_dir / CONFIG)
    if data_dir is not None:
        OmegaConf.update(cfg, "paths.data_dir", data_dir, force_add=True)
    try:  # callbacks may keep objects other than tensors: the whole file, as Lightning loads it to resume
        state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file ends the same way
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"ckpt={ckpt_file}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                          f"{first[:200]}); {HINT}") from err
    sd = state.get("state_dict") if isinstance(state, dict) else None
    net_sd = {k[len("net."):]: v for k, v in (sd or {}).items() if k.startswith("net.")}
    if not net_sd:
        raise ConfigError(f"ckpt={ckpt_file} holds no 'net.*' weights; it is not a checkpoint of "
                          f"skipstudy.runs.module.LitClassifier; {HINT}")
    dm = build_datamodule(cfg)
    net = build_network(cfg, dm)
    try:
        net.load_state_dict(net_sd)
    except RuntimeError as err:  # the config was edited after training
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])
        raise ConfigError(f"ckpt={ckpt_file} does not fit the network its run config builds "
                          f"({cfg.model.get('_target_')}): {detail[:300]}") from None
    return LoadedRun(cfg, net, dm, run_dir, ckpt_file, state.get("global_step", 0), state.get("epoch", 0))
