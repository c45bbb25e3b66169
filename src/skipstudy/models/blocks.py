"""Residual blocks with a removable shortcut, named as in torchvision's ``models/resnet.py`` (so its
state dicts load with ``strict=True``). The plain twin is ``skip=False``: no addition and no
projection parameters (a parameter that never gets a gradient would look like a "vanished" layer
and breaks DDP). Modules are defined in forward order: the monitor and the report read
``named_modules()`` as the data flow. Every block declares its structure in
:meth:`Block.block_contract` (``models/contract.py``); new block types: docs/architecture.md."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
# No bias in either: the norm layer or Fixup's scalar bias follows.
from torchvision.models.resnet import conv1x1, conv3x3

from skipstudy.models.contract import BlockContract

NormLayer = Callable[[int], nn.Module]

# norm=none keeps a parameter-free slot (nn.Identity ignores its argument), so names stay torchvision's.
NORMS: dict[str, NormLayer] = {"batch": nn.BatchNorm2d, "none": nn.Identity}


def _shift(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add a Fixup scalar bias if there is one."""
    return x if bias is None else x + bias


def identity_shortcut(x: torch.Tensor) -> torch.Tensor:
    """What :attr:`Block.shortcut` is for an identity shortcut (a function, not a module)."""
    return x


class ZeroPadShortcut(nn.Module):
    """He et al. 2016 option A: stride-``s`` subsampling and zero-padded new channels; parameter-free,
    which is why the CIFAR ResNets of Table 6 have 0.27M parameters at depth 20."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra_channels))


def make_shortcut(in_planes: int, out_planes: int, stride: int, kind: str, norm_layer: NormLayer) -> nn.Module | None:
    """The ``downsample`` of a block: None (identity) where shapes agree, else option A or B."""
    if stride == 1 and in_planes == out_planes:
        return None
    if kind == "A":
        return ZeroPadShortcut(in_planes, out_planes, stride)
    norm = norm_layer(out_planes)
    # norm=none: no placeholder, so the projection's keys stay downsample.0.*
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), *([] if isinstance(norm, nn.Identity) else [norm]))


def _redefines_forward(cls: type) -> bool:
    """A subclass that overrides ``forward`` below the class declaring ``block_contract``: its
    declaration may no longer be true, so it declares nothing (the monitor names it)."""
    owner = {attr: next(c for c in cls.__mro__ if attr in vars(c)) for attr in ("forward", "block_contract")}
    return owner["forward"] is not owner["block_contract"] and issubclass(owner["forward"], owner["block_contract"])


class Block(nn.Module):
    """``relu(branch(x) + shortcut(x))``, the branch being conv-norm pairs with ReLUs between.

    The Fixup scalar biases (``bias<i>a`` before conv ``i``, ``bias<i>b`` after its norm) and
    the branch scale (SkipInit, Fixup) are empty parameter slots until an init scheme fills
    them, so the default block has exactly torchvision's parameters.

    A subclass whose ``forward`` computes something else overrides :meth:`block_contract`,
    :meth:`shortcut_term` and :meth:`without_branch` with it (see ``preact.py``).
    """

    expansion = 1
    # Whether a projection shortcut carries its own norm (He et al. 2016: conv + BN); a
    # pre-activation block's shortcut reads a normalised tensor already.
    shortcut_norm = True

    def __init__(self, convs: list[nn.Conv2d], norm_layer: NormLayer, downsample: nn.Module | None,
                 stride: int, skip: bool) -> None:
        super().__init__()
        for i, conv in enumerate(convs, start=1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", norm_layer(conv.out_channels))
            if i == 1:  # defined at its first use, for the forward order of named_modules()
                self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride, self.skip, self.depth = stride, skip, len(convs)
        self.register_parameter("scale", None)
        for name in self.fixup_bias_names:
            self.register_parameter(name, None)

    @property
    def fixup_bias_names(self) -> list[str]:
        return [f"bias{i}{ab}" for i in range(1, self.depth + 1) for ab in "ab"]

    def branch_convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, self.depth + 1)]

    def branch_norms(self) -> list[nn.Module]:
        return [getattr(self, f"bn{i}") for i in range(1, self.depth + 1)]

    @property
    def shortcut(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """None in the plain twin, :func:`identity_shortcut`, or the ``downsample`` module."""
        if not self.skip:
            return None
        return identity_shortcut if self.downsample is None else self.downsample

    def extra_repr(self) -> str:
        return "" if self.skip else "skip=False"

    @property
    def shortcut_kind(self) -> str:
        return "none" if not self.skip else "identity" if self.downsample is None else "projection"

    def branch_exit(self) -> nn.Module:
        """The module whose output is the branch's last tensor, before SkipInit's or Fixup's
        scalars: the last norm, or without one (``norm=none``) the last conv."""
        norm = self.branch_norms()[-1]
        return self.branch_convs()[-1] if isinstance(norm, nn.Identity) else norm

    def block_contract(self) -> BlockContract | None:
        """This block's structure (``models/contract.py``): the branch from ``conv1`` to
        :meth:`branch_exit`, the shortcut on the block input, a ReLU after the addition."""
        if _redefines_forward(type(self)):
            return None
        return BlockContract(self.conv1, self.branch_exit(), self.shortcut_kind,
                             self.downsample if self.skip else None, shared=False, after="relu")

    def without_branch(self, x: torch.Tensor) -> torch.Tensor:
        """What the block computes with its branch deleted (the lesion probe): ``relu`` of the
        shortcut term, the ReLU after the addition being outside the branch. Not in place:
        with an identity shortcut it would overwrite ``x``."""
        return torch.relu(self.shortcut_term(x))

    def shortcut_term(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut's part of the output. A downsampling shortcut sees what the first conv sees,
        ``x + bias1a`` under Fixup, as Zhang et al. 2019's reference code does; the lesion and paths
        probes call this too, so a deleted branch leaves exactly this path."""
        return x if self.downsample is None else self.downsample(_shift(x, self.bias1a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.branch_convs(), self.branch_norms()), start=1):
            out = norm(conv(_shift(out, getattr(self, f"bias{i}a"))))
            if i < self.depth:
                out = self.relu(_shift(out, getattr(self, f"bias{i}b")))
        if self.scale is not None:
            out = out * self.scale
        out = _shift(out, getattr(self, f"bias{self.depth}b"))
        if self.skip:
            out = out + self.shortcut_term(x)
        return self.relu(out)

    @torch.no_grad()
    def zero_init_last(self) -> None:
        """Zero the branch output (Goyal et al. 2017): the weight of the branch's exit module,
        the last norm's, or without one (``norm=none``) the last conv's, the same function at init."""
        self.branch_exit().weight.zero_()

    def add_branch_scale(self, value: float) -> None:
        """A learnable scalar multiplying the branch output (SkipInit: 0, Fixup: 1)."""
        self.scale = nn.Parameter(torch.full((), float(value)))

    @torch.no_grad()
    def fixup_init(self, num_branches: int) -> None:
        """Fixup (Zhang et al. 2019), after He init: every branch conv but the last scaled by
        ``L ** (-1 / (2m - 2))`` (L branches, m convs per branch), the last zeroed, the scale and
        the scalar biases added."""
        convs = self.branch_convs()
        for conv in convs[:-1]:
            conv.weight.mul_(num_branches ** (-1.0 / (2 * self.depth - 2)))
        convs[-1].weight.zero_()
        self.add_branch_scale(1.0)
        for name in self.fixup_bias_names:
            setattr(self, name, nn.Parameter(torch.zeros(())))


class BasicBlock(Block):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d, *, skip: bool = True) -> None:
        super().__init__([conv3x3(in_planes, planes, stride), conv3x3(planes, planes)],
                         norm_layer, downsample, stride, skip)


class Bottleneck(Block):
    """1x1 reduce, 3x3 (carrying the stride: torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d, *, skip: bool = True) -> None:
        super().__init__([conv1x1(in_planes, planes), conv3x3(planes, planes, stride),
                          conv1x1(planes, planes * self.expansion)], norm_layer, downsample, stride, skip)


def make_stage(block: type[Block], in_planes: int, planes: int, num_blocks: int, stride: int,
               skip: bool, shortcut: str, norm_layer: NormLayer, **block_options) -> nn.Sequential:
    """One stage (``layerN``): the first block may change stride and width, the rest keep shapes.
    ``block_options`` go to every block (a Wide ResNet's ``dropout``)."""
    out_planes = planes * block.expansion
    shortcut_norm = norm_layer if block.shortcut_norm else NORMS["none"]
    layers = []
    for i in range(num_blocks):
        block_in, block_stride = (in_planes, stride) if i == 0 else (out_planes, 1)
        down = make_shortcut(block_in, out_planes, block_stride, shortcut, shortcut_norm) if skip else None
        layers.append(block(block_in, planes, block_stride, down, norm_layer, skip=skip, **block_options))
    return nn.Sequential(*layers)
