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

Dispatched ops are split by where they run: on the step's device (on a GPU each one a kernel
launch) and on CPU tensors (host work; the quantities are numpy on the transferred values, so
none is expected). With ``--device meta`` all of them together are judged against the budget
of the issue: at most 6 a tracked layer plus 12 a residual block.

    python scripts/count_monitor_ops.py --model resnet50 --batch-size 2 --image-size 32
    python scripts/count_monitor_ops.py --model resnet50 --batch-size 2 --image-size 32 --device meta
    python scripts/count_monitor_ops.py --model resnet56 --device meta   # CIFAR ResNet-56
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
    """Ops by name; ``on_host`` those whose tensors are all CPU ones while the step runs elsewhere."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.ops: Counter[str] = Counter()
        self.on_host: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor)}
        self.ops[str(func.overloadpacket)] += 1
        if self.device != "cpu" and devices <= {"cpu"}:
            self.on_host[str(func.overloadpacket)] += 1
        return out


def step(net, x, y, taps: LayerTaps | None) -> None:
    net.zero_grad(set_to_none=True)
    if taps is None:
        F.cross_entropy(net(x), y).backward()
        return
    with taps.record(step=0):
        F.cross_entropy(net(x), y).backward()


def measure(net, x, y, taps: LayerTaps | None, device: str) -> tuple[Count, int]:
    step(net, x, y, taps)  # warm-up: one-off work (first-call ordering, the weight sizes' copy)
    with Count(device) as mode:
        step(net, x, y, taps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(net, x, y, taps)
    profiled = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return mode, profiled


def build(name: str, device: str):
    if not hasattr(models, name) and name.startswith("resnet") and name[6:].isdigit():  # resnet20, 56, 110: CIFAR
        return models.cifar_resnet(10, depth=int(name[6:])).train().to(device)
    return getattr(models, name)(1000 if name.startswith("resnet") else 10).train().to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a skipstudy.models builder, or resnet<6n+2> for a CIFAR ResNet")
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
    net = build(args.model, args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    if args.device == "meta":  # a meta tensor has no values to copy out
        taps_module._to_host = lambda t: (np.zeros(t.shape), None)
    if args.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    base_mode, base_prof = measure(net, x, y, None, args.device)
    base = base_mode.ops
    print(f"plain step: {sum(base.values())} dispatched ops, {base_prof} profiler aten events")
    ok = True
    real = getattr(sums, "_fast_path", None)  # None: code from before it existed
    for path in ("cpu", "accelerator") if args.device == "cpu" else ("meta",):
        if path == "accelerator":
            if real is None:
                print("accelerator path: no sums._fast_path in this checkout; use --device meta")
                continue
            sums._fast_path = lambda t: True
        taps = LayerTaps(net, activations=not args.no_activations, blocks=not args.no_blocks)
        try:
            mode, prof = measure(net, x, y, taps, args.device)
            ops = mode.ops
        finally:
            taps.remove()
            if real is not None:
                sums._fast_path = real
        extra = ops - base
        units = len(taps.layer_names), len(taps.block_names)
        print(f"{path:11s} path: monitor adds {sum(ops.values()) - sum(base.values())} dispatched ops, "
              f"{prof - base_prof} profiler aten events per step ({units[0]} layers, {units[1]} blocks)")
        print("   top: " + ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in extra.most_common(args.top)))
        if args.device == "meta":
            host = sum(mode.on_host.values())
            on_device = sum(extra.values()) - host
            budget, total = 6 * units[0] + 12 * units[1], on_device + host
            ok &= total <= budget
            print(f"   on the device: {on_device} ops; on CPU tensors (host work): {host} ops")
            print(f"   in all: {total} ops ({total / (units[0] + units[1]):.1f} per unit); budget 6 a layer "
                  f"+ 12 a block = {budget}: {'met' if total <= budget else 'MISSED'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
