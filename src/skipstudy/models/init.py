"""Named initialisation schemes (``model.init``), applied once right after a network is built.

``default``: PyTorch's own. ``kaiming``: torchvision's ResNet init. ``zero_residual`` (Goyal et
al. 2017), ``fixup`` (Zhang et al. 2019, for ``norm=none``) and ``skipinit`` (De & Smith 2020)
start every block as ``relu(shortcut(x))``; the per-block parts live on :class:`Block`. Which
combinations work is checked with the other keys in ``skipstudy.config``.
"""

from __future__ import annotations

import torch
from torch import nn

from skipstudy.models.blocks import Block


def apply_init(net: nn.Module, init: str) -> None:
    """Apply the named scheme in place; Fixup also zeroes the classifier and fills the net's scalar
    bias slots after the stem and before the classifier (the paper's rule 3 and its reference code)."""
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    if init == "default":
        return
    if init == "skipinit":
        for block in blocks:
            block.add_branch_scale(0.0)
        return
    with torch.no_grad():  # kaiming: as torchvision's ResNet
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if init == "zero_residual":
        for block in blocks:
            block.zero_init_last()
    elif init == "fixup":
        for block in blocks:
            block.fixup_init(num_branches=len(blocks))
        with torch.no_grad():
            net.fc.weight.zero_()
            net.fc.bias.zero_()
        for name in ("bias1", "bias2"):
            if hasattr(net, name):  # an empty slot (the mini net has no stem, so no bias1)
                setattr(net, name, nn.Parameter(torch.zeros(())))
