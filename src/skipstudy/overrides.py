"""The command line of ``skipstudy.train`` and ``skipstudy.probe`` before Hydra sees it.

Hydra answers a misspelt key (``model.skp=false``) with seven lines that end in the wrong fix
("To append to your config use +model.skp=false") and an unknown option (``model=resnet_50``)
with sixteen. Hydra has no hook that runs between parsing the overrides and reporting a
composition error, so the entry points check the overrides first, with Hydra's own parser and
compose API, and refuse the first bad one in one line (key, closest valid names, exit status 2)
before anything is built or written. Overrides this check cannot judge are left to Hydra.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from skipstudy.config import GROUPS
from skipstudy.keys import closest, defaults, unknown_key
from skipstudy.probes.options import PROBE_OPTIONS
from skipstudy.errors import ConfigError
from skipstudy.runs.dirs import quote_path
from skipstudy.runs.layout import conf_dir

# Hydra's flags that take a value (the next word is not an override).
_VALUED_FLAGS = {"--cfg", "-c", "--package", "-p", "--experimental-rerun"}
# With these Hydra prints something and exits, or reads configs from elsewhere: nothing to check.
_LEAVE_TO_HYDRA = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                   "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--version"}


def register() -> None:
    """What Hydra needs from skipstudy before it composes: the resolvers of the run and probe
    directories and of ``--help``'s groups, the open ``trainer`` node and each option's defaults. Called by the entry points,
    the SLURM launcher's job process and the tests' compose fixture, never at import. The nodes are
    top-level configs, not group options, so ``--help`` does not offer them."""
    from skipstudy.probes.checkpoint import RESOLVERS
    from skipstudy.runs.dirs import register_resolvers

    register_resolvers({**RESOLVERS, "skipstudy.help_groups": help_groups})
    # Each option's defaults, from its one declaration (a pydantic model beside its code), as a
    # top-level node its yaml extends: `- /skipstudy.models.options.CifarResNet@_here_`.
    for schema in {*PROBE_OPTIONS.values(), *(s for options in GROUPS.values() for s in options.values())}:
        ConfigStore.instance().store(name=f"{schema.__module__}.{schema.__name__}", node=defaults(schema))
    # trainer.<name>=... for any lightning.Trainer argument, without `+`: conf/trainer/default.yaml
    # starts from this node, whose struct flag is off, so Hydra lets an override add keys to it
    # (config.check then holds them against Lightning's signature).
    node = OmegaConf.create({})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(name="skipstudy_open_node", node=node)


def help_groups(groups: Sequence[str]) -> str:
    """``--help``'s ``group: option, ...`` lines for ``groups`` (names, or a command's ``hydra.runtime.choices``):
    Hydra's ``$APP_CONFIG_GROUPS`` lists every folder of ``conf/``, the probe command's ``probe`` in
    ``skipstudy.train --help`` too. Read from ``conf/`` alone, so a config resolved outside Hydra resolves."""
    names = sorted(str(g) for g in groups if not str(g).startswith("hydra/"))
    return "\n".join(f"{g}: {', '.join(sorted(p.stem for p in (Path(conf_dir()) / g).glob('*.yaml')))}"
                     for g in names)


def _values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return list(value) if isinstance(value, list) else [value]


def _missing_key(cfgs: Sequence[DictConfig], key: str) -> ConfigError | None:
    """The error for ``key`` when no composed variant has it (None when one has, or when a node on
    its path accepts new keys, as ``trainer`` does)."""
    siblings: set[str] = set()
    for cfg in cfgs:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig) or OmegaConf.is_struct(node) is False:
                return None  # a list, a leaf or an open node: Hydra and config.check judge the rest
            if part not in node:
                siblings |= {k for k in node.keys() if not str(k).startswith("_")}
                break
            try:
                node = node[part]
            except Exception:  # noqa: BLE001 - an interpolation that cannot resolve yet: Hydra's to judge
                return None
        else:
            return None
    return unknown_key(key, siblings, key.rpartition(".")[0] or "the config")


def check(args: Sequence[str], config_name: str) -> None:
    """Refuse the first override in ``args`` (a command line without the program) that names an
    unknown option of a config group or a key the composed config does not have."""
    words = list(args)
    if any(w.split("=", 1)[0] in _LEAVE_TO_HYDRA for w in words):
        return
    overrides_text = [w for i, w in enumerate(words) if not w.startswith("-")
                      and not (i and words[i - 1] in _VALUED_FLAGS)]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides_text)
    except HydraException:
        return  # a grammar error: Hydra's own message quotes it best
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        # Hydra's own list of a group's options: the yaml files, the nodes skipstudy stores, its plugins'.
        options = GlobalHydra.instance().config_loader().get_group_options
        groups = [o for o in parsed if not o.is_delete() and not o.package and options(o.key_or_group)]
        keys = [o for o in parsed if o not in groups and not o.key_or_group.startswith("hydra")
                and not (o.is_delete() or o.is_add() or o.is_force_add() or o.package)]
        for o in groups:
            known = options(o.key_or_group)
            for value in _values(o):
                if isinstance(value, str) and value != "null" and value not in known:
                    close = closest(value, known)
                    hint = f"did you mean {', '.join(f'{o.key_or_group}={c}' for c in close)}? " if close else ""
                    raise ConfigError(f"{o.key_or_group}={value} is not an option of {o.key_or_group}; {hint}"
                                      f"valid: {', '.join(known)}")
        if not keys:
            return
        # One composition per value of each swept group (the others at their first value): a key
        # counts as known when any job of the sweep has it.
        first = {("+" if o.is_add() else "") + o.key_or_group: _values(o) for o in groups}
        variants = [[f"{g}={v[0]}" for g, v in first.items()]]
        variants += [[f"{g}={x if g2 == g else v2[0]}" for g2, v2 in first.items()]
                     for g, v in first.items() for x in v[1:]]
        cfgs = []
        for variant in variants:
            try:
                cfgs.append(compose(config_name, overrides=variant))
            except HydraException:
                return  # left to Hydra, which reports it with the whole command line
    for o in keys:
        if (err := _missing_key(cfgs, o.key_or_group)) is not None:
            raise err


def entry(config_name: str, path_key: str, existing_only: bool = False) -> Callable[[Callable], Callable]:
    """Decorator for a Hydra entry point: quote the path ``path_key=`` names, register what Hydra
    needs, then check ``sys.argv`` (a refusal is one line on stderr and exit status 2)."""

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sys.argv[1:] = quote_path(sys.argv[1:], path_key, existing_only)
            register()
            try:
                check(sys.argv[1:], config_name)
            except ConfigError as err:
                print(f"Error: {err}", file=sys.stderr)
                sys.exit(2)
            finally:
                GlobalHydra.instance().clear()
            return main(*args, **kwargs)

        return wrapper

    return decorate
