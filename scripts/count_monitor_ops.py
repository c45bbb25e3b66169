"""ATen ops the gradient monitor issues per recorded training step: a proxy for its host
overhead on an accelerator, where a small op costs a kernel launch plus dispatcher and
Python time whatever its size, measured without one.

One training step (forward, backward) of the network on a tiny batch is run plain and inside
``LayerTaps.record`` (hooks + ``collect``, the one host transfer included), and the ops are
counted two ways: those reaching the Python dispatch mode (what Python code calls below
autograd, a view included) and the profiler's ``aten::`` events (nested calls included).
The monitor's ops are the difference. On the CPU, ``cpu`` is the path a CPU run takes and
``accelerator`` forces ``skipstudy.monitor.sums``'s accelerator path (``_fast_path``) on the
CPU tensors. ``--device meta`` runs the step on meta tensors (shapes, no data): every
``device.type != "cpu"`` branch is taken as on a GPU, with no forcing, so code without
``_fast_path`` (an older checkout on PYTHONPATH) is counted too; the one host transfer is
replaced by zeros there. Counts, not times: nothing here says how long the ops take on a GPU.

    python scripts/count_monitor_ops.py --model resnet50 --batch-size 2 --image-size 32
    python scripts/count_monitor_ops.py --model resnet50 --batch-size 2 --image-size 32 --device meta
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from skipstudy import models
from skipstudy.monitor import sums, taps as taps_module
from skipstudy.monitor.taps import LayerTaps


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step(net, x, y, taps: LayerTaps | None) -> None:
    net.zero_grad(set_to_none=True)
    if taps is None:
        F.cross_entropy(net(x), y).backward()
        return
    with taps.record(step=0):
        F.cross_entropy(net(x), y).backward()


def measure(net, x, y, taps: LayerTaps | None) -> tuple[Counter, int]:
    step(net, x, y, taps)  # warm-up: one-off work (first-call ordering, the weight sizes' copy)
    with Count() as mode:
        step(net, x, y, taps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(net, x, y, taps)
    profiled = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return mode.ops, profiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a skipstudy.models builder")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "meta"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-activations", action="store_true")
    p.add_argument("--no-blocks", action="store_true")
    p.add_argument("--top", type=int, default=12, help="most frequent dispatched ops listed per path")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = getattr(models, args.model)(1000 if args.model.startswith("resnet") else 10).train().to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    if args.device == "meta":  # a meta tensor has no values to copy out
        taps_module._to_host = lambda t: (np.zeros(t.shape), None)
    if args.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    base, base_prof = measure(net, x, y, None)
    print(f"plain step: {sum(base.values())} dispatched ops, {base_prof} profiler aten events")
    real = getattr(sums, "_fast_path", None)  # None: code from before it existed
    for path in ("cpu", "accelerator") if args.device == "cpu" else ("meta",):
        if path == "accelerator":
            if real is None:
                print("accelerator path: no sums._fast_path in this checkout; use --device meta")
                continue
            sums._fast_path = lambda t: True
        taps = LayerTaps(net, activations=not args.no_activations, blocks=not args.no_blocks)
        try:
            ops, prof = measure(net, x, y, taps)
        finally:
            taps.remove()
            if real is not None:
                sums._fast_path = real
        extra = ops - base
        units = len(taps.layer_names), len(taps.block_names)
        print(f"{path:11s} path: monitor adds {sum(ops.values()) - sum(base.values())} dispatched ops, "
              f"{prof - base_prof} profiler aten events per step ({units[0]} layers, {units[1]} blocks)")
        print("   top: " + ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in extra.most_common(args.top)))


if __name__ == "__main__":
    main()
