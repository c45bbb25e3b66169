"""Residual building blocks with a removable shortcut, and the stage builder that wires them.

Follows torchvision's ``models/resnet.py`` (He et al. 2016, "Deep Residual Learning"):

* every block takes the same arguments ``(in_planes, planes, stride, shortcut, norm_layer)``
  and has a class attribute ``expansion`` (output channels = ``planes * expansion``);
* the stage builder (:func:`make_stage`), not the block, decides the shortcut;
* ``shortcut=None`` is the plain twin: the same layers with the addition *and* any
  projection parameters removed (a parameter that never gets a gradient would show up as a
  fake "vanished" layer and breaks DDP);
* module names are torchvision's (``conv1``, ``bn1``, ``downsample.0``...) so torchvision
  state dicts load with ``strict=True`` and every log speaks the same layer vocabulary.

The shortcut is stored under torchvision's name ``downsample`` and read through the
``shortcut`` property: ``None`` = no shortcut (plain twin), :func:`identity_shortcut` = identity
(a plain function, not a module, so no ``downsample`` module appears where torchvision has none),
``Sequential(conv1x1, norm)`` = projection, :class:`ZeroPadShortcut` = option A.

Modules are defined in forward order, so ``named_modules()`` lists them in the order data
flows through them (the monitor and the report rely on that). The one difference from
torchvision's listing: Bottleneck's shared ``relu`` is defined after ``bn1`` (its first use),
not after ``bn3``; names, parameters and state-dict order are unchanged.

With ``norm=none`` the norm slots (``bn1``...) hold a parameter-free ``nn.Identity`` and
projection shortcuts are ``Sequential(conv1x1)``; convs keep ``bias=False``, so the plain and
residual nets without norm differ from the batch-norm nets only by the missing norm layers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from skipstudy.errors import ConfigError

NormLayer = Callable[[int], nn.Module]
Shortcut = Callable[[torch.Tensor], torch.Tensor]

NORMS = ("batch", "none")
SHORTCUTS = ("A", "B")


def no_norm(num_features: int) -> nn.Module:
    """The norm slot of ``norm=none``: a parameter-free identity, so names stay torchvision's."""
    return nn.Identity()


def norm_layer_for(norm: str) -> NormLayer:
    """Map the ``model.norm`` choice to a ``norm_layer(num_features)`` factory."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "none":
        return no_norm
    raise ConfigError(f"model.norm={norm!r} is not a known normalisation; valid: {', '.join(NORMS)}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (the norm layer or Fixup's scalar bias follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shift(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add a Fixup scalar bias if the block has one; otherwise pass ``x`` through untouched."""
    return x if bias is None else x + bias


def _scale(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply by the SkipInit/Fixup branch scalar if the block has one."""
    return x if scale is None else x * scale


def identity_shortcut(x: torch.Tensor) -> torch.Tensor:
    """The identity shortcut. A function rather than ``nn.Identity`` so that no extra
    ``downsample`` module appears where torchvision has none."""
    return x


class ZeroPadShortcut(nn.Module):
    """He et al. 2016 option A: identity with stride-``s`` subsampling and zero-padded new channels.

    Parameter-free, which is why the CIFAR ResNets of Table 6 have 0.27M parameters at depth 20.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A shortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(
    in_planes: int, out_planes: int, stride: int, skip: bool, kind: str, norm_layer: NormLayer
) -> Shortcut | None:
    """Decide a block's shortcut: ``None`` without skip, identity where shapes match, else A or B.

    ``kind='B'`` is the 1x1 projection (+ norm) torchvision uses; ``kind='A'`` zero-pads
    (He et al. 2016, section 4.2). Both use identity where input and output shapes agree.
    """
    if not skip:
        return None
    if stride == 1 and in_planes == out_planes:
        return identity_shortcut
    if kind == "A":
        return ZeroPadShortcut(in_planes, out_planes, stride)
    if kind == "B":
        projection = [conv1x1(in_planes, out_planes, stride)]
        norm = norm_layer(out_planes)
        if not isinstance(norm, nn.Identity):  # norm=none: no placeholder, keys stay downsample.0.*
            projection.append(norm)
        return nn.Sequential(*projection)
    raise ConfigError(f"model.shortcut={kind!r} is not a shortcut option; valid: {', '.join(SHORTCUTS)}")


class Block(nn.Module):
    """What BasicBlock and Bottleneck share: the shortcut slot and the per-block init methods.

    Subclasses define ``expansion``, ``branch_convs()`` and ``branch_norms()`` (in forward
    order) and the names of their Fixup scalar biases in ``fixup_bias_names``.
    """

    expansion = 1
    fixup_bias_names: tuple[str, ...] = ()

    def _register_optional_scalars(self) -> None:
        # Registered as empty slots so the default block has exactly torchvision's parameters;
        # init schemes fill them (see skipstudy.models.init).
        self.register_parameter("scale", None)
        for name in self.fixup_bias_names:
            self.register_parameter(name, None)

    @property
    def shortcut(self) -> Shortcut | None:
        """The shortcut (stored as ``downsample`` for torchvision's names); None = plain twin."""
        return self.downsample

    def extra_repr(self) -> str:
        # Make the identity/none decision visible in print(net); modules print themselves.
        if self.downsample is None:
            return "shortcut=None"
        if self.downsample is identity_shortcut:
            return "shortcut=identity"
        return ""

    def shortcut_term(self, x: torch.Tensor) -> torch.Tensor:
        """What the shortcut adds to the branch output, for the block input ``x``.

        The identity carries the raw ``x``; a projection or zero-pad shortcut sees the input
        the first conv sees, ``x + bias1a`` under Fixup, as in Zhang et al. 2019's reference
        code (``identity = self.downsample(x + self.bias1a)``). The lesion probe calls this
        too, so a deleted branch leaves exactly the block's own shortcut path.
        """
        if self.downsample is identity_shortcut:
            return x
        return self.downsample(_shift(x, self.bias1a))

    def branch_convs(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def branch_norms(self) -> list[nn.Module]:
        raise NotImplementedError

    # --- per-block initialisation (called by skipstudy.models.init) -------------------------

    @torch.no_grad()
    def zero_init_last(self) -> None:
        """Make the residual branch output zero (Goyal et al. 2017): zero the last norm's weight.

        Without an affine norm (``norm=none``) the last conv's weight is zeroed instead, which
        is the same function at init (branch = 0) and what Fixup does.
        """
        last_norm = self.branch_norms()[-1]
        weight = getattr(last_norm, "weight", None)
        if weight is not None:
            weight.zero_()
        else:
            self.branch_convs()[-1].weight.zero_()

    def add_branch_scale(self, value: float) -> None:
        """Add a learnable scalar multiplying the branch output (SkipInit: 0, Fixup: 1)."""
        self.scale = nn.Parameter(torch.full((), float(value)))

    @torch.no_grad()
    def fixup_init(self, num_branches: int) -> None:
        """Fixup (Zhang et al. 2019) for this block, after He init of all convs.

        Scales every branch conv but the last by ``L ** (-1 / (2m - 2))`` (L = residual
        branches in the net, m = layers per branch), zeroes the last conv, and adds the scalar
        multiplier (1) and the scalar biases (0) before each conv and activation.
        """
        convs = self.branch_convs()
        m = len(convs)
        factor = num_branches ** (-1.0 / (2 * m - 2))
        for conv in convs[:-1]:
            conv.weight.mul_(factor)
        convs[-1].weight.zero_()
        self.add_branch_scale(1.0)
        for name in self.fixup_bias_names:
            setattr(self, name, nn.Parameter(torch.zeros(())))


class BasicBlock(Block):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1
    fixup_bias_names = ("bias1a", "bias1b", "bias2a", "bias2b")

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = shortcut
        self.stride = stride
        self._register_optional_scalars()

    def branch_convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]

    def branch_norms(self) -> list[nn.Module]:
        return [self.bn1, self.bn2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fixup scalar biases and scale: no-ops unless init=fixup/skipinit. The raw x is kept
        # for the shortcut (see shortcut_term).
        out = self.conv1(_shift(x, self.bias1a))
        out = self.bn1(out)
        out = _shift(out, self.bias1b)
        out = self.relu(out)
        out = _shift(out, self.bias2a)
        out = self.conv2(out)
        out = self.bn2(out)
        out = _scale(out, self.scale)
        out = _shift(out, self.bias2b)
        if self.shortcut is not None:  # None in the plain twin
            out = out + self.shortcut_term(x)
        out = self.relu(out)
        return out


class Bottleneck(Block):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4
    fixup_bias_names = ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b")

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(in_planes, width)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = shortcut
        self.stride = stride
        self._register_optional_scalars()

    def branch_convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]

    def branch_norms(self) -> list[nn.Module]:
        return [self.bn1, self.bn2, self.bn3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fixup scalar biases and scale: no-ops unless init=fixup/skipinit. The raw x is kept
        # for the shortcut (see shortcut_term).
        out = self.conv1(_shift(x, self.bias1a))
        out = self.bn1(out)
        out = _shift(out, self.bias1b)
        out = self.relu(out)
        out = _shift(out, self.bias2a)
        out = self.conv2(out)
        out = self.bn2(out)
        out = _shift(out, self.bias2b)
        out = self.relu(out)
        out = _shift(out, self.bias3a)
        out = self.conv3(out)
        out = self.bn3(out)
        out = _scale(out, self.scale)
        out = _shift(out, self.bias3b)
        if self.shortcut is not None:  # None in the plain twin
            out = out + self.shortcut_term(x)
        out = self.relu(out)
        return out


def make_stage(
    block: type[Block],
    in_planes: int,
    planes: int,
    num_blocks: int,
    stride: int,
    skip: bool,
    shortcut: str,
    norm_layer: NormLayer,
) -> nn.Sequential:
    """One stage (``layerN``): the first block may change stride/width, the rest keep shapes."""
    out_planes = planes * block.expansion
    layers = []
    for i in range(num_blocks):
        block_in, block_stride = (in_planes, stride) if i == 0 else (out_planes, 1)
        sc = make_shortcut(block_in, out_planes, block_stride, skip, shortcut, norm_layer)
        layers.append(block(block_in, planes, block_stride, sc, norm_layer))
    return nn.Sequential(*layers)
