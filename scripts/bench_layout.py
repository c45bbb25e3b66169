"""Memory layout on the CPU: one SGD training step in channels_last against contiguous (NCHW).

What ``fast.channels_last=auto`` rests on for x86 CPUs (``skipstudy.runs.fast.channels_last_helps``).
Per network, both layouts get the same initial weights and the same batch in one process; the
two alternate in 3 rounds (order flipped each round) so load from other work hits both alike.
The table shows the median step time of each layout and their ratio. Without --no-write the
entry is appended to the "Memory layout" section of docs/benchmarks.md.

    python scripts/bench_layout.py                 # 1 and 2 torch threads
    python scripts/bench_layout.py --threads 2 --no-write
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks_doc import append_entry  # scripts/benchmarks_doc.py, beside this script
from skipstudy.models import cifar_resnet, mini, resnet50

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Memory layout"
INTRO = ("One SGD training step (forward, cross-entropy, backward, step) of each network in channels_last "
         "against contiguous (NCHW) on the CPU, same weights and batch, alternating in one process: "
         "`scripts/bench_layout.py`. Speed-up = median contiguous step / median channels_last step.")

# name -> (builder, batch, px, timed steps per round)
CASES = {
    "CIFAR ResNet-20": (lambda: cifar_resnet(10, depth=20), 128, 32, 8),
    "CIFAR ResNet-20, no BN": (lambda: cifar_resnet(10, depth=20, norm="none"), 128, 32, 8),
    "mini plain net": (lambda: mini(10, skip=False), 128, 32, 8),
    "ResNet-50": (lambda: resnet50(10), 16, 64, 8),
    "ResNet-50, no BN": (lambda: resnet50(10, norm="none"), 16, 224, 3),
}
ROUNDS = 3


def step_times(make, batch: int, px: int, steps: int) -> dict[bool, list[float]]:
    torch.manual_seed(0)
    net0 = make()
    runs = {}
    for channels_last in (False, True):
        net = copy.deepcopy(net0)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        runs[channels_last] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, px, px, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(ROUNDS):
        for channels_last in ((False, True) if r % 2 == 0 else (True, False)):
            net, opt = runs[channels_last]
            xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            for i in range(steps + 1):  # the first step of each round is a warm-up
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(xx), y).backward()
                opt.step()
                if i:
                    times[channels_last].append(time.perf_counter() - t)
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    lines = ["| network | batch | px | torch threads | contiguous ms/step | channels_last ms/step | speed-up | steps each |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.cases:
            make, batch, px, steps = CASES[name]
            times = step_times(make, batch, px, steps)
            a, c = statistics.median(times[False]), statistics.median(times[True])
            lines.append(f"| {name} | {batch} | {px} | {threads} | {a * 1e3:.1f} | {c * 1e3:.1f} | {a / c:.2f}x "
                         f"| {len(times[True])} |")
            print(lines[-1], flush=True)
    command = "python " + shlex.join(["scripts/bench_layout.py", *(sys.argv[1:] if argv is None else argv)])
    entry = "\n".join([
        f"### {dt.date.today().isoformat()}: CPU {cpu_name()}, {os.cpu_count()} cores",
        "",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s)  ",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"oneDNN available: {torch.backends.mkldnn.is_available()}  ",
        f"Load average (1 min) before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} (other work shares this machine)",
        "",
        *lines,
    ])
    if not args.no_write:
        append_entry(args.doc, SECTION, entry, INTRO)
        print(f"appended to the '{SECTION}' section of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
