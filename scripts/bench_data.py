"""Input-pipeline throughput alone (no model): images/s per data set, image size and path.

    python scripts/bench_data.py                 # prints the table, appends it to docs/benchmarks.md
    python scripts/bench_data.py --no-write --seconds 2

Measures CIFAR-10 and Tiny ImageNet (the mini copies in ../shared/data, tiled to
``--images`` training images) at 32, 64 and 224 px with augmentation on, for
``dataset.loader=torch`` (DataLoader, ``--workers`` processes) and ``dataset.loader=device``
(on the CPU, and on the GPU when one is present; GPU rows read "not measured" otherwise).
For Tiny ImageNet a "pil" row shows the pipeline this project replaced: PIL decodes and
resizes every JPEG in every epoch. Each row runs ``--seconds`` after its first batch (worker
start-up and the one-time upload excluded) and reports the best of three windows.

The mini CIFAR copy fails torchvision's MD5 check by design (it is a subset); the benchmark
skips that check for it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T

from benchmarks_doc import append_entry  # scripts/benchmarks_doc.py, beside this script
from skipstudy.data.cifar import CIFAR10DataModule
from skipstudy.data.tiny_imagenet import TinyImageNetDataModule

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SECTION = "## Data pipeline"


class PILFiles(Dataset):
    """The replaced pipeline: open, decode, augment and resize each JPEG with PIL every epoch."""

    def __init__(self, files, labels, size, mean, std):
        self.files, self.labels = files, labels
        self.transform = T.Compose([T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(), T.Resize(size),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def throughput(loader, seconds: float, device: torch.device, windows: int = 3) -> tuple[float, int]:
    """Best images/s over ``windows`` timed windows filling ``seconds``; the first batch (worker
    start-up, first upload) is not timed. Epochs restart as needed. The best window is reported
    because other work on a shared machine only ever slows a window down."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = iter(loader)
    next(it)
    best, total = 0.0, 0
    for _ in range(windows):
        sync()
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / windows:
            try:
                x, _ = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            images += len(x)
        sync()
        best = max(best, images / (time.perf_counter() - start))
        total += images
    return best, total


def tile(images: np.ndarray, labels: np.ndarray, n: int):
    reps = -(-n // len(labels))
    return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]


def device_info() -> tuple[str, bool]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    threads = torch.get_num_threads()
    text = f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
        return text, True
    return text + "; no GPU", False


def versions() -> str:
    names = ["torch", "torchvision", "numpy", "pillow", "lightning"]
    return ", ".join([f"python {platform.python_version()}"] + [f"{n} {metadata.version(n)}" for n in names])


def run(args) -> list[dict]:
    rows = []
    has_gpu = torch.cuda.is_available()
    cache = tempfile.TemporaryDirectory(prefix="bench_data_")
    with mock.patch.object(datasets.CIFAR10, "_check_integrity", return_value=True):
        cifar = CIFAR10DataModule(root=str(SHARED / "cifar10-mini"), download=False, batch_size=args.batch_size,
                                  num_workers=args.workers, device="cpu")
        cifar.setup("fit")
    tiny = TinyImageNetDataModule(root=str(SHARED / "tiny-imagenet-mini"), cache_dir=cache.name,
                                  batch_size=args.batch_size, num_workers=args.workers, device="cpu")
    start = time.perf_counter()
    tiny.prepare_data()
    decode_s = time.perf_counter() - start
    n_jpegs = sum(tiny.meta["splits"].values())
    tiny.setup("fit")
    print(f"Tiny ImageNet mini: decoded {n_jpegs} JPEGs once in {decode_s:.2f} s ({n_jpegs / decode_s:.0f} images/s)")
    for name, dm in (("CIFAR-10", cifar), ("Tiny ImageNet", tiny)):
        images, labels = tile(*dm.splits["train"], args.images)
        for size in args.sizes:
            dm.image_size = size
            paths = [("torch", "cpu"), ("device", "cpu"), ("device", "cuda")]
            if dm is tiny:
                paths.insert(0, ("pil", "cpu"))
            for kind, dev in paths:
                row = dict(data=name, size=size, path=kind, device=dev, workers="-", batch=args.batch_size)
                if dev == "cuda" and not has_gpu:
                    rows.append(dict(row, rate=None, images=0))
                    continue
                dm.device = torch.device(dev)
                if kind == "pil":
                    files = tiny._train_source()
                    reps = -(-args.images // len(files.files))
                    dataset = PILFiles((files.files * reps)[: args.images], np.tile(files.labels, reps), size,
                                       dm.mean, dm.std)
                    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                        num_workers=args.workers, drop_last=True)
                else:
                    loader = dm.make_loader("train", train=True, kind=kind, images=images, labels=labels)
                if kind != "device":
                    row["workers"] = args.workers
                rate, seen = throughput(loader, args.seconds, torch.device(dev))
                del loader
                rows.append(dict(row, rate=rate, images=seen))
                print(f"{name:14s} {size:4d} px  {kind:6s} {dev:4s}  {rate:9.0f} images/s  ({seen} images)", flush=True)
    cache.cleanup()
    return rows, decode_s, n_jpegs


def table(rows) -> str:
    lines = ["| data set | px | path | device | workers | batch | images/s |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        rate = f"{r['rate']:,.0f}" if r["rate"] is not None else "not measured (no GPU here)"
        lines.append(f"| {r['data']} | {r['size']} | {r['path']} | {r['device']} | {r['workers']} | {r['batch']} | {rate} |")
    return "\n".join(lines)


INTRO = ("Input pipeline alone (no model), `scripts/bench_data.py`. `torch`: DataLoader "
         "workers, per-image torchvision v2 ops on uint8 tensors from the decoded cache. `device`: "
         "whole uint8 set on the device, batched gather crop/flip + resize + normalise there. "
         "`pil`: the replaced pipeline, PIL decode + resize per JPEG per epoch.")


def append(doc: Path, entry: str) -> None:
    """Append ``entry`` at the end of the Data pipeline section, creating it if needed."""
    append_entry(doc, SECTION, entry, INTRO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--images", type=int, default=10_000, help="training images per data set (mini copy tiled)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per row")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = "python scripts/bench_data.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows, decode_s, n_jpegs = run(args)
    load_after = os.getloadavg()[0]
    device, _ = device_info()
    result = table(rows)
    print("\n" + result)
    entry = (f"### {datetime.date.today().isoformat()}: {device}\n\n"
             f"Command: `{command.strip()}` ({time.perf_counter() - started:.0f} s)  \n"
             f"Versions: {versions()}  \n"
             f"Load average (1 min) before/after: {load_before:.2f}/{load_after:.2f} (other work shares this machine)  \n"
             f"Training split, augmentation on, mini copies tiled to {args.images} images; best of 3 windows "
             f"over {args.seconds:g} s per row after the first batch. One-time decode of the Tiny ImageNet mini copy into "
             f"the cache: {n_jpegs} JPEGs in {decode_s:.2f} s ({n_jpegs / decode_s:.0f} images/s).\n\n"
             f"{result}\n")
    if not args.no_write:
        append(args.doc, entry)
        print(f"\nappended to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
