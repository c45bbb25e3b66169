"""Seconds per probe run, for a given model and batch, with each probe's default options.

The network is built as ``python -m skipstudy.probe`` builds it without a checkpoint (seed,
synthetic data, ``model=...``), at initialisation, and every probe in ``--probes`` runs on it
through :class:`~skipstudy.probes.context.ProbeContext` exactly as the app runs it (writing its
PNG, JSON and TensorBoard events into a temporary run directory). Each probe is timed
``--repeats`` times from the call of its ``run`` to its return; the table shows the median and
the process CPU time. Without --no-write the table is appended to the "Probes" section of
docs/benchmarks.md.

    python scripts/bench_probes.py                                   # CPU: CIFAR ResNet-20, batch 32
    python scripts/bench_probes.py --depth 56 --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
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
from skipstudy.probes.context import ProbeContext
from skipstudy.runs.build import build_datamodule, build_network

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Probes"
INTRO = """Seconds per probe run on a freshly initialised network (`scripts/bench_probes.py`), each probe with the
defaults of `conf/probe/<name>.yaml` (the table lists what sets its cost), on synthetic data: median wall time over
the repeats and the process CPU time of that run. A probe's cost scales with its batches and, for the iterative ones,
with the operator products Lanczos needs to reach `tol` (`iters` caps its restarts; entries before 2026-12-06 ran
power iteration for at most `iters` steps); `paths` costs one forward and backward pass per sampled path,
`(n + 1) * samples` at most for n blocks."""

# What each probe's cost depends on (its options), shown beside the time.
COST_KEYS = {
    "feature_maps": ("images",), "shattering": ("points", "chunk"), "lesion": ("batches", "samples"),
    "landscape": ("batches", "steps", "grid"), "paths": ("batches", "samples"),
    "jacobian": ("samples", "k", "iters", "probes"), "grad_snr": ("batches", "splits"),
    "hessian": ("batches", "k", "iters"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2)")
    p.add_argument("--skip", default="true", choices=["true", "false"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--probes", default="paths,jacobian,grad_snr,hessian", help="comma-separated probe names")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.probes.split(",")
    for name in names:
        get_probe(name, key="--probes")
    overrides = ["model=cifar_resnet", f"model.depth={args.depth}", f"model.skip={args.skip}", "dataset=synthetic",
                 f"dataset.batch_size={args.batch_size}", "dataset.num_train=512", "dataset.num_val=256"]
    register()  # what the entry point registers before Hydra composes
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="probe", overrides=overrides)
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    net = build_network(cfg, dm).to(args.device)
    dm.setup("fit")
    if args.skip == "false":
        names = [n for n in names if n not in ("lesion", "paths")]  # they refuse plain twins
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                # The probe's options as the probe command composes them (defaults: probes/options.py).
                options = compose(config_name="probe", overrides=[*overrides, f"probe={name}"]).probe
            walls, cpus = [], []
            for _ in range(args.repeats):
                ctx = ProbeContext(net=net, datamodule=dm, run_dir=Path(tmp), device=torch.device(args.device),
                                   trained=False, model=OmegaConf.to_container(cfg.model), batches=options.get("batches"))
                wall, cpu = time.perf_counter(), time.process_time()
                get_probe(name).run(ctx, options)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            i = walls.index(statistics.median_low(walls))
            settings = ", ".join(f"{k}={options.get(k)}" for k in COST_KEYS.get(name, ()))
            rows.append(f"| {name} | {settings} | {walls[i]:.2f} | {cpus[i]:.2f} | {args.repeats} |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    table = ["| probe | cost settings (defaults) | wall (s, median) | CPU (s) | runs |", "|---|---|---:|---:|---:|", *rows]
    print("\n".join(table))
    if args.no_write:
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    threads = torch.get_num_threads()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    entry = f"""### {dt.date.today().isoformat()}: {device}, {os.cpu_count()} cores, {threads} torch thread(s)

Model: CIFAR ResNet-{args.depth} ({'skip' if args.skip == 'true' else 'plain'}) at initialisation, batch {args.batch_size}, 32 px, float32  
Command: `{command}`  
Versions: python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}  
Load average (1 min) before/after: {load_before:.2f}/{load_after:.2f} (other work shares this machine)

{chr(10).join(table)}
"""
    append_entry(DOC, SECTION, entry, INTRO)
    print(f"appended to {DOC}")


if __name__ == "__main__":
    main()
