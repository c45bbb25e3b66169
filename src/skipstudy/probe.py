"""Hydra app: ``python -m skipstudy.probe probe=<name> [ckpt=<run dir or .ckpt>] [probe.<option>=...]``.

With ``ckpt``, the network is rebuilt from the run's saved config and loaded with the
checkpoint's weights; the probe reads the run's own data (a few batches, so it runs on a
CPU) and writes into the run: ``<run>/probes/<name>/`` and the run's TensorBoard, at the
checkpoint's global step. Without ``ckpt``, the probe looks at a freshly initialised network
built from this config (``model=... dataset=... seed=...``), in a run directory of its own;
that is how plain and residual nets are compared at initialisation in one sweep::

    python -m skipstudy.probe -m probe=shattering model=cifar_resnet model.depth=20,56,110 model.skip=true,false

Bad input (a missing checkpoint, a lesion of a plain net...) prints ``Error: <message>`` and
exits with status 2.
"""

from __future__ import annotations

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

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.layout import conf_dir as _conf_dir
from skipstudy.runs import remove_if_unused
from skipstudy.probes import NEEDS_CHECKPOINT, get_probe
from skipstudy.probes.checkpoint import load_run, run_dir_or_none
from skipstudy.probes.context import ProbeContext
from skipstudy.train import build_datamodule, build_network  # also registers skipstudy.run_name


def _probe_dir(ckpt: Any, default: str) -> str:
    run_dir = run_dir_or_none(ckpt)
    return str(Path(run_dir) / "probes") if run_dir else default


def _probe_subdir(ckpt: Any) -> str | None:
    return None if run_dir_or_none(ckpt) else ".hydra"


for _name, _fn in (("skipstudy.probe_dir", _probe_dir), ("skipstudy.probe_subdir", _probe_subdir)):
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


def _overridden(overrides: list[str], prefixes: tuple[str, ...]) -> list[str]:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [k for k in keys if k.split(".", 1)[0] in prefixes]


def run_probe(cfg: DictConfig, output_dir: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Run ``cfg.probe`` on ``cfg.ckpt`` (or a fresh network); returns the probe's summary numbers.

    Args:
        cfg: the composed ``probe.yaml``.
        output_dir: the job's Hydra output directory (the run directory without ``ckpt``).
        overrides: the command-line overrides; with ``ckpt`` the network and the data are the
            run's, so ``model``/``dataset`` overrides are refused and ``paths.data_dir`` is passed on.
    """
    config.check(cfg)
    options = cfg.probe
    module = get_probe(options.get("name"), key="probe")
    name = options.name
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = cfg.get("ckpt")
    if ckpt not in (None, ""):
        clash = _overridden(list(overrides), ("model", "dataset"))
        if clash:
            raise ConfigError(f"{clash[0]} cannot be changed with ckpt={ckpt}: the network and its data are the "
                              "run's; drop the override, or drop ckpt to probe a fresh network")
        data_dir = cfg.paths.data_dir if _overridden(list(overrides), ("paths",)) else None
        run = load_run(ckpt, data_dir=data_dir)
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
    net = net.to(device)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        ctx = ProbeContext(
            net=net, datamodule=dm, run_dir=Path(run_dir), step=step, device=device, writer=writer,
            trained=trained, model=OmegaConf.to_container(model_cfg, resolve=True), seed=seed,
            batches=options.get("batches"),
        )
        result = module.run(ctx, options)
    finally:
        writer.close()
    for key, value in result.items():
        print(f"  {key}: {value:.4g}")
    print(f"  outputs: {Path(run_dir) / 'probes' / name}")
    return result


@hydra.main(config_path=_conf_dir(), config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        result = run_probe(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as err:
        if hc.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        remove_if_unused(Path(hc.runtime.output_dir))  # a refused start leaves no directory behind
        sys.exit(2)
    return next(iter(result.values()), None)


def quote_paths(argv: list[str]) -> list[str]:
    """Quote a ``ckpt=`` value that names an existing path, for Hydra's override parser.

    Run directories are named after their overrides (``logs/default/model.depth=20,model.skip=false/...``),
    and Hydra's grammar would read that ``=`` and ``,`` as syntax. Values that are already quoted
    or name no path (a sweep ``ckpt=a,b``) are passed on unchanged.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "ckpt" and value and value[0] not in "'\"" and Path(value).expanduser().exists():
            arg = f"{key}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def cli() -> None:
    """``python -m skipstudy.probe``: :func:`main` with run-directory paths quoted for Hydra."""
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
