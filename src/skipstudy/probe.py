"""``python -m skipstudy.probe probe=<name> [ckpt=<run dir, its checkpoints/ or a .ckpt>] [probe.<option>=...]``.

With ``ckpt``, the network is rebuilt from the run's saved config with the checkpoint's
weights, the probe reads a few batches of the run's own data and writes into the run
(``<run>/probes/<name>/`` and its TensorBoard, at the checkpoint's step). Without ``ckpt`` it
looks at a freshly initialised network built from this config, in a directory of its own:
how plain and residual nets are compared at initialisation in one sweep::

    python -m skipstudy.probe -m probe=shattering model=cifar_resnet model.depth=20,56,110 model.skip=true,false
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.probes import NEEDS_CHECKPOINT, get_probe
from skipstudy.probes.checkpoint import load_run, run_dir_or_none
from skipstudy.probes.context import ProbeContext
from skipstudy.runs import dirs
from skipstudy.runs.layout import conf_dir
from skipstudy.runs.build import build_datamodule, build_network

quote_paths = functools.partial(dirs.quote_path, key="ckpt", existing_only=True)

# With ckpt, Hydra's files go into <run>/probes/ (and no .hydra/ there: it is not a run of its own).
for _name, _fn in (("skipstudy.probe_dir", lambda ckpt, default: str(Path(run_dir_or_none(ckpt)) / "probes")
                    if run_dir_or_none(ckpt) else default),
                   ("skipstudy.probe_subdir", lambda ckpt: None if run_dir_or_none(ckpt) else ".hydra")):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def resolve_device(device: Any) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device; e.g. device=cpu, device=cuda, device=auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is available; use device=cpu or device=auto")
    return dev


def run_probe(cfg: DictConfig, output_dir: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Run ``cfg.probe`` on ``cfg.ckpt`` (or a fresh network); returns the probe's summary numbers.

    ``output_dir`` is the job's Hydra directory (the run directory without ``ckpt``); with
    ``ckpt`` the network and data are the run's, so ``overrides`` of ``model``/``dataset`` are
    refused and one of ``paths`` passes the data location on.
    """
    config.check(cfg)
    options = cfg.probe
    module = get_probe(options.get("name"), key="probe")
    name = options.name
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = cfg.get("ckpt")
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if ckpt not in (None, ""):
        clash = [k for k in keys if k.split(".")[0] in ("model", "dataset")]
        if clash:
            raise ConfigError(f"{clash[0]} cannot be changed with ckpt={ckpt}: the network and its data are the "
                              "run's; drop the override, or drop ckpt to probe a fresh network")
        run = load_run(ckpt, data_dir=cfg.paths.data_dir if any(k.split(".")[0] == "paths" for k in keys) else None)
        net, dm, run_dir, step, trained = run.net, run.datamodule, run.run_dir, run.step, True
        model_cfg, seed = run.cfg.model, int(run.cfg.get("seed", 0))
        print(f"{name}: {run.ckpt_file} (step {step}, epoch {run.epoch})")
    else:
        if name in NEEDS_CHECKPOINT:
            raise ConfigError(f"probe={name} needs a trained network: pass ckpt=<run dir or .ckpt file>")
        # As skipstudy.train builds it: seed, data, network, so the weights equal a run's at step 0.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        net = build_network(cfg, dm)
        run_dir, step, trained, model_cfg, seed = Path(output_dir), 0, False, cfg.model, int(cfg.seed)
        print(f"{name}: freshly initialised {getattr(net, 'arch', type(net).__name__)} (seed {seed})")
    module.check(net, options)
    dm.setup("fit")
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        result = module.run(ProbeContext(
            net=net.to(device), datamodule=dm, run_dir=Path(run_dir), step=step, device=device, writer=writer,
            trained=trained, model=OmegaConf.to_container(model_cfg, resolve=True), seed=seed,
            batches=options.get("batches")), options)
    finally:
        writer.close()
    for key, value in result.items():
        print(f"  {key}: {value:.4g}")
    print(f"  outputs: {Path(run_dir) / 'probes' / name}")
    return result


@dirs.paths_quoted("ckpt", existing_only=True)
@hydra.main(config_path=conf_dir(), config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        result = run_probe(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as err:
        if hc.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        dirs.remove_if_unused(Path(hc.runtime.output_dir))  # a refused start leaves no directory behind
        sys.exit(2)
    return next(iter(result.values()), None)


if __name__ == "__main__":
    main()
