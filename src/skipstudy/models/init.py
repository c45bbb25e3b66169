"""Named initialisation schemes (``model.init``), applied once right after a network is built.

``default``
    PyTorch's own per-layer init (Kaiming-uniform with a=sqrt(5) for convs and linears,
    BN weight 1 / bias 0). What the studies' notebooks used; nothing is changed.
``kaiming``
    As torchvision's ResNet does it: convs ``kaiming_normal_(mode='fan_out', relu)``, norm
    weight 1 / bias 0, the classifier left at PyTorch's default.
``zero_residual``
    ``kaiming`` plus a zero last norm weight in every residual branch (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD"), so each block starts as ``relu(shortcut(x))``. With
    ``norm=none`` there is no norm weight; the last conv of each branch is zeroed instead,
    which gives the same function at init.
``fixup``
    Fixup (Zhang et al. 2019, "Fixup Initialization: Residual Learning Without
    Normalization"), for ``norm=none``: He init, then in every residual branch the convs
    but the last are scaled by ``L ** (-1/(2m-2))`` (L = number of residual branches, m =
    layers per branch), the last conv is zeroed, a scalar multiplier (init 1) is added at the
    branch end and scalar biases (init 0) before every conv and activation in the branch;
    the classifier weight and bias are zeroed, and scalar biases are added after the stem
    conv and before the classifier (as in the paper's rule 3 and its reference code).
``skipinit``
    SkipInit (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the
    Identity Function in Deep Networks"): a learnable scalar ``alpha``, initialised to 0,
    multiplies the end of every residual branch; everything else keeps PyTorch's init.

Schemes that add parameters (``fixup``, ``skipinit``) change the state dict, so only
``default``, ``kaiming`` and ``zero_residual`` load torchvision weights.
"""

from __future__ import annotations

import torch
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import Block

INITS = ("default", "kaiming", "zero_residual", "fixup", "skipinit")


def check_init(init: object, skip: bool, norm: str) -> None:
    """Refuse unknown schemes and combinations that cannot work, saying why."""
    if init not in INITS:
        raise ConfigError(f"model.init={init!r} is not an init scheme; valid: {', '.join(INITS)}")
    if not skip and init in ("zero_residual", "fixup", "skipinit"):
        raise ConfigError(
            f"model.init={init} needs model.skip=true: without a shortcut a zeroed branch makes "
            "every block output a constant; use model.init=default or model.init=kaiming"
        )
    if init == "fixup" and norm != "none":
        raise ConfigError(
            f"model.init=fixup needs model.norm=none (got model.norm={norm}): Fixup replaces "
            "normalisation layers; with batch norm use model.init=zero_residual"
        )


@torch.no_grad()
def kaiming_init(net: nn.Module) -> None:
    """torchvision's ResNet init: He-normal (fan_out) convs, norm weight 1 and bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def apply_init(net: nn.Module, init: str) -> None:
    """Apply the named scheme to ``net`` in place (``check_init`` must have passed).

    ``net`` must provide ``fc`` and ``add_fixup_scalars()`` for Fixup; the blocks do their
    own part through :class:`~skipstudy.models.blocks.Block` methods.
    """
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
