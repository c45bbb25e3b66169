"""What every probe receives, and the plumbing probes share. The app and the training callback
build the same :class:`ProbeContext`, so a probe cannot tell which one runs it. Probes leave the
network as they found it: during training it is the one being trained, hooks on it, so a copy is
no option."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.contract import read_blocks, require_declared
from skipstudy.monitor.writers import figure_rgb
from skipstudy.probes.comparison import label

Batches = list[tuple[torch.Tensor, torch.Tensor]]
STAGE_NAME = re.compile(r"(layer|block|stage)\d+")
# torch's public batch-norm classes (their common base is private); SyncBatchNorm is what DDP converts to.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class ProbeContext:
    """``model``: the run's model config, recorded so that reports group by depth and skip;
    ``batches``: how many batches a probe reads by default (None: the whole split)."""

    net: nn.Module
    datamodule: Any
    run_dir: Path
    step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    writer: Any = None
    trained: bool = True
    model: dict = field(default_factory=dict)
    seed: int = 0
    batches: int | None = 4

    def fixed_batches(self, split: str, batches: int | None = None) -> Batches:
        """The same batches on every call: validation is unshuffled, training data is read in stored
        order without augmentation where the data module can, else under a seeded, forked RNG (the
        training's own random stream stays untouched)."""
        dm = self.datamodule
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if split == "val":
                loader = dm.val_dataloader()
            elif hasattr(dm, "make_loader"):
                loader = dm.make_loader("train", train=False)
            else:
                loader = dm.train_dataloader()
            n = self.batches if batches is None else batches
            return [(x.to(self.device), y.to(self.device)) for x, y in itertools.islice(loader, n)]

    def val_images(self, count: int, key: str) -> torch.Tensor:
        """The first ``count`` validation images, reading only the batches they are in."""
        images = torch.cat([x for x, _ in self.fixed_batches("val", -(-count // self.datamodule.batch_size))])
        if len(images) < count:
            raise ConfigError(f"{key}: the validation split has only {len(images)} images")
        return images[:count]

    def publish(self, options: Any, record: dict, summary: dict[str, float],
                plot: Callable[[str], Figure] | dict[str, Callable[[str], Figure]],
                scalars: dict[str, float] | None = None) -> Path:
        """Probe ``options.name``'s outputs, ``<run>/probes/<name>/<name>_step<N>`` (returned) with a
        suffix each: ``.json`` (the options, ``record``, and ``summary`` where the report's probe table
        reads it), the figure ``plot(title)`` as ``.png`` (a dict ``{part: plot}``: ``_<part>.png``,
        tagged ``probe/<name>/<part>``), and ``summary`` plus ``scalars`` as ``probe/<name>/<key>``."""
        name = options.name
        out = Path(self.run_dir) / "probes" / name
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{name}_step{self.step}"
        record = {"step": self.step, "trained": self.trained, "model": self.model,
                  "arch": getattr(self.net, "arch", type(self.net).__name__), "depth": depth_of(self.net),
                  **OmegaConf.to_container(options, resolve=True), **record,
                  "summary": {k: float(v) for k, v in summary.items()}}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
        title = f"{label(record, with_depth=True)}, step {self.step}"
        for part, draw in (plot.items() if isinstance(plot, dict) else [("", plot)]):
            fig = draw(title)
            FigureCanvasAgg(fig)  # no pyplot: the training process keeps no global figure state
            fig.savefig(out / f"{stem.name}_{part}.png" if part else stem.with_suffix(".png"), dpi=fig.dpi)
            if self.writer is not None:
                self.writer.add_image(f"probe/{name}/{part}".rstrip("/"), figure_rgb(fig), self.step, dataformats="HWC")
        if self.writer is not None:
            for key, value in (summary | (scalars or {})).items():
                self.writer.add_scalar(f"probe/{name}/{key}", float(value), self.step)
        return stem


def panels(width: float, height: float, *grid: int, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes (``Figure.subplots(*grid)``); a plot ends with :func:`titled`."""
    fig = Figure(figsize=(width, height), dpi=90)
    return fig, fig.subplots(*grid, **kwargs)


def titled(fig: Figure, title: str) -> Figure:
    """``title`` over the figure, and every panel's own title small enough to fit beside the others."""
    for ax in fig.axes:
        ax.title.set_fontsize(9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def depth_of(net: nn.Module) -> int:
    """Convs and linears that are not shortcut projections: the paper depths (cifar_resnet56 -> 56,
    resnet50 -> 50), the same for a network and its plain twin, so both share a depth axis."""
    return sum(1 for name, m in net.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split("."))


# -- parts of the network ---------------------------------------------------------------------

def stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Found by name, so every network of skipstudy.models works without a registry: the stem
    (ResNets' ``maxpool`` slot), then the children ``layer1``.. or ``block1``.., in forward order."""
    children = dict(net.named_children())
    found = [("stem", children["maxpool"])] if "conv1" in children and "maxpool" in children else []
    return found + [(name, m) for name, m in children.items() if STAGE_NAME.fullmatch(name)]


def require_stages(net: nn.Module, probe: str) -> None:
    if not stages(net):
        raise ConfigError(f"probe={probe} finds no stages in {getattr(net, 'arch', type(net).__name__)}: it looks "
                          "for children named layer1.. or block1..; use a model from skipstudy.models")


def residual_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The declared blocks (``models/contract.py``) with a shortcut, in forward order (names
    relative to ``net``): skipstudy's, torchvision's and timm's, and any declaring itself."""
    return [(name, m) for name, m, contract in read_blocks(net)[0] if contract.has_shortcut]


def require_skips(net: nn.Module, probe: str, why: str) -> None:
    require_declared(net, probe)  # first: an undeclared block is named as such, not as "no blocks"
    arch = getattr(net, "arch", type(net).__name__)
    if not read_blocks(net)[0]:
        raise ConfigError(f"probe={probe} needs a network of residual blocks; {arch} has none "
                          "(use a model from skipstudy.models, or declare its blocks: skipstudy.models.contract)")
    if not residual_blocks(net):
        raise ConfigError(f"probe={probe} needs skip connections, but this {arch} is a plain twin "
                          f"(model.skip=false): {why}; probe a model.skip=true run")


# -- modes and batch norm ---------------------------------------------------------------------

def cross_entropy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Half-precision logits are upcast; float64 stays float64 (the tests' references)."""
    logits = net(x)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction=reduction)


@contextlib.contextmanager
def kept_state(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside; afterwards every train/eval flag, BN buffer and momentum as before."""
    modes = [(m, m.training) for m in net.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
             for m in net.modules() if isinstance(m, BATCH_NORMS)]
    net.eval()
    try:
        yield net
    finally:
        with torch.no_grad():
            for m, momentum, buffers in saved:
                m.momentum = momentum
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def calibrated_bn(net: nn.Module, inputs: torch.Tensor, chunk: int = 64) -> Iterator[nn.Module]:
    """Eval mode with BN running statistics averaged over ``inputs``, all restored afterwards."""
    with kept_state(net):
        for m in net.modules():
            if isinstance(m, BATCH_NORMS):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the chunks
        net.train()
        with torch.no_grad():
            for part in inputs.split(chunk):
                net(part)
        net.eval()
        yield net


@contextlib.contextmanager
def loss_mode(net: nn.Module, bn: str) -> Iterator[nn.Module]:
    """The network as the training loss sees it: batch statistics (``train``, the optimiser's view)
    or running statistics (``eval``); modes and BN buffers restored afterwards."""
    with kept_state(net):
        net.train(bn == "train")
        yield net


def bn_mode(ctx: ProbeContext, options: Any, inputs: torch.Tensor | None = None, chunk: int = 64
            ) -> tuple[str, contextlib.AbstractContextManager]:
    """``(probe.bn, context)``. Probes of the training loss choose ``train`` or ``eval``; those that
    need every sample's own gradient ``eval``, ``calibrate`` or ``auto``: at initialisation the
    running statistics are still 0/1 (BN an identity), so they are calibrated on ``inputs`` first,
    and a trained network uses its own."""
    bn = options.bn
    if bn == "auto":
        has_bn = any(isinstance(m, BATCH_NORMS) for m in ctx.net.modules())
        bn = "calibrate" if has_bn and not ctx.trained else "eval"
    # A train-mode SyncBatchNorm pass on rank 0 alone (where probes run) would wait for the others forever.
    if bn != "eval" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            and any(isinstance(m, nn.SyncBatchNorm) for m in ctx.net.modules()):
        bn = "eval"
    return bn, (calibrated_bn(ctx.net, inputs, chunk) if bn == "calibrate" else loss_mode(ctx.net, bn))
