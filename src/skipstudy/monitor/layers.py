"""Which modules the monitor taps: layers named in ``monitor.layers``, and residual blocks.
Names are ``net.named_modules()`` names relative to the network (``layer1.0.conv1``), the
vocabulary of every tag the monitor writes."""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.contract import read_blocks

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
    """A block computing ``shortcut(u) + branch(v)``, as its contract declares
    (``models/contract.py``): the module whose input is the branch's (``entry``), the
    shortcut's module (None: an identity the block adds itself, or none), whether there is a
    shortcut, the module whose output is the branch's last tensor (``exit``), and whether
    branch and shortcut read a tensor computed inside the block (``shared``: the split is
    then that tensor's gradient, ``b + s``)."""

    name: str
    module: nn.Module
    entry: nn.Module
    shortcut: nn.Module | None
    has_shortcut: bool
    exit: nn.Module | None
    shared: bool = False


def find_blocks(net: nn.Module, strict: bool = False) -> list[ResidualBlock]:
    """Every residual block of ``net`` that declares its structure, in registration order:
    skipstudy's blocks, modules with a ``block_contract()``, and the adapted blocks of
    torchvision and timm (``models.contract.ADAPTERS``). A module that looks like a residual
    block but declares nothing is not measured: named in one warning, or with ``strict``
    (``monitor.blocks=true``) refused."""
    declared, undeclared = read_blocks(net)
    if undeclared:
        kinds = sorted({type(net.get_submodule(n)).__name__ for n in undeclared})
        shown = ", ".join(undeclared[:3]) + (f" and {len(undeclared) - 3} more" if len(undeclared) > 3 else "")
        message = (f"{len(undeclared)} block(s) of type {', '.join(kinds)} ({shown}) declare no block contract, so "
                   "grad_split/* and spp/* cannot be measured for them; give the class a block_contract() "
                   "(skipstudy.models.contract)")
        if strict:
            raise ConfigError(f"monitor.blocks=true: {message}, or use monitor.blocks=null to skip them")
        warnings.warn(f"monitor: {message}", stacklevel=2)
    return [ResidualBlock(name, module, c.entry, c.projection, c.has_shortcut, c.exit, c.shared)
            for name, module, c in declared]
