"""Which modules are residual blocks, and where their two paths start and end.

A block computes ``s = shortcut(x) + branch(x)`` (then usually a ReLU). The monitor needs,
per block: the module whose input is the branch's input (``entry``), the shortcut module if
the shortcut is one (a projection or option A; ``None`` for the identity), whether there is
a shortcut at all (a plain twin has none), and the module whose output is the branch's last
tensor before the addition (``exit``).

Two conventions are recognised:

* skipstudy's :class:`~skipstudy.models.blocks.Block`: ``shortcut`` None = plain twin,
  :func:`~skipstudy.models.blocks.identity_shortcut` = identity, a module = projection/A;
  the branch ends at ``branch_norms()[-1]``.
* torchvision's ``BasicBlock``/``Bottleneck`` (and blocks written like them): a module with
  a ``conv1`` and a ``downsample`` attribute, where ``downsample=None`` means identity; the
  branch ends at ``bn3`` if there is one, else ``bn2``.

For SkipInit/Fixup blocks the branch's exit is its last norm layer, i.e. the branch output
*before* the learnable scalar multiplier and bias (``spp/branch_var`` and
``spp/grad_branch_var`` are taken there).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from skipstudy.models.blocks import Block


@dataclass(frozen=True)
class ResidualBlock:
    name: str
    module: nn.Module
    entry: nn.Module
    shortcut: nn.Module | None  # the shortcut's module; None for identity or no shortcut
    has_shortcut: bool
    exit: nn.Module | None
    channels: int  # output channels (the spp statistics' width)


def _out_channels(exit_module: nn.Module | None, entry: nn.Module) -> int:
    for m in (exit_module, entry):
        n = getattr(m, "num_features", None) or getattr(m, "out_channels", None)
        if n:
            return int(n)
    return 0


def find_blocks(net: nn.Module) -> list[ResidualBlock]:
    """Every residual block of ``net`` (skipstudy or torchvision style), in registration order."""
    blocks = []
    for name, m in net.named_modules():
        if isinstance(m, Block):
            sc = m.shortcut
            exit_module = m.branch_norms()[-1]
            if isinstance(exit_module, nn.Identity):  # norm=none: the last conv ends the branch
                exit_module = m.branch_convs()[-1]
            blocks.append(ResidualBlock(name, m, m.conv1, sc if isinstance(sc, nn.Module) else None,
                                        sc is not None, exit_module,
                                        m.branch_convs()[-1].out_channels))
        elif hasattr(m, "downsample") and isinstance(getattr(m, "conv1", None), nn.Module):
            exit_module = getattr(m, "bn3", None) or getattr(m, "bn2", None)
            blocks.append(ResidualBlock(name, m, m.conv1, m.downsample, True, exit_module,
                                        _out_channels(exit_module, m.conv1)))
    return blocks
