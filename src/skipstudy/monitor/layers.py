"""Which layers the monitor tracks: ``monitor.layers`` names and globs resolved against a network.

Names are ``net.named_modules()`` names relative to the network (``conv1``,
``layer1.0.conv1``, ``fc``), the vocabulary of every tag the monitor writes.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from skipstudy.errors import ConfigError

# ``monitor.layers: null`` tracks every module of these types (the weighted layers whose
# count gives a ResNet its depth). Linear is included so the classifier ``fc`` is the last layer.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

_GLOB_CHARS = set("*?[")


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def closest_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The ``n`` module names most similar to ``name`` (difflib ratio), ties in network order."""
    scored = [(difflib.SequenceMatcher(None, name, cand).ratio(), -i, cand) for i, cand in enumerate(names)]
    scored.sort(reverse=True)
    return [cand for _, _, cand in scored[:n]]


def select_layers(net: nn.Module, patterns: str | Iterable[str] | None) -> list[str]:
    """Resolve ``monitor.layers`` against ``net``; returns module names in registration order.

    Args:
        net: the bare network (what ``LitClassifier`` holds as ``self.net``).
        patterns: ``None`` for every Conv2d and Linear; otherwise exact module names (any
            module whose output is a tensor) and glob patterns (``layer3.*.conv*``). A glob
            only selects modules that own a ``weight`` parameter (conv, linear, norm layers),
            so ``layer3.*`` means the weighted layers of stage 3, not every ReLU and block.

    Raises:
        ConfigError: a name or pattern matches no module; the message lists the closest names.
    """
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
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ConfigError("monitor.layers=[] selects nothing; use null for every Conv2d and Linear, or monitor=off")
    weighted = [name for name, mod in modules.items() if isinstance(getattr(mod, "weight", None), nn.Parameter)]
    selected: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"monitor.layers entry {pattern!r} is not a module name; e.g. 'layer1.0.conv1'")
        if is_glob(pattern):
            hits = [name for name in weighted if fnmatch.fnmatchcase(name, pattern)]
        else:
            hits = [pattern] if pattern in modules else []
        if not hits:
            close = ", ".join(closest_names(pattern, weighted if is_glob(pattern) else names))
            raise ConfigError(f"monitor.layers: {pattern!r} matches no module; closest: {close}")
        selected.update(hits)
    return [name for name in names if name in selected]
