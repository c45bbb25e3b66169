"""Named initialisation schemes (``model.init``), applied once right after a network is built.

``default``: PyTorch's own per-layer init, nothing changed. ``kaiming``: as torchvision's ResNet
(He-normal fan_out convs, norm weight 1 / bias 0). ``zero_residual``: ``kaiming`` plus a zero
last norm weight in every branch (Goyal et al. 2017), so each block starts as
``relu(shortcut(x))``; with ``norm=none`` the last conv is zeroed instead, the same function at
init. ``fixup`` (Zhang et al. 2019, for ``norm=none``): He init, branch convs but the last scaled
by ``L ** (-1/(2m-2))``, the last zeroed, a scalar multiplier (1) at the branch end and scalar
biases (0) before every conv and activation, the classifier zeroed, scalar biases after the stem
and before the classifier (the paper's rule 3 and its reference code). ``skipinit`` (De & Smith
2020): a learnable scalar, initialised to 0, multiplies the end of every branch.

``fixup`` and ``skipinit`` add parameters, so only the other three load torchvision weights.
Which combinations work (zeroed branches need a shortcut, Fixup needs ``norm=none``) is
checked with the other keys in ``skipstudy.config``.
"""

from __future__ import annotations

import torch
from torch import nn

from skipstudy.models.blocks import Block


@torch.no_grad()
def kaiming_init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def apply_init(net: nn.Module, init: str) -> None:
    """Apply the named scheme in place; Fixup needs ``net.fc`` and ``net.add_fixup_scalars()``."""
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    if init == "default":
        return
    if init == "skipinit":
        for block in blocks:
            block.add_branch_scale(0.0)
        return
    kaiming_init(net)
    if init == "zero_residual":
        for block in blocks:
            block.zero_init_last()
    elif init == "fixup":
        for block in blocks:
            block.fixup_init(num_branches=len(blocks))
        with torch.no_grad():
            net.fc.weight.zero_()
            net.fc.bias.zero_()
        net.add_fixup_scalars()
