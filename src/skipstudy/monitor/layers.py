"""Which modules the monitor taps: layers named in ``monitor.layers``, and residual blocks.
Names are ``net.named_modules()`` names relative to the network (``layer1.0.conv1``), the
vocabulary of every tag the monitor writes."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import Block

# ``monitor.layers: null``: the weighted layers whose count gives a ResNet its depth, the
# classifier ``fc`` last.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def select_layers(net: nn.Module, patterns: str | Iterable[str] | None) -> list[str]:
    """``monitor.layers`` resolved against ``net``, in registration order: ``None`` for every
    Conv2d and Linear, else exact module names (any module) and globs (``layer3.*.conv*``) over
    modules owning a ``weight`` parameter (``layer3.*`` is not every ReLU and block). ConfigError
    naming the closest names when one matches nothing."""
    modules = {name: mod for name, mod in net.named_modules() if name}
    names = list(modules)
    if patterns is None:
        chosen = [name for name, mod in modules.items() if isinstance(mod, DEFAULT_TYPES)]
        if not chosen:
            raise ConfigError(
                f"monitor.layers=null tracks every Conv2d and Linear, but {type(net).__name__} has none; "
                f"list module names instead, e.g. monitor.layers=[{', '.join(names[:2])}]"
            )
        return chosen
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ConfigError("monitor.layers=[] selects nothing; use null for every Conv2d and Linear, or monitor=off")
    weighted = [name for name, mod in modules.items() if isinstance(getattr(mod, "weight", None), nn.Parameter)]
    selected: set[str] = set()
    for pattern in patterns:
        glob = any(c in "*?[" for c in pattern)
        hits = [n for n in weighted if fnmatch.fnmatchcase(n, pattern)] if glob else [n for n in names if n == pattern]
        if not hits:
            closest = difflib.get_close_matches(pattern, weighted if glob else names, n=3, cutoff=0)
            raise ConfigError(f"monitor.layers: {pattern!r} matches no module; closest: {', '.join(closest)}")
        selected.update(hits)
    return [name for name in names if name in selected]


@dataclass(frozen=True)
class ResidualBlock:
    """A block computing ``shortcut(x) + branch(x)``: the module whose input is the branch's
    (``entry``), the shortcut's module (None: identity or none), whether there is a shortcut,
    and the module whose output is the branch's last tensor (``exit``)."""

    name: str
    module: nn.Module
    entry: nn.Module
    shortcut: nn.Module | None
    has_shortcut: bool
    exit: nn.Module | None


def find_blocks(net: nn.Module) -> list[ResidualBlock]:
    """Every residual block of ``net`` in registration order: skipstudy's
    :class:`~skipstudy.models.blocks.Block` (``shortcut`` None = plain twin), and torchvision's
    BasicBlock/Bottleneck or blocks written like them (a ``conv1`` and a ``downsample``,
    None = identity; the branch ends at ``bn3`` or ``bn2``). The exit of a SkipInit/Fixup
    branch is its last norm, before the learnable scalars."""
    blocks = []
    for name, m in net.named_modules():
        if isinstance(m, Block):
            sc = m.shortcut
            exit_module = m.branch_norms()[-1]
            if isinstance(exit_module, nn.Identity):  # norm=none: the last conv ends the branch
                exit_module = m.branch_convs()[-1]
            blocks.append(ResidualBlock(name, m, m.conv1, sc if isinstance(sc, nn.Module) else None,
                                        sc is not None, exit_module))
        elif hasattr(m, "downsample") and isinstance(getattr(m, "conv1", None), nn.Module):
            exit_module = getattr(m, "bn3", None) or getattr(m, "bn2", None)
            blocks.append(ResidualBlock(name, m, m.conv1, m.downsample, True, exit_module))
    return blocks
