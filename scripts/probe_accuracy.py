"""How accurate each iterative or sampled probe is at its defaults, on CIFAR ResNets at initialisation.

The network and data are built as ``python -m skipstudy.probe`` builds them without a checkpoint
(seed 0, ``model=cifar_resnet``, real CIFAR-10 images from ``--data``), and each probe runs with
the defaults of each probe (``probes/options.py``) through :class:`~skipstudy.probes.context.ProbeContext`.
One row per probe: its headline value, the accuracy it reports beside it (a residual or a standard
error), whether it converged, the operator products it spent and the wall time. ``--power`` adds
what the former default, 20 steps of power iteration stopped when the value moves by less than
1e-3 of itself, reads for the Hessian on the same batches. Without --no-write the table is appended
to the "Probe accuracy" section of docs/benchmarks.md.

    python scripts/probe_accuracy.py --depth 20 56 --power --data ../shared/data/cifar10-mini
    python scripts/probe_accuracy.py --depth 8 --no-write dataset.batch_size=32   # Hydra overrides last
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks_doc import append_entry  # scripts/benchmarks_doc.py, beside this script
from skipstudy.overrides import register
from skipstudy.probes import get_probe
from skipstudy.probes.context import ProbeContext, bn_mode, cross_entropy

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Probe accuracy"
INTRO = """What each iterative or sampled probe reports about its own accuracy at the defaults of
`conf/probe/<name>.yaml`, on CIFAR ResNets at initialisation (seed 0, real CIFAR-10 images), by
`scripts/probe_accuracy.py`: the headline value, the accuracy written beside it (a residual
`|Av - lv| / |l|` for the eigenvalue probes, a standard error or a resolution error for the
sampled ones), whether the probe converged within its `iters`, and the operator products it spent."""
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
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the model and data, e.g. dataset.batch_size=32")
    args = p.parse_args()
    rows = ["| model | probe | value | accuracy | converged | products | wall (s) |", "|---|---|---:|---:|---|---:|---:|"]
    print("\n".join(rows))
    for depth in args.depth:
        overrides = ["model=cifar_resnet", f"model.depth={depth}", "dataset=cifar10", f"dataset.root={args.data}",
                     "dataset.verify=false", "dataset.download=false", "dataset.loader=torch", "dataset.num_workers=0",
                     *args.overrides]
        register()  # what the entry point registers before Hydra composes
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="probe", overrides=overrides)
        from skipstudy.runs.build import build_datamodule, build_network

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        net = build_network(cfg, dm).to(args.device)
        dm.setup("fit")
        for name in args.probes.split(","):
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                # The probe's options as the probe command composes them (defaults: probes/options.py).
                options = compose(config_name="probe", overrides=[*overrides, f"probe={name}"]).probe
            with tempfile.TemporaryDirectory() as tmp:
                ctx = ProbeContext(net=net, datamodule=dm, run_dir=Path(tmp), device=torch.device(args.device),
                                   trained=False, model=OmegaConf.to_container(cfg.model), seed=cfg.seed,
                                   batches=options.get("batches"))
                start = time.perf_counter()
                result = get_probe(name).run(ctx, options)
                wall = time.perf_counter() - start
                value, accuracy = COLUMNS[name]
                rows.append(f"| ResNet-{depth} | {name} | {result[value]:.4g} | {accuracy} {result[accuracy]:.2g} | "
                            f"{'yes' if result.get('converged', 1.0) else 'NO'} | "
                            f"{int(result.get('products', 0)) or ''} | {wall:.0f} |")
                print(rows[-1], flush=True)
                if name == "hessian" and args.power:
                    start = time.perf_counter()
                    old, steps = power_iteration(ctx, options)
                    rows.append(f"| ResNet-{depth} | hessian, former default (power, 20 steps) | {old:.4g} | | | "
                                f"{steps} | {time.perf_counter() - start:.0f} |")
                    print(rows[-1], flush=True)
    if args.no_write:
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.processor() or platform.machine()}"
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    entry = f"""### {dt.date.today().isoformat()}: {device}, {torch.get_num_threads()} torch thread(s)

Command: `{command}`  
Versions: python {platform.python_version()}, torch {torch.__version__}

{chr(10).join(rows)}
"""
    append_entry(DOC, SECTION, entry, INTRO)
    print(f"appended to {DOC}")


if __name__ == "__main__":
    main()
