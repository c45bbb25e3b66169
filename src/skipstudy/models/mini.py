"""The two-block mini net: the smallest plain-vs-residual pair for fast studies and tests.

``block1``: BasicBlock ``in_channels -> 16``; ``block2``: BasicBlock ``16 -> 32`` with stride 2;
global average pool; linear classifier ``fc``. Both blocks change shape, so with
``skip=true`` each has a 1x1 projection shortcut (``blockN.downsample.0``); with
``skip=false`` neither has a shortcut or its parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from skipstudy.models.blocks import BasicBlock, _shift, make_shortcut, norm_layer_for
from skipstudy.models.init import apply_init, check_init
from skipstudy.models.options import check_builder_args, check_skip


class MiniNet(nn.Module):
    """Two residual (or plain) blocks, GAP, linear. Built by :func:`mini`."""

    def __init__(self, num_classes: int, in_channels: int = 3, skip: bool = True, norm: str = "batch") -> None:
        super().__init__()
        norm_layer = norm_layer_for(norm)
        self.block1 = BasicBlock(in_channels, 16, 1, make_shortcut(in_channels, 16, 1, skip, "B", norm_layer), norm_layer)
        self.block2 = BasicBlock(16, 32, 2, make_shortcut(16, 32, 2, skip, "B", norm_layer), norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)
        self.register_parameter("bias2", None)  # Fixup's scalar bias before the classifier
        self.arch = "mini"
        self.downsample_factor = 2

    def add_fixup_scalars(self) -> None:
        """Fixup's scalar bias before the classifier (the mini net has no stem)."""
        self.bias2 = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = self.block2(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = _shift(x, self.bias2)
        x = self.fc(x)
        return x


def mini(
    num_classes: int,
    in_channels: int = 3,
    *,
    skip: bool = True,
    norm: str = "batch",
    init: str = "default",
    **unknown: object,
) -> MiniNet:
    """Build the mini net.

    Args:
        num_classes: classifier outputs (from the dataset).
        in_channels: image channels (from the dataset).
        skip: ``True`` residual blocks with 1x1 projection shortcuts; ``False`` the plain twin.
        norm: ``batch`` or ``none``.
        init: ``default | kaiming | zero_residual | fixup | skipinit`` (see ``models.init``).
    """
    check_builder_args("mini", num_classes, in_channels, unknown, ("skip", "norm", "init"))
    check_skip(skip)
    norm_layer_for(norm)
    check_init(init, skip, norm)
    net = MiniNet(num_classes, in_channels, skip=skip, norm=norm)
    apply_init(net, init)
    return net
