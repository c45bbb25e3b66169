"""Fast settings: the speed switches, their ``auto`` values, and what a run records of them.

One key per setting, kept where its consumer reads it:

==========================  =====================================================  ==============
key                         ``auto`` / ``null`` means                              changes numbers
==========================  =====================================================  ==============
``trainer.precision``       ``null``: ``bf16-mixed`` on a CUDA GPU with bf16,       yes
                            ``32-true`` elsewhere (Lightning's own key)
``trainer.benchmark``       ``null``: ``cudnn.benchmark`` on when training on       last bits only
                            CUDA, unless ``trainer.deterministic`` (Lightning's)
``fast.channels_last``      ``auto``: on when training on CUDA or on an x86        last bits only
                            CPU with oneDNN
``fast.compile``            ``false`` by default; ``true`` compiles the network     last bits only
                            with ``torch.compile`` (the gradient monitor's hooks
                            become graph breaks: skipstudy.monitor.callback)
``dataset.loader``          ``auto``: device-resident batches on CUDA when the      no (same
                            data fit (``skipstudy.data.arrays``)                     images)
==========================  =====================================================  ==============

``auto`` turns a setting on only where it is known to be safe and faster: on a CUDA GPU, and
for the memory layout also on x86 CPUs, where oneDNN's NHWC convolutions make a training step
faster on our networks (``scripts/bench_layout.py``, "Memory layout" in ``docs/benchmarks.md``).
Precision stays fp32 on the CPU. The resolved values (not
``auto``) go into ``run_info.json`` (``"resolved"``) and the TensorBoard HParams, together
with the settings that change what a run computes (precision, effective batch size), so a
comparison of runs never mixes them silently.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig


def uses_cuda(accelerator: Any) -> bool:
    """Whether a Trainer built with ``trainer.accelerator=accelerator`` trains on a CUDA GPU."""
    if not torch.cuda.is_available():
        return False
    return str(accelerator).lower() in ("auto", "gpu", "cuda")


def resolve_precision(precision: Any, accelerator: Any = "auto") -> str:
    """``trainer.precision=null`` means bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere."""
    if precision is not None:
        return str(precision)
    if uses_cuda(accelerator) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _auto_bool(value: Any, auto: bool) -> bool:
    return auto if value == "auto" else bool(value)


def channels_last_helps(on_cuda: bool) -> bool:
    """What ``fast.channels_last=auto`` resolves to.

    On CUDA, cuDNN's NHWC kernels (tensor cores) are the fast path. On x86 CPUs oneDNN runs
    convolutions in a blocked/NHWC layout internally, so contiguous (NCHW) tensors pay a
    reorder on every conv, forward and backward; feeding NHWC skips it. Measured per training
    step by ``scripts/bench_layout.py`` ("Memory layout" in ``docs/benchmarks.md``). Elsewhere
    (ARM, no oneDNN) it stays off: unmeasured.
    """
    if on_cuda:
        return True
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class FastSettings:
    """The resolved speed settings of one run (no ``auto`` left).

    Attributes:
        precision: Lightning precision string (``32-true``, ``bf16-mixed``, ...).
        cudnn_benchmark: value for ``torch.backends.cudnn.benchmark`` (``trainer.benchmark``).
        channels_last: network and inputs in the channels_last memory format.
        compile: network compiled with ``torch.compile``.
        on_cuda: the run trains on a CUDA GPU.
    """

    precision: str
    cudnn_benchmark: bool
    channels_last: bool
    compile: bool
    on_cuda: bool


def resolve(cfg: DictConfig) -> FastSettings:
    """Decide every ``auto``/``null`` speed setting of ``cfg`` (checked by skipstudy/config.py)
    for the device it trains on."""
    trainer = cfg.trainer
    fast = cfg.get("fast") or {}
    on_cuda = uses_cuda(trainer.get("accelerator", "auto"))
    benchmark = trainer.get("benchmark")
    if benchmark is None:
        # cudnn.benchmark picks the fastest conv algorithm per shape (timed once per shape);
        # its choice may differ between runs, so a deterministic run keeps it off.
        benchmark = on_cuda and not trainer.get("deterministic", False)
    compile_ = fast.get("compile", False)
    return FastSettings(
        precision=resolve_precision(trainer.get("precision"), trainer.get("accelerator", "auto")),
        cudnn_benchmark=bool(benchmark),
        channels_last=_auto_bool(fast.get("channels_last", "auto"), channels_last_helps(on_cuda)),
        compile=compile_,
        on_cuda=on_cuda,
    )


def effective_batch_size(cfg: DictConfig) -> int | None:
    """Samples per optimizer step: batch size x gradient accumulation x devices x nodes.

    None when it cannot be told from the config (no ``dataset.batch_size``, or
    ``trainer.devices`` given as ``auto`` or a string).
    """
    batch = cfg.dataset.get("batch_size")
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple, ListConfig)):
        per_node = len(devices)
    else:
        return None
    if batch is None:
        return None
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    return int(batch) * int(accumulate) * per_node * int(cfg.trainer.get("num_nodes") or 1)


def record(settings: FastSettings, cfg: DictConfig) -> dict[str, Any]:
    """The resolved values for ``run_info.json`` and HParams, under the keys a user would set."""
    out: dict[str, Any] = {
        "trainer.precision": settings.precision,
        "trainer.benchmark": settings.cudnn_benchmark,
        "fast.channels_last": settings.channels_last,
        "fast.compile": settings.compile,
        "effective_batch_size": effective_batch_size(cfg),
        # fp32 matmuls/convs may run in TF32 on Ampere+ GPUs: part of what "32-true" means there.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32) if settings.on_cuda else None,
    }
    return out

