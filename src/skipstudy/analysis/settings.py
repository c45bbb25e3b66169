"""What a run was started with, as values: its overrides' keys and typed values (read from its
composed config), which of them differ between runs, and the natural order of runs (numbers
compared as numbers, so depth 8 comes before 14). A run here is anything with ``overrides``,
``group``, ``name`` and ``option(key)``: :class:`skipstudy.analysis.logs.Run`."""

from __future__ import annotations

from typing import Any

import yaml

# Overrides that locate or name a run but do not change what it computes, so they never make
# two runs different groups (train.yaml leaves the same keys out of directory names).
LOCATING_KEYS = ("name", "experiment", "resume", "paths.", "hydra.", "dataset.root", "seed", "logger", "logger.")


def is_locating(override: str) -> bool:
    key = override_key(override)
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in LOCATING_KEYS)


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def setting(run: Any, key: str) -> Any:
    """The run's value of ``key``: from its composed config when the key is a leaf there (so a run
    that left the key at its default still has it), else the text of its override of ``key`` (a
    group choice such as ``model=cifar_resnet``) as YAML reads it: numbers as numbers."""
    value = run.option(key)
    if value is None or isinstance(value, (dict, list)):
        text = next((o.partition("=")[2] for o in run.overrides if override_key(o) == key), "")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def varying_keys(runs: list, locating: bool = False) -> list[str]:
    """The override keys whose value differs between ``runs``, in the order first given; the
    keys that only locate a run (paths, name...) left out unless ``locating``, ``seed`` kept."""
    keys = [k for k in dict.fromkeys(override_key(o) for run in runs for o in run.overrides)
            if locating or k == "seed" or not is_locating(k)]
    return [k for k in keys if len({repr(setting(run, k)) for run in runs}) > 1]


def _natural(value: Any) -> tuple:
    """Numbers (and booleans) before text, numbers by value: depth 8 before 14."""
    if isinstance(value, (bool, int, float)):
        return (0, float(value), "")
    return (1, 0.0, "" if value is None else str(value))


def natural_order(run: Any) -> tuple:
    """Sort key of a run: its group's overrides with values compared as numbers, then its name."""
    return (tuple((override_key(o), _natural(setting(run, override_key(o)))) for o in run.group), run.name)
