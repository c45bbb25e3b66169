"""Fast settings: what their ``auto``/``null`` resolves to on the device a run trains on (the
switches are described in conf/train.yaml), and what a run records of them: the values that
change what it computes (precision, effective batch size) go into ``run_info.json`` and the
HParams, so a comparison never mixes them silently.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig


def channels_last_helps(on_cuda: bool) -> bool:
    """On CUDA, cuDNN's NHWC kernels are the fast path. On x86 CPUs oneDNN runs convolutions in
    a blocked/NHWC layout, so NCHW tensors pay a reorder per conv, forward and backward
    (``scripts/bench_layout.py``, "Memory layout" in ``docs/benchmarks.md``). Elsewhere unmeasured: off."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return on_cuda or (x86 and torch.backends.mkldnn.is_available())


@dataclass(frozen=True)
class FastSettings:
    precision: str
    cudnn_benchmark: bool
    channels_last: bool
    compile: bool
    on_cuda: bool


def resolve(cfg: DictConfig) -> FastSettings:
    trainer, fast = cfg.trainer, cfg.get("fast") or {}
    on_cuda = torch.cuda.is_available() and str(trainer.get("accelerator", "auto")).lower() in ("auto", "gpu", "cuda")
    precision = trainer.get("precision") or ("bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true")
    benchmark = trainer.get("benchmark")
    if benchmark is None:  # its algorithm choice may differ between runs: never when deterministic
        benchmark = on_cuda and not trainer.get("deterministic", False)
    channels_last = fast.get("channels_last", "auto")
    return FastSettings(precision=str(precision), cudnn_benchmark=bool(benchmark),
                        channels_last=channels_last_helps(on_cuda) if channels_last == "auto" else bool(channels_last),
                        compile=fast.get("compile", False), on_cuda=on_cuda)


def effective_batch_size(cfg: DictConfig) -> int | None:
    """Samples per optimizer step (batch x accumulation x devices x nodes); None when the config
    does not tell (``trainer.devices=auto``)."""
    batch, devices = cfg.dataset.get("batch_size"), cfg.trainer.get("devices", 1)
    if isinstance(devices, ListConfig):
        devices = len(devices)
    if batch is None or not isinstance(devices, int) or devices <= 0:  # auto, "0,1", or -1: all of them
        return None
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    return int(batch) * int(accumulate) * devices * int(cfg.trainer.get("num_nodes") or 1)


def record(settings: FastSettings, cfg: DictConfig) -> dict[str, Any]:
    """The resolved values for ``run_info.json`` and HParams, under the keys a user would set."""
    return {
        "trainer.precision": settings.precision,
        "trainer.benchmark": settings.cudnn_benchmark,
        "fast.channels_last": settings.channels_last,
        "fast.compile": settings.compile,
        "effective_batch_size": effective_batch_size(cfg),
        # fp32 matmuls/convs may run in TF32 on Ampere+ GPUs: part of what "32-true" means there.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32) if settings.on_cuda else None,
    }
