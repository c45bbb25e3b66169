"""Probes: looks inside a network at one point of its training. One module per probe with
``run(ctx, options) -> dict[str, float]`` and, where only the network can refuse, ``check(net,
options)``; options in ``conf/probe/<name>.yaml``; ``comparison_figure``: one figure per sweep."""

from __future__ import annotations

import importlib
from types import ModuleType

from skipstudy.errors import ConfigError
from skipstudy.probes.options import PROBE_OPTIONS

PROBES = tuple(PROBE_OPTIONS)
# Probes that mean nothing on an untrained network when run from the app without a checkpoint.
NEEDS_CHECKPOINT = ("lesion",)


def get_probe(name: object, key: str = "probe") -> ModuleType:
    if name not in PROBES:
        raise ConfigError(f"{key}={name!r} is not a probe; valid: {', '.join(PROBES)}")
    return importlib.import_module(f"skipstudy.probes.{name}")
