"""End-to-end training throughput: the notebook-style loop, skipstudy, a raw loop, the model alone.

    python scripts/benchmark.py                     # all workloads; table appended to docs/benchmarks.md
    python scripts/benchmark.py --quick --steps 2 --doc /tmp/bench.md

For each workload (model, data, image size, batch) it measures training images/s and peak
memory under these set-ups, side by side in one run:

* ``notebook``: the loop the studies wrote: a torchvision data set with PIL transforms
  (random crop + flip, resize when the workload asks, ToTensor, Normalize), a DataLoader,
  fp32, ``register_full_backward_hook`` on five studied layers calling ``.item()`` on the
  output-gradient norm, and ``loss.item()`` every step.
* ``skipstudy``: ``skipstudy.train.train`` with the workload's config: gradient monitor on
  (``monitor=default``: every step, all Conv2d/Linear layers) and the default fast settings
  (``auto``/``null`` everywhere), Lightning logging and progress bar as shipped.
* ``skipstudy, monitor off``: the same with ``monitor=off``.
* ``raw loop``: a plain PyTorch loop with settings identical to ``skipstudy, monitor off``:
  the same network builder and seed, the same DataLoader/device batches from the same data
  module (same tensors, workers, batch), the same resolved precision, memory format and
  cudnn.benchmark, the same optimizer; no logging, no metrics, no callbacks.
* ``model-only``: the same network, precision, memory format and batch on synthetic tensors
  already on the device; no data loading, no logging. The upper bound.

Each set-up runs in its own subprocess (a clean peak-memory reading: ``VmHWM`` of the
training process on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU), set-ups are
interleaved over ``--repeats`` rounds (order rotated each round) and the table reports
medians. Timing covers ``--steps`` full iterations (data fetch included) after ``--warmup``;
on a GPU it is bracketed by ``torch.cuda.synchronize``. Two more steps afterwards count the
scalar reads (``.item()``, ``float()``, ...: a host-device sync each on a GPU) per step.

Workloads that target a GPU read "not measured" on a machine without one; they are never
estimated. ``--device cpu`` runs them on the CPU anyway (labelled as CPU figures).

The mini CIFAR copy in ../shared/data fails torchvision's MD5 check by design (a 1,000-image
subset); the benchmark bypasses that check explicitly and tiles the copy to enough images
for one epoch longer than the measured steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from unittest import mock

from benchmarks_doc import append_entry  # scripts/benchmarks_doc.py, beside this script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SECTION = "## End-to-end throughput"
RESULT_MARK = "BENCH_RESULT "

SETUPS = ("notebook", "skipstudy", "skipstudy, monitor off", "raw loop", "model-only")
# skipstudy set-ups and the config overrides that make them (on top of the workload's).
SKIPSTUDY_OVERRIDES = {
    "skipstudy": [],
    "skipstudy, monitor off": ["monitor=off"],
    # The layout auto picks on CUDA and x86 CPUs, turned off: shows what channels_last gives.
    "skipstudy, contiguous": ["fast.channels_last=false"],
    "skipstudy, compile": ["fast.compile=true"],
    "skipstudy, compile, monitor off": ["fast.compile=true", "monitor=off"],
}
COMPILE_SETUPS = ("skipstudy, compile", "skipstudy, compile, monitor off")
MODEL_ONLY_BATCHES = 4


@dataclass(frozen=True)
class Workload:
    """One model + data + image size + batch, and the targets that apply to it.

    ``studied``: the five layers the notebook hooks, spread over depth: the stem conv, the
    first conv of the first block, the first conv of a block near mid-depth, the last conv,
    and the classifier.
    """

    name: str
    data: str  # cifar10 | tiny_imagenet
    model: tuple[str, ...]  # Hydra overrides of the model group
    image_size: int
    batch_size: int
    studied: tuple[str, ...]
    gpu: bool  # its targets are GPU targets
    setups: tuple[str, ...] = SETUPS
    epoch: bool = False  # measure one whole epoch instead of steps
    epoch_images: int = 0
    note: str = ""


WORKLOADS = {
    w.name: w
    for w in (
        Workload("cifar-resnet20-32px", "cifar10", ("model=cifar_resnet", "model.depth=20"), 32, 128,
                 ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2", "fc"), gpu=False,
                 setups=(*SETUPS, "skipstudy, contiguous"), note="CPU targets"),
        Workload("resnet50-224px-tiny-imagenet", "tiny_imagenet", ("model=resnet50",), 224, 128,
                 ("conv1", "layer1.0.conv1", "layer3.0.conv1", "layer4.2.conv3", "fc"), gpu=True,
                 note="GPU targets"),
        Workload("cifar-resnet56-epoch", "cifar10", ("model=cifar_resnet", "model.depth=56"), 32, 128,
                 ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.8.conv2", "fc"), gpu=True,
                 setups=("skipstudy",), epoch=True, epoch_images=50_000, note="GPU target: one 50k-image epoch"),
    )
}


# ============================================================================ worker side
# Everything below up to "parent side" runs inside one subprocess per (workload, set-up).


def rss_mib(field_name: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MiB, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ScalarReads:
    """Counts ``aten._local_scalar_dense`` calls (``.item()``, ``float(t)``, ``bool(t)``,
    ``.tolist()``) while active: each is a host-device sync on a GPU. Device-to-host copies
    (``.cpu()``) are not counted: on the CPU they are no-ops and cannot be seen."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        target = torch.ops.aten._local_scalar_dense.default
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is target:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def tile(images, labels, n: int):
    import numpy as np

    reps = -(-n // len(labels))
    return np.concatenate([images] * reps)[:n], np.concatenate([np.asarray(labels)] * reps)[:n]


@contextlib.contextmanager
def mini_data(n_train: int):
    """The shared mini copies as data sets of ``n_train`` training images.

    CIFAR: torchvision's MD5 check refuses the subset; it is bypassed here on purpose (the
    files are the real images, only fewer of them). Both data modules' training split is the
    mini copy repeated to ``n_train`` images, so one epoch outlasts the measured steps.
    """
    from torchvision import datasets

    from skipstudy.data.cifar import CIFAR10DataModule
    from skipstudy.data.tiny_imagenet import TinyImageNetDataModule

    def tiled(original):
        def load_split(self, split):
            images, labels = original(self, split)
            return tile(images, labels, n_train) if split == "train" else (images, labels)
        return load_split

    with contextlib.ExitStack() as stack:
        # Bypass the MD5 integrity check for the mini subset (see the module docstring).
        stack.enter_context(mock.patch.object(datasets.CIFAR10, "_check_integrity", return_value=True))
        for cls in (CIFAR10DataModule, TinyImageNetDataModule):
            stack.enter_context(mock.patch.object(cls, "load_split", tiled(cls.load_split)))
        yield


def compose(spec: dict):
    """The composed ``train.yaml`` for this workload (as ``python -m skipstudy.train`` would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from skipstudy.overrides import register

    register()  # what the entry point registers before Hydra composes
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True, overrides=spec["overrides"])
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = spec["run_dir"]
    HydraConfig.instance().set_config(cfg)
    return cfg


class Clock:
    """Times ``steps`` iterations after ``warmup``, then counts scalar reads over ``count`` more.

    ``tick()`` is called once at the end of every iteration (after the optimizer step), so the
    timed window holds ``steps`` whole iterations, data fetch included.
    """

    def __init__(self, warmup: int, steps: int, count: int, device) -> None:
        import torch

        self.warmup, self.steps, self.count = warmup, steps, count
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.done = 0
        self.start = self.stop = None
        self.reads = ScalarReads()
        self.counting = False

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.count

    def tick(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif self.done == self.warmup + self.steps:
            self.sync()
            self.stop = time.perf_counter()
            if self.count:
                self.reads.__enter__()
                self.counting = True
        elif self.counting and self.done == self.total:
            self.close()

    def close(self) -> None:
        if self.counting:
            self.reads.__exit__(None, None, None)
            self.counting = False

    def result(self, batch_size: int) -> dict:
        seconds = self.stop - self.start
        return {"seconds": seconds, "images": self.steps * batch_size,
                "images_per_s": self.steps * batch_size / seconds,
                "reads_per_step": self.reads.count / self.count if self.count else None}


def autocast(precision: str, device):
    import torch

    if precision == "32-true":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise SystemExit(f"benchmark: the raw and model-only loops support 32-true and bf16-mixed, not {precision}")


def manual_loop(net, optimizer, batches, clock: Clock, precision: str, channels_last: bool, device) -> None:
    """forward, cross-entropy, zero_grad, backward, step; nothing else."""
    import torch
    import torch.nn.functional as F

    net.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in batches:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with autocast(precision, device):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.tick()
        if clock.done >= clock.total:
            break
    clock.close()


def worker(spec: dict) -> dict:
    """Run one set-up of one workload; returns the measurement."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    base_mib = rss_mib("VmRSS")
    workload = Workload(**{**spec["workload"], "model": tuple(spec["workload"]["model"]),
                           "studied": tuple(spec["workload"]["studied"]), "setups": tuple(spec["workload"]["setups"])})
    device = torch.device(spec["device"])
    setup = spec["setup"]
    clock = Clock(spec["warmup"], spec["steps"], spec["count"], device)
    out: dict = {"setup": setup}
    with mini_data(spec["n_train"]):
        cfg = compose(spec)
        from hydra.utils import instantiate

        from skipstudy.runs import fast
        from skipstudy.runs.build import build_datamodule, build_network

        speed = fast.resolve(cfg)
        out.update(precision=speed.precision, channels_last=speed.channels_last)
        torch.manual_seed(cfg.seed)
        if setup.startswith("skipstudy"):
            out.update(run_skipstudy(cfg, spec, clock, workload, device))
        elif setup == "notebook":
            out.update(run_notebook(cfg, spec, clock, workload, device))
            out.update(precision="32-true", channels_last=False)
        else:
            torch.backends.cudnn.benchmark = speed.cudnn_benchmark
            dm = build_datamodule(cfg)
            net = build_network(cfg, dm).to(device)
            if speed.channels_last:
                net = net.to(memory_format=torch.channels_last)
            optimizer = instantiate(cfg.optimizer)(net.parameters())
            if setup == "raw loop":
                dm.device = device
                dm.setup("fit")
                loader = dm.train_dataloader()
                out["data"] = f"skipstudy {dm.loader_used} path, {spec['workers']} workers" if dm.loader_used == "torch" \
                    else f"skipstudy {dm.loader_used} path"
                manual_loop(net, optimizer, loader, clock, speed.precision, speed.channels_last, device)
            else:  # model-only: synthetic batches made on the device before timing
                size, batch = dm.image_size, workload.batch_size
                # A few distinct batches, cycled: one repeated batch is memorised within ~10
                # steps (loss -> 0), a regime real training never runs in.
                pool = [(torch.randn(batch, dm.channels, size, size, device=device),
                         torch.randint(0, dm.num_classes, (batch,), device=device)) for _ in range(MODEL_ONLY_BATCHES)]
                out["data"] = f"synthetic, on the device ({MODEL_ONLY_BATCHES} batches cycled)"
                manual_loop(net, optimizer, itertools.cycle(pool), clock, speed.precision,
                            speed.channels_last, device)
    epoch_result = out.pop("epoch_result", None)
    out.update(epoch_result if workload.epoch else clock.result(workload.batch_size))
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_mib"] = rss_mib("VmHWM")
        out["base_mib"] = base_mib
        out["peak_kind"] = "VmHWM"
    return out


def run_skipstudy(cfg, spec: dict, clock: Clock, workload: Workload, device) -> dict:
    """``skipstudy.train.train`` as shipped, plus one timing callback appended to the Trainer's."""
    import lightning

    from skipstudy.train import train

    class Timer(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not workload.epoch:
                clock.tick()

        def on_train_epoch_start(self, trainer, pl_module):
            if workload.epoch and trainer.current_epoch == 1:
                clock.sync()
                self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if workload.epoch and trainer.current_epoch == 1:
                clock.sync()
                seconds = time.perf_counter() - self.t0
                n = trainer.num_training_batches * workload.batch_size
                info["epoch_result"] = {"seconds": seconds, "images": n, "images_per_s": n / seconds,
                                        "reads_per_step": None}

        def on_fit_start(self, trainer, pl_module):
            dm = trainer.datamodule
            info["data_module"] = dm

    info: dict = {}
    timer = Timer()
    original = lightning.Trainer

    class TimedTrainer(original):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), timer], **kwargs)

    with mock.patch.object(lightning, "Trainer", TimedTrainer):
        train(cfg, spec["run_dir"])
    clock.close()
    dm = info.get("data_module")
    used = getattr(dm, "loader_used", None)
    out = {"data": f"skipstudy {used} path, {spec['workers']} workers" if used == "torch" else f"skipstudy {used} path"}
    if "epoch_result" in info:
        out["epoch_result"] = info["epoch_result"]
    return out


def run_notebook(cfg, spec: dict, clock: Clock, workload: Workload, device) -> dict:
    """The studies' loop: torchvision data set + PIL transforms, DataLoader, fp32, hooks with .item()."""
    import numpy as np
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    size = workload.image_size
    if workload.data == "cifar10":
        native, mean, std = 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        data = datasets.CIFAR10(str(SHARED / "cifar10-mini"), train=True, download=False)  # MD5 check bypassed
        data.data, data.targets = tile(data.data, data.targets, spec["n_train"])
        data.targets = data.targets.tolist()
        num_classes = 10
    else:
        native, mean, std = 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
        data = datasets.ImageFolder(str(SHARED / "tiny-imagenet-mini" / "tiny-imagenet-200" / "train"))
        reps = -(-spec["n_train"] // len(data.samples))
        data.samples = (data.samples * reps)[: spec["n_train"]]
        data.targets = [t for _, t in data.samples]
        num_classes = len(data.classes)
    steps = [T.RandomCrop(native, padding=4), T.RandomHorizontalFlip()]
    if size != native:
        steps.append(T.Resize(size))
    data.transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    loader = DataLoader(data, batch_size=workload.batch_size, shuffle=True, num_workers=spec["workers"],
                        drop_last=True)

    model = instantiate(cfg.model, num_classes=num_classes, in_channels=3).to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    modules = dict(model.named_modules())
    grad_norms: dict[str, list[float]] = {name: [] for name in workload.studied}

    def hook(name):
        def record(module, grad_input, grad_output):
            grad_norms[name].append(grad_output[0].norm().item())
        return record

    for name in workload.studied:
        modules[name].register_full_backward_hook(hook(name))
    model.train()
    losses = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        clock.tick()
        if clock.done >= clock.total:
            break
    clock.close()
    assert all(len(v) == clock.done for v in grad_norms.values()) and np.isfinite(losses).all()
    return {"data": f"torchvision + PIL, DataLoader, {spec['workers']} workers"}


# ============================================================================ parent side


def overrides(workload: Workload, setup: str, args, device: str, n_train: int, total_steps: int) -> list[str]:
    if workload.data == "cifar10":
        data = ["dataset=cifar10", f"dataset.root={SHARED / 'cifar10-mini'}", "dataset.download=false"]
    else:
        data = ["dataset=tiny_imagenet", f"dataset.root={SHARED / 'tiny-imagenet-mini'}",
                f"dataset.cache_dir={args.cache_dir}"]
    ov = [*data, f"dataset.batch_size={args.batch_size or workload.batch_size}",
          f"dataset.image_size={args.image_size or workload.image_size}", f"dataset.num_workers={args.workers}",
          *workload.model, f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
          "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
          f"paths.log_dir={args.tmp}/logs", f"paths.data_dir={args.tmp}/data"]
    if workload.epoch:
        ov += ["trainer.max_epochs=2"]
    else:
        ov += ["trainer.max_epochs=1", f"trainer.max_steps={total_steps}"]
    return ov + SKIPSTUDY_OVERRIDES.get(setup, [])


def user_command(workload: Workload, setup: str, args, device: str, n_train: int, total: int) -> str:
    ov = [o for o in overrides(workload, setup, args, device, n_train, total) if not o.startswith("paths.")]
    return "python -m skipstudy.train " + " ".join(ov)


def run_one(workload: Workload, setup: str, args, device: str) -> dict:
    total = args.warmup + args.steps + args.count
    batch = args.batch_size or workload.batch_size
    # --quick shortens the epoch workload to 10 steps per epoch.
    epoch_images = batch * 10 if args.quick else workload.epoch_images
    n_train = epoch_images if workload.epoch else batch * (total + 2)
    run_dir = tempfile.mkdtemp(prefix="run_", dir=args.tmp)
    spec = {
        "workload": {**asdict(workload), "batch_size": batch, "image_size": args.image_size or workload.image_size},
        "setup": setup, "device": device, "steps": args.steps, "warmup": args.warmup, "count": args.count,
        "workers": args.workers, "threads": args.threads, "n_train": n_train, "run_dir": run_dir,
        "overrides": overrides(workload, setup, args, device, n_train, total),
    }
    load = os.getloadavg()[0]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=args.tmp)
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark: {workload.name} / {setup} failed (exit {proc.returncode})")
    return {**json.loads(line[len(RESULT_MARK):]), "load": load}


@dataclass
class Row:
    workload: str
    setup: str
    device: str
    batch: int
    image_size: int
    runs: list[dict] = field(default_factory=list)
    skipped: str | None = None

    @property
    def rate(self) -> float | None:
        return statistics.median(r["images_per_s"] for r in self.runs) if self.runs else None

    @property
    def peak(self) -> float | None:
        return statistics.median(r["peak_mib"] for r in self.runs) if self.runs else None

    def first(self, key: str, default="-"):
        return self.runs[0].get(key, default) if self.runs else default


def paired(rows: dict, workload: str, a: str, b: str) -> float | None:
    """Median over rounds of rate(a)/rate(b), round by round (the interleaved pairs)."""
    ra, rb = rows.get((workload, a)), rows.get((workload, b))
    if not ra or not rb or not ra.runs or not rb.runs:
        return None
    return statistics.median(x["images_per_s"] / y["images_per_s"] for x, y in zip(ra.runs, rb.runs))


def ratio(rows: dict, workload: str, a: str, b: str) -> float | None:
    ra, rb = rows.get((workload, a)), rows.get((workload, b))
    if not ra or not rb or ra.rate is None or rb.rate is None:
        return None
    return ra.rate / rb.rate


def best_ratio(rows: dict, workload: str, a: str, b: str) -> float | None:
    """max rate(a) / max rate(b): on a shared machine other work only ever slows a run down."""
    ra, rb = rows.get((workload, a)), rows.get((workload, b))
    if not ra or not rb or not ra.runs or not rb.runs:
        return None
    return max(r["images_per_s"] for r in ra.runs) / max(r["images_per_s"] for r in rb.runs)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(rows: dict) -> str:
    lines = ["| workload | set-up | device | precision | layout | batch | px | data | images/s (median) | min-max | "
             "vs notebook | vs model-only | peak memory MiB | scalar reads/step |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (wname, setup), row in rows.items():
        if row.skipped:
            lines.append(f"| {wname} | {setup} | {row.device} | - | - | {row.batch} | {row.image_size} | - | "
                         f"{row.skipped} | - | - | - | - | - |")
            continue
        rates = [r["images_per_s"] for r in row.runs]
        epoch = row.first("epoch_seconds", None)
        rate = f"{row.rate:,.1f}" + (f" ({epoch:.1f} s/epoch)" if epoch else "")
        reads = row.first("reads_per_step", None)
        peak = f"{row.peak:,.0f}" + (f" (RSS; {row.first('base_mib', 0):,.0f} after imports)"
                                     if row.first("peak_kind") == "VmHWM" else "")
        lines.append(
            f"| {wname} | {setup} | {row.device} | {row.first('precision')} | "
            f"{'channels_last' if row.first('channels_last') else 'contiguous'} | {row.batch} | {row.image_size} | "
            f"{row.first('data')} | {rate} | {min(rates):,.1f}-{max(rates):,.1f} (n={len(rates)}) | "
            f"{fmt_ratio(ratio(rows, wname, setup, 'notebook'))} | {fmt_ratio(ratio(rows, wname, setup, 'model-only'))} | "
            f"{peak} | {'-' if reads is None else f'{reads:g}'} |")
    return "\n".join(lines)


def targets(rows: dict, on_gpu: bool) -> list[str]:
    """Each target of the issue: met / missed / not measured, with the measured ratio."""
    out = []

    def judge(label, value, ok, extra=""):
        if value is None:
            out.append(f"- {label}: **not measured**")
            return
        out.append(f"- {label}: {value:.3f}{extra} -> **{'met' if ok(value) else 'missed'}**")

    def compare(label, w, a, b, ok, measured):
        """The verdict is on the median of the per-round ratios: the two set-ups of a target run
        next to each other in every round, so load that drifts over the run cancels out."""
        if not measured or paired(rows, w, a, b) is None:
            return judge(label, None, ok)
        judge(label, paired(rows, w, a, b), ok,
              f" (median of per-round ratios; ratio of medians {ratio(rows, w, a, b):.3f}, "
              f"of the best runs {best_ratio(rows, w, a, b):.3f})")

    w = "cifar-resnet20-32px"
    cpu_ok = (w, "skipstudy") in rows and rows[(w, "skipstudy")].device == "cpu" and rows[(w, "skipstudy")].runs
    compare("CPU: skipstudy / notebook-style loop >= 1.0 (CIFAR ResNet-20, 32 px)",
            w, "skipstudy", "notebook", lambda v: v >= 1.0, cpu_ok)
    compare("CPU: skipstudy (monitor off) / raw loop, identical settings >= 0.95",
            w, "skipstudy, monitor off", "raw loop", lambda v: v >= 0.95, cpu_ok)
    w = "resnet50-224px-tiny-imagenet"
    gpu_ok = on_gpu and (w, "skipstudy") in rows and rows[(w, "skipstudy")].runs
    compare("GPU: skipstudy / notebook-style loop >= 5 (ResNet-50, 224 px, Tiny ImageNet-shaped)",
            w, "skipstudy", "notebook", lambda v: v >= 5.0, gpu_ok)
    compare("GPU: skipstudy / model-only bound >= 0.90 (same workload)",
            w, "skipstudy", "model-only", lambda v: v >= 0.90, gpu_ok)
    w = "cifar-resnet56-epoch"
    row = rows.get((w, "skipstudy"))
    secs = statistics.median(r["seconds"] for r in row.runs) if on_gpu and row and row.runs else None
    judge("GPU (H100-class): CIFAR ResNet-56 one epoch (50k images) <= 3 s, seconds", secs, lambda v: v <= 3.0)
    return out


def device_text(device: str) -> str:
    import torch

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    text = f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if device == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    else:
        text += "; no GPU" if not torch.cuda.is_available() else "; GPU present but not used (--device cpu)"
    return text


def versions() -> str:
    import torch

    names = ["torch", "torchvision", "lightning", "torchmetrics", "numpy", "pillow"]
    parts = [f"python {platform.python_version()}"] + [f"{n} {metadata.version(n)}" for n in names]
    parts.append(f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else
                 f"CUDA not available (torch built for {torch.version.cuda})")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        parts.append(f"skipstudy {commit}{' + local changes' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(parts)


def append(doc: Path, entry: str) -> None:
    """Append ``entry`` at the end of the End-to-end throughput section, creating it if needed."""
    append_entry(doc, SECTION, entry, "Measured by `scripts/benchmark.py` (its docstring defines the set-ups).")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when present; GPU workloads read 'not measured' on the CPU unless --device cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--count", type=int, default=2, help="iterations afterwards that count scalar reads")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers, notebook and skipstudy alike "
                        "(4 = dataset.num_workers default)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every set-up (0: torch's default, one per core)")
    parser.add_argument("--batch-size", type=int, default=None, help="override every workload's batch size")
    parser.add_argument("--image-size", type=int, default=None, help="override every workload's image size")
    parser.add_argument("--setups", nargs="+", choices=list(dict.fromkeys([*SETUPS, *SKIPSTUDY_OVERRIDES])), default=None,
                        help="run only these set-ups (default: all of each workload)")
    parser.add_argument("--compile", action="store_true", help="add 'skipstudy, compile' rows, monitor on and off (slow to compile)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round, 1 warm-up step, batch 16, 0 workers, 10-step epochs")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    if args.quick:
        args.repeats, args.warmup, args.workers = 1, 1, 0
        args.batch_size = args.batch_size or 16

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="skipstudy_bench_")
    args.tmp = tmp.name
    args.cache_dir = str(Path(tmp.name) / "cache")

    load_before = os.getloadavg()[0]
    rows: dict[tuple[str, str], Row] = {}
    plan = []
    for name in args.workloads:
        w = WORKLOADS[name]
        setups = list(w.setups) + (list(COMPILE_SETUPS) if args.compile and not w.epoch else [])
        setups = [s for s in setups if args.setups is None or s in args.setups]
        for setup in setups:
            row = Row(name, setup, device, args.batch_size or w.batch_size, args.image_size or w.image_size)
            if w.gpu and device != "cuda" and args.device != "cpu":
                row.skipped = "not measured (no GPU)"
            else:
                plan.append((w, setup))
            rows[(name, setup)] = row
    for r in range(args.repeats):
        order = plan[r % len(plan):] + plan[: r % len(plan)] if plan else []
        for w, setup in order:
            res = run_one(w, setup, args, device)
            if w.epoch:
                res["epoch_seconds"] = res["seconds"]
            rows[(w.name, setup)].runs.append(res)
            print(f"round {r + 1}/{args.repeats}  {w.name:30s} {setup:32s} {res['images_per_s']:10.1f} images/s  "
                  f"peak {res['peak_mib']:,.0f} MiB  load {res['load']:.2f}", flush=True)
    # Rows in plan order, whatever order the rounds ran in.
    result = table(rows)
    verdicts = targets(rows, device == "cuda")
    command = "python scripts/benchmark.py" + (" " + shlex.join(argv) if argv else "")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    loads = [r["load"] for row in rows.values() for r in row.runs]
    entry = "\n".join([
        f"### {datetime.date.today().isoformat()}: {device_text(device)}",
        "",
        f"Command: `{command}` ({elapsed:.0f} s; {args.repeats} interleaved rounds x {args.steps} timed steps "
        f"after {args.warmup} warm-up)  ",
        f"Versions: {versions()}  ",
        f"torch threads per set-up: {args.threads or 'default'}; DataLoader workers: {args.workers}; "
        f"load average (1 min) before/after: {load_before:.2f}/{load_after:.2f}, at each run's start "
        f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f} (other work shares this machine)  ",
        "Equivalent training command of the skipstudy rows (the benchmark adds a timing callback and tiles "
        "the mini data set):  ",
        *[f"`{user_command(WORKLOADS[n], 'skipstudy', args, device, 0, args.warmup + args.steps + args.count)}`  "
          for n in args.workloads if not rows[(n, WORKLOADS[n].setups[0])].skipped],
        "",
        result,
        "",
        "Targets:",
        "",
        *verdicts,
        "",
    ])
    print("\n" + result + "\n\n" + "\n".join(verdicts))
    if not args.no_write:
        append(args.doc, entry)
        print(f"\nappended to {args.doc}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
