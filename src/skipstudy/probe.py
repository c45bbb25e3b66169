"""``python -m skipstudy.probe probe=<name> [ckpt=<run dir, its checkpoints/ or a .ckpt>] [probe.<option>=...]``.

With ``ckpt``, the network is rebuilt from the run's saved config with the checkpoint's weights,
the probe reads a few batches of the run's own data and writes into the run (``<run>/probes/<name>/``
and its TensorBoard, at the checkpoint's step). Without ``ckpt`` it looks at a freshly initialised
network built from this config, in a directory of its own, so one sweep compares plain and residual
nets at initialisation: ``python -m skipstudy.probe -m probe=shattering model.skip=true,false``.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from skipstudy import config, overrides
from skipstudy.errors import ConfigError
from skipstudy.probes import NEEDS_CHECKPOINT, get_probe
from skipstudy.probes.checkpoint import load_run
from skipstudy.probes.context import ProbeContext
from skipstudy.runs import dirs
from skipstudy.runs.build import build_datamodule, build_network
from skipstudy.runs.layout import conf_dir


def run_probe(cfg: DictConfig, output_dir: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Run ``cfg.probe`` on ``cfg.ckpt`` (or a fresh network); returns the probe's summary numbers.

    ``output_dir`` is the job's Hydra directory (the run directory without ``ckpt``); with
    ``ckpt`` the network and data are the run's, so ``overrides`` of ``model``/``dataset`` are
    refused and one of ``paths`` passes the data location on.
    """
    config.check(cfg)
    options, ckpt = cfg.probe, cfg.ckpt
    module = get_probe(options.name)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA device is available; use device=cpu or device=auto")
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if ckpt:
        clash = [k for k in keys if k.split(".")[0] in ("model", "dataset")]
        if clash:
            raise ConfigError(f"{clash[0]} cannot be changed with ckpt={ckpt}: the network and its data are the "
                              "run's; drop the override, or drop ckpt to probe a fresh network")
        run = load_run(ckpt, data_dir=cfg.paths.data_dir if any(k.split(".")[0] == "paths" for k in keys) else None)
        net, dm, run_dir, step, run_cfg = run.net, run.datamodule, run.run_dir, run.step, run.cfg
        print(f"{options.name}: {run.ckpt_file} (step {step}, epoch {run.epoch})")
    else:
        if options.name in NEEDS_CHECKPOINT:
            raise ConfigError(f"probe={options.name} needs a trained network: pass ckpt=<run dir or .ckpt file>")
        # As skipstudy.train builds it: seed, data, network, so the weights equal a run's at step 0.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        net, run_dir, step, run_cfg = build_network(cfg, dm), Path(output_dir), 0, cfg
        print(f"{options.name}: freshly initialised {getattr(net, 'arch', type(net).__name__)} (seed {cfg.seed})")
    if hasattr(module, "check"):
        module.check(net, options)
    dm.setup("fit")
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        result = module.run(ProbeContext(
            net=net.to(device), datamodule=dm, run_dir=Path(run_dir), step=step, device=device, writer=writer,
            trained=bool(ckpt), model=OmegaConf.to_container(run_cfg.model, resolve=True), seed=int(run_cfg.seed),
            batches=options.batches), options)
    for line in summary_lines(result):
        print(line)
    print(f"  outputs: {Path(run_dir) / 'probes' / options.name}")
    return result


# A probe's accuracy keys (its summary's ``<key>_residual``, ``<key>_se``, ``<key>_error``, per stage
# ``<key>_se/<stage>``) are printed on their value's line, as the reader compares them.
ACCURACY = {"_se": "± {:.2g}", "_error": "(error {:.2g})", "_residual": "(residual {:.2g})"}


def summary_lines(result: dict[str, float]) -> list[str]:
    """One line per value of ``result``, its accuracy beside it: ``  top_eig: -18.63 (residual 4.1e-04)``."""
    def beside(key: str, suffix: str) -> str:
        base, slash, stage = key.partition("/")
        return f"{base}{suffix}{slash}{stage}"

    accuracies = {beside(key, suffix) for key in result for suffix in ACCURACY}
    return [" ".join([f"  {key}: {value:.4g}", *(form.format(result[beside(key, suffix)])
                                                  for suffix, form in ACCURACY.items() if beside(key, suffix) in result)])
            for key, value in result.items() if key not in accuracies]


@overrides.entry("probe", "ckpt", existing_only=True)
@hydra.main(config_path=conf_dir(), config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        result = run_probe(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as err:
        dirs.refuse(err, cfg.paths.log_dir)
    return next(iter(result.values()), None)


if __name__ == "__main__":
    main()
