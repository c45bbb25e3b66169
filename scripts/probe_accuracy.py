"""How accurate each iterative or sampled probe is at its defaults, on CIFAR ResNets at initialisation.

The network and data are built as ``python -m skipstudy.probe`` builds them without a checkpoint
(seed 0, ``model=cifar_resnet``, real CIFAR-10 images from ``--data``), and each probe runs with
the defaults of ``conf/probe/<name>.yaml`` through :class:`~skipstudy.probes.context.ProbeContext`.
One row per probe: its headline value, the accuracy it reports beside it (a residual or a standard
error), whether it converged, the operator products it spent and the wall time. ``--power`` adds
what the former default, 20 steps of power iteration stopped when the value moves by less than
1e-3 of itself, reads for the Hessian on the same batches.

    python scripts/probe_accuracy.py --depth 20 56 --data ../shared/data/cifar10-mini
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from skipstudy.probes import get_probe
from skipstudy.probes.context import ProbeContext, bn_mode, cross_entropy

REPO = Path(__file__).resolve().parents[1]
# The headline value and the accuracy written beside it, per probe.
COLUMNS = {"hessian": ("top_eig", "top_eig_residual"), "jacobian": ("sigma_max", "sigma_max_residual"),
           "grad_snr": ("snr_all", "snr_all_se"), "paths": ("mean_length", "mean_length_se"),
           "shattering": ("corr_length", "corr_length_error")}


def power_iteration(ctx: ProbeContext, options, steps: int = 20, tol: float = 1e-3) -> tuple[float, int]:
    """The former default: power iteration from a seeded start, stopped when the Rayleigh quotient
    moves by less than ``tol`` of itself, on the Hessian probe's batches and BN mode."""
    batches = ctx.fixed_batches("train")
    _, mode = bn_mode(ctx, options)
    params = [p for p in ctx.net.parameters() if p.requires_grad]
    with mode, torch.enable_grad():
        loss = sum(cross_entropy(ctx.net, x, y) for x, y in batches) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gen = torch.Generator().manual_seed(options.seed)
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
        value = float("nan")
        for step in range(1, steps + 1):
            norm = torch.sqrt(sum(x.pow(2).sum() for x in v))
            v = [x / norm for x in v]
            hv = torch.autograd.grad(grads, params, v, retain_graph=True)
            new = float(sum((a * b).sum() for a, b in zip(v, hv)))
            if abs(new - value) <= tol * abs(new):
                return new, step
            value, v = new, [h.detach() for h in hv]
    return value, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, nargs="+", default=[20, 56], help="CIFAR ResNet depths (6n+2)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-mini"),
                   help="folder holding cifar-10-batches-py")
    p.add_argument("--probes", default="hessian,jacobian,grad_snr,paths,shattering", help="comma-separated names")
    p.add_argument("--device", default="cpu")
    p.add_argument("--power", action="store_true", help="also the former 20-step power iteration (Hessian)")
    args = p.parse_args()
    print("| model | probe | value | accuracy | converged | products | wall (s) |\n|---|---|---:|---:|---|---:|---:|")
    for depth in args.depth:
        overrides = ["model=cifar_resnet", f"model.depth={depth}", "dataset=cifar10", f"dataset.root={args.data}",
                     "dataset.verify=false", "dataset.download=false", "dataset.loader=torch", "dataset.num_workers=0"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="probe", overrides=overrides)
        from skipstudy.runs.build import build_datamodule, build_network

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        net = build_network(cfg, dm).to(args.device)
        dm.setup("fit")
        for name in args.probes.split(","):
            options = OmegaConf.load(REPO / "conf" / "probe" / f"{name}.yaml")
            with tempfile.TemporaryDirectory() as tmp:
                ctx = ProbeContext(net=net, datamodule=dm, run_dir=Path(tmp), device=torch.device(args.device),
                                   trained=False, model=OmegaConf.to_container(cfg.model), seed=cfg.seed,
                                   batches=options.get("batches"))
                start = time.perf_counter()
                result = get_probe(name).run(ctx, options)
                wall = time.perf_counter() - start
                value, accuracy = COLUMNS[name]
                print(f"| ResNet-{depth} | {name} | {result[value]:.4g} | {accuracy} {result[accuracy]:.2g} | "
                      f"{'yes' if result.get('converged', 1.0) else 'NO'} | {int(result.get('products', 0)) or ''} | "
                      f"{wall:.0f} |", flush=True)
                if name == "hessian" and args.power:
                    start = time.perf_counter()
                    old, steps = power_iteration(ctx, options)
                    print(f"| ResNet-{depth} | hessian, former default (power, 20 steps) | {old:.4g} | | | {steps} | "
                          f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
