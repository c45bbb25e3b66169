"""Training steps/s with and without the gradient monitor, side by side in one process.

Rows:
  none      no monitor (the baseline)
  monitor   GradientFlowMonitor on every Conv2d and Linear, every step, activations on,
            TensorBoard scalars + JSON export (conf/monitor/default.yaml)
  monitor_noact  the same with monitor.activations=false (gradients only)
  monitor_noblocks  monitor with monitor.blocks=false (no grad_split/spp): the difference to
            ``monitor`` is the cost of the per-block quantities
  notebook  what the studies' notebooks did: register_full_backward_hook on every Conv2d and
            Linear and ``grad_output[0].norm().item()`` per layer per step
  none_compiled, monitor_compiled   with --compile: ``none`` and ``monitor`` on the network
            compiled in place with torch.compile (``fast.compile=true``); the monitor's hooks
            are graph breaks there (skipstudy.monitor.callback)

Each repeat runs the rows in turn (order rotated per repeat) with a fresh Lightning Trainer
and a fresh copy of the same initial network, on the same in-memory synthetic batches, so
load from other processes on the machine hits all rows alike. steps/s is timed from the
start of the first step after the warm-up to the end of the last step; the table shows the
median over repeats. Without --no-write the table is appended as a dated entry to the "Gradient
monitor" section of docs/benchmarks.md (earlier entries and other sections are left as they are).

    python scripts/bench_monitor.py                      # CPU: CIFAR ResNet-20, batch 128
    python scripts/bench_monitor.py --device cuda --model resnet50 --batch-size 256 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from benchmarks_doc import append_entry  # scripts/benchmarks_doc.py, beside this script
from skipstudy.monitor import GradientFlowMonitor

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Gradient monitor"


class Lit(L.LightningModule):
    def __init__(self, net: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.net = net
        self.channels_last = channels_last

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NotebookMonitor(Callback):
    """The notebooks' monitor: a full backward hook and one ``.item()`` per layer per step."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = defaultdict(list)
        self.handles = []

    def setup(self, trainer, pl_module, stage):
        for name, module in pl_module.net.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self.handles.append(module.register_full_backward_hook(partial(self._hook, name)))

    def _hook(self, name, module, grad_input, grad_output):
        self.history[name].append(grad_output[0].norm().item())

    def teardown(self, trainer, pl_module, stage):
        for h in self.handles:
            h.remove()


class Timer(Callback):
    """Wall time and process CPU time of each training step after the warm-up (batch start to
    batch end). CPU time counts the work done whatever else runs on the machine; with one
    torch thread no thread spins in a barrier, so it is the steadier measure on a shared CPU."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[tuple[float, float]] = []
        self._t = (0.0, 0.0)

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup:
            self._sync(pl_module)
            self._t = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self._sync(pl_module)
            self.times.append((time.perf_counter() - self._t[0], time.process_time() - self._t[1]))


def build_net(model: str) -> nn.Module:
    from skipstudy import models

    if model.startswith("cifar_resnet"):  # cifar_resnet20, cifar_resnet56, ...: depth 6n+2
        return models.cifar_resnet(10, depth=int(model.removeprefix("cifar_resnet")))
    return getattr(models, model)(1000 if model.startswith("resnet") else 10)


def run_once(kind: str, net0: nn.Module, batches, args, tmp: Path) -> list[tuple[float, float]]:
    net = copy.deepcopy(net0)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if kind.endswith("_compiled"):
        net.compile()  # in place, as LitClassifier does for fast.compile=true
    timer = Timer(args.warmup)
    callbacks: list[Callback] = [timer]
    if kind.startswith("monitor"):
        monitor = GradientFlowMonitor(activations=kind != "monitor_noact", blocks=kind != "monitor_noblocks")
        monitor.resolve(net)
        callbacks.append(monitor)
    elif kind == "notebook":
        callbacks.append(NotebookMonitor())
    run_dir = tmp / f"{kind}_{time.monotonic_ns()}"
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
        logger=TensorBoardLogger(str(run_dir), name="", version=""), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=args.log_every_n_steps, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(Lit(net, args.channels_last), batches)
    return timer.times


def environment(args) -> dict[str, str]:
    import numpy
    from importlib import metadata

    if args.device == "cuda":
        device = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        threads = torch.get_num_threads()
        device = f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"
    return {
        "device": device,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {metadata.version('lightning')}, numpy {numpy.__version__}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20", help="cifar_resnet<depth> (20, 56, ...) or a skipstudy.models builder (resnet50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR nets, 224 otherwise")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--channels-last", action="store_true", help="network and inputs in channels_last")
    p.add_argument("--compile", action="store_true",
                   help="add none_compiled and monitor_compiled rows (torch.compile; raise --warmup to cover compiling)")
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    p.add_argument("--log-every-n-steps", type=int, default=1,
                   help="Lightning's; each logged step reads the loss on the host (a sync on a GPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = args.image_size or (32 if args.model.startswith("cifar") else 224)
    num_classes = 10 if args.model.startswith("cifar") else 1000

    torch.manual_seed(0)
    net0 = build_net(args.model)
    n = args.warmup + args.steps
    g = torch.Generator().manual_seed(0)
    made = [(torch.randn(args.batch_size, 3, image, image, generator=g),
             torch.randint(0, num_classes, (args.batch_size,), generator=g)) for _ in range(n)]
    batches = DataLoader(made, batch_size=None)  # whole pre-made batches, no collation
    load_before = os.getloadavg()[0]
    kinds = ["none", "monitor", "monitor_noact", "monitor_noblocks", "notebook"] + (["none_compiled", "monitor_compiled"] if args.compile else [])
    step_times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    t0 = time.perf_counter()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for kind in order:
                times = run_once(kind, net0, batches, args, Path(tmp))
                step_times[kind] += times
                wall = sum(t for t, _ in times)
                print(f"repeat {r + 1}/{args.repeats} {kind:9s} {len(times) / wall:7.3f} steps/s", flush=True)
    elapsed = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    # Per-step times pooled over repeats; the median step resists bursts of load from other
    # processes better than a mean over a run. steps/s = 1 / median wall time of a step.
    def median(kind: str, i: int) -> float:
        return statistics.median(t[i] for t in step_times[kind])

    env = environment(args)
    table = ["| row | steps/s (1 / median step) | median step wall (ms) | median step CPU (ms) | steps timed "
             "| overhead, wall | overhead, CPU time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in kinds:
        wall, cpu = median(kind, 0), median(kind, 1)
        base = "none_compiled" if kind == "monitor_compiled" else "none"
        over = ["-", "-"] if kind in ("none", "none_compiled") else [
            f"{(wall / median(base, 0) - 1) * 100:+.1f}%", f"{(cpu / median(base, 1) - 1) * 100:+.1f}%"]
        table.append(f"| {kind} | {1 / wall:.3f} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {len(step_times[kind])} "
                     f"| {over[0]} | {over[1]} |")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    label = f"CIFAR ResNet-{args.model.removeprefix('cifar_resnet')}" if args.model.startswith("cifar_resnet") else args.model
    print("\n".join(table))
    if args.no_write:
        return
    layout = "channels_last" if args.channels_last else "contiguous"
    blocks_wall = median("monitor", 0) - median("monitor_noblocks", 0)
    blocks_cpu = median("monitor", 1) - median("monitor_noblocks", 1)
    blocks_line = (f"Per-block quantities (`monitor` - `monitor_noblocks`): {blocks_wall * 1e3:+.0f} ms wall, "
                   f"{blocks_cpu * 1e3:+.0f} ms CPU per recorded step ({blocks_cpu / median('none', 1) * 100:+.1f}% of "
                   f"`none`'s CPU time). `monitor.blocks=false`, or a sparser `monitor.every_n_steps` / "
                   f"`monitor.schedule=log`, removes or divides it.")
    other_device = "GPU (ResNet-50, batch 256, bf16; target <= 3%)" if args.device == "cpu" else "CPU"
    intro = f"""Training steps/s of {label} (batch {args.batch_size}, {image} px, {args.precision}, {layout}, SGD with momentum) through a
Lightning Trainer, `scripts/bench_monitor.py`. `none`: no monitor. `monitor`: GradientFlowMonitor on every Conv2d
and Linear every step with activation statistics, TensorBoard scalars and JSON export (`conf/monitor/default.yaml`).
`monitor` includes the per-residual-block quantities (`grad_split/*`, `spp/*`, `monitor.blocks=true`); `monitor_noblocks`
is `monitor` with `monitor.blocks=false`, so their difference is the blocks' cost.
`monitor_noact`: the same with `monitor.activations=false`. `notebook`: the notebooks' monitor, `register_full_backward_hook` + `grad_output[0].norm().item()` per layer per step.
`none_compiled` / `monitor_compiled` (with `--compile`): `none` / `monitor` on the network compiled in place with
`torch.compile` (Inductor), the monitor's hooks running at graph breaks; `monitor_compiled`'s overhead is relative
to `none_compiled`.
The rows alternate within each repeat (order rotated) on the same batches: {args.repeats} repeats of
{args.steps} timed steps after {args.warmup} warm-up step(s); steps/s is 1 / the median wall time of a step over
all timed steps of a row. Overhead = median step time relative to `none`, in wall time and in process CPU
time (the work done; steadier than wall time when other jobs share the CPU, exact with one torch thread).
Differences within a few percent are noise on a shared machine; a negative overhead shows its size.
Target: <= 10% on the CPU (CIFAR ResNet-20, batch 128), <= 3% on a GPU (ResNet-50, batch 256, bf16).

"""
    entry = f"""### {dt.date.today().isoformat()}: {env['device']}

Command: `{command}` ({elapsed:.0f} s)  
Versions: {env['versions']}  
Load average (1 min) before/after: {load_before:.2f}/{load_after:.2f} (other work shares this machine)

{chr(10).join(table)}

{blocks_line}

{other_device}: see its own entry below if measured.

Where the monitor's time goes: per layer per step, on the CPU the activation statistics read the layer's output
three times (sum, row-wise sum of squares, nonzero count; a layer with mean^2 > 9 var takes a centred pass that
writes one scaled copy) and the output gradient once (row-wise sum of squares; a scaled copy when its squares would
leave float32's range); these memory passes dominate on the CPU. On an accelerator each is a few float64-accumulating
ops (a float64 sum, a centred float64 copy and its norm, a nonzero count; the gradient's norm), counted per step by
`scripts/count_monitor_ops.py`.
Per residual block, the blocks' quantities read the block output, the branch output and both their gradients
twice (per-channel sums, a float64-accumulated sum of squares) and the two parts of the input gradient and their sum
once each (float64-accumulated norms); an identity shortcut's part is one subtraction.
`monitor.activations=false` drops the forward passes. At a tiny batch (`--batch-size 2`) the memory passes
vanish and the rows show the fixed cost per step: hooks, stacking, the one host transfer, the TensorBoard event.
"""
    append_entry(DOC, SECTION, entry, intro)
    print(f"appended an entry to the '{SECTION}' section of {DOC}")


if __name__ == "__main__":
    main()
