"""ResNet-18/34/50/101/152 (He et al. 2016) with a skip switch, as torchvision builds them.

With ``skip=true, norm=batch, stem=imagenet`` and ``init`` one of ``default|kaiming|
zero_residual`` the networks have exactly torchvision's modules and state-dict keys, so
``torchvision.models.resnet50().state_dict()`` loads with ``strict=True`` and gives identical
logits. The same :class:`ResNet` class builds the CIFAR ResNets (``skipstudy.models.cifar``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import (
    SHORTCUTS,
    BasicBlock,
    Block,
    Bottleneck,
    _shift,
    make_stage,
    norm_layer_for,
)
from skipstudy.models.init import apply_init, check_init
from skipstudy.models.options import check_builder_args, check_skip

STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A stem, one stage per entry of ``layers``, global average pool and a linear classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (``layer1``, ``layer2``, ...); every stage after the first
            halves the resolution.
        widths: ``planes`` of each stage (output channels are ``planes * block.expansion``).
        num_classes, in_channels: from the dataset.
        skip: ``False`` builds the plain twin (no shortcuts, no projection parameters).
        shortcut: ``B`` 1x1 projection (+ norm) where shapes change, ``A`` zero-pad identity.
        norm: ``batch`` or ``none`` (no norm layers at all).
        stem: ``imagenet`` 7x7/2 conv + 3x3/2 max-pool; ``cifar`` 3x3/1 conv, no pool.
        stem_width: output channels of the stem conv.
        arch: the name used in messages (``resnet50``, ``cifar_resnet20``...).
    """

    def __init__(
        self,
        block: type[Block],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        skip: bool = True,
        shortcut: str = "B",
        norm: str = "batch",
        stem: str = "imagenet",
        stem_width: int = 64,
        arch: str = "resnet",
    ) -> None:
        super().__init__()
        norm_layer = norm_layer_for(norm)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            raise ConfigError(f"model.stem={stem!r} is not a stem; valid: {', '.join(STEMS)}")
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        # The CIFAR stem has no pool; an Identity keeps torchvision's module list (no parameters).
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        in_planes = stem_width
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            stage = make_stage(block, in_planes, planes, num_blocks, stride, skip, shortcut, norm_layer)
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        # Fixup's scalar biases after the stem conv and before the classifier (empty otherwise).
        self.register_parameter("bias1", None)
        self.register_parameter("bias2", None)

        self.num_stages = len(layers)
        self.arch = arch
        self.stem = stem
        # Total stride from input to the last feature map; check_input_size compares with it.
        self.downsample_factor = (4 if stem == "imagenet" else 1) * 2 ** (len(layers) - 1)

    def add_fixup_scalars(self) -> None:
        """Fixup's scalar biases after the stem conv and before the classifier (init 0)."""
        self.bias1 = nn.Parameter(torch.zeros(()))
        self.bias2 = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = _shift(x, self.bias1)
        x = self.relu(x)
        x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = _shift(x, self.bias2)
        x = self.fc(x)
        return x


IMAGENET_WIDTHS = (64, 128, 256, 512)


def build_resnet(
    arch: str,
    block: type[Block],
    layers: Sequence[int],
    widths: Sequence[int],
    num_classes: int,
    in_channels: int,
    skip: object,
    shortcut: str,
    norm: str,
    init: str,
    stem: str,
    stem_width: int,
) -> ResNet:
    """Validate the options (before any allocation), build, then apply the init scheme."""
    check_skip(skip)
    norm_layer_for(norm)
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"model.shortcut={shortcut!r} is not a shortcut option; valid: {', '.join(SHORTCUTS)}")
    if stem not in STEMS:
        raise ConfigError(f"model.stem={stem!r} is not a stem; valid: {', '.join(STEMS)}")
    check_init(init, skip, norm)
    net = ResNet(block, layers, widths, num_classes, in_channels, skip, shortcut, norm, stem, stem_width, arch)
    apply_init(net, init)
    return net


def _imagenet_resnet(
    arch: str,
    block: type[Block],
    layers: Sequence[int],
    num_classes: int,
    in_channels: int,
    skip: object,
    norm: str,
    init: str,
    stem: str,
    unknown: dict,
) -> ResNet:
    check_builder_args(arch, num_classes, in_channels, unknown, ("skip", "norm", "init", "stem"))
    return build_resnet(arch, block, layers, IMAGENET_WIDTHS, num_classes, in_channels, skip, "B", norm, init, stem, 64)


def resnet18(num_classes, in_channels=3, *, skip=True, norm="batch", init="default", stem="imagenet", **unknown):
    """ResNet-18: BasicBlock, stages 2-2-2-2. Options: see :func:`resnet50`."""
    return _imagenet_resnet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, in_channels, skip, norm, init, stem, unknown)


def resnet34(num_classes, in_channels=3, *, skip=True, norm="batch", init="default", stem="imagenet", **unknown):
    """ResNet-34: BasicBlock, stages 3-4-6-3. Options: see :func:`resnet50`."""
    return _imagenet_resnet("resnet34", BasicBlock, (3, 4, 6, 3), num_classes, in_channels, skip, norm, init, stem, unknown)


def resnet50(num_classes, in_channels=3, *, skip=True, norm="batch", init="default", stem="imagenet", **unknown):
    """ResNet-50: Bottleneck, stages 3-4-6-3.

    Args:
        num_classes: classifier outputs (from the dataset).
        in_channels: image channels (from the dataset).
        skip: ``True`` for the ResNet; ``False`` for its plain twin (same layers, no shortcuts
            and no projection parameters).
        norm: ``batch`` or ``none`` (no normalisation layers at all).
        init: ``default | kaiming | zero_residual | fixup | skipinit`` (see ``models.init``).
        stem: ``imagenet`` (7x7/2 conv + max-pool, downsamples by 32) or ``cifar`` (3x3/1
            conv, no pool, downsamples by 8; for 32 px images).
    """
    return _imagenet_resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, in_channels, skip, norm, init, stem, unknown)


def resnet101(num_classes, in_channels=3, *, skip=True, norm="batch", init="default", stem="imagenet", **unknown):
    """ResNet-101: Bottleneck, stages 3-4-23-3. Options: see :func:`resnet50`."""
    return _imagenet_resnet("resnet101", Bottleneck, (3, 4, 23, 3), num_classes, in_channels, skip, norm, init, stem, unknown)


def resnet152(num_classes, in_channels=3, *, skip=True, norm="batch", init="default", stem="imagenet", **unknown):
    """ResNet-152: Bottleneck, stages 3-8-36-3. Options: see :func:`resnet50`."""
    return _imagenet_resnet("resnet152", Bottleneck, (3, 8, 36, 3), num_classes, in_channels, skip, norm, init, stem, unknown)
