"""One check of a run's config before anything is built or written: each group's node against its
option's pydantic model, declared beside the code that uses it (``models/options.py``,
``data/options.py``, ``monitor/options.py``, ``runs/options.py``, ``probes/options.py``) and told
apart by the node's ``_target_``; the keys outside the groups against :class:`Top` (their
defaults are ``conf/train.yaml``'s); ``trainer.*`` and ``logger.*`` against the types of
Lightning's own signatures (their ranges are Lightning's: a Trainer is built to check them)."""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import ConfigDict, Field, create_model

from skipstudy.data.options import DATASETS
from skipstudy.errors import ConfigError
from skipstudy.keys import Options, Text, key, rule, unknown_key, validate
from skipstudy.models.options import MODELS
from skipstudy.monitor.options import MONITORS
from skipstudy.probes.options import PROBE_OPTIONS, Batches, Seed
from skipstudy.runs.layout import conf_dir
from skipstudy.runs.options import OPTIMIZERS, SCHEDULERS

# Config groups whose option is told apart by its _target_ (None: an option without one).
GROUPS: dict[str, Mapping[str | None, type[Options]]] = {
    "dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "monitor": MONITORS}
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")
ProbeName = Literal[tuple(PROBE_OPTIONS)]  # type: ignore[valid-type]


class Paths(Options):
    log_dir: Text = key(eg="logs")
    data_dir: Text = key(eg="/data")


class Fast(Options):
    channels_last: Literal["auto", True, False]
    compile: bool = key(eg=False)


class ProbeRuns(Options):
    names: Annotated[list[ProbeName], rule(lambda v: len(set(v)) == len(v))] = key(
        eg=["feature_maps"], bad=["nosuch"],
        valid=f"a list of different values, each one of: {', '.join(PROBE_OPTIONS)}")
    at_epochs: list[Annotated[int, Field(ge=0)]] = key(eg=[0, 10])
    batches: Batches = key(eg=4)
    options: dict[str, dict] = key(eg={})  # each probe's against its own model (check_probe)


class Report(Options):
    custom_scalars: bool
    figures_to_tensorboard: bool = key(eg=False)


class Checkpoint(Options):
    save_last: bool
    save_top_k: int = key(ge=-1, eg=1)
    monitor: Text = key(eg="val/acc")
    mode: Literal["max", "min"]
    every_n_train_steps: Annotated[int, Field(ge=1)] | None = key(eg=500)


class Top(Options):
    """train.yaml's keys outside the groups, and the probe app's ``ckpt``, ``device``, ``probe``."""
    name: Text = key(eg="my_study")
    seed: Seed = key(eg=0)
    resume: Text | None = key(eg="logs/default/defaults/2025-01-31_12-00-00_123456")
    paths: Paths
    fast: Fast
    probes: ProbeRuns
    report: Report
    checkpoint: Checkpoint
    # python -m skipstudy.probe (None: absent, in training; probe.yaml holds their defaults)
    ckpt: Text | None = key(None, eg="logs/default/defaults/<time>")
    device: str | None = key(None, pattern=r"auto|cpu|cuda(:\d+)?|mps", valid="auto, cpu, cuda, cuda:<index> or mps",
                              eg="cpu", bad="abc!")
    probe: dict | None = None  # check_probe


def check_probe(name: Any, options: Any, key: str = "probe") -> Options:
    """Probe ``name``'s options against its model (``probes/options.py``), quoted as ``<key>.<option>``."""
    if name not in PROBE_OPTIONS:
        raise ConfigError(f"{key}.name={name!r} is not one of: {', '.join(PROBE_OPTIONS)}; e.g. {key}.name=landscape")
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options
    if not isinstance(options, Mapping):
        raise ConfigError(f"{key}={options!r} must be a group of keys; e.g. {key}.name={name}")
    return validate(PROBE_OPTIONS[name], {"name": name, **options}, f"{key}.", f"probe {name}")


@functools.cache
def signature_model(target: Any, leave_out: tuple[str, ...] = ()) -> type[Options]:
    """A pydantic model of ``target``'s keyword arguments, typed by its own annotations (lax: a
    library's hints, not ours), for the Trainer and the loggers: Lightning declares them."""
    try:
        hints = typing.get_type_hints(target.__init__)
    except NameError:  # a hint only its type checker resolves (W&B's Run): those types are not checked
        hints = {}
    params = inspect.signature(target.__init__).parameters
    fields = {name: (hints.get(name, Any), p.default if p.default is not inspect.Parameter.empty else None)
              for name, p in params.items() if name not in ("self", *leave_out)
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False)
    return create_model(target.__name__, __config__=config, **fields)


# lightning.Trainer arguments train.py passes itself.
TRAINER_OWN = {"logger": "from the logger group", "callbacks": "the monitor, checkpoints and guards",
               "default_root_dir": "the run directory"}


def _trainer(node: Mapping) -> None:
    # Lightning's own class: scripts/benchmark.py swaps lightning.Trainer for a timing subclass.
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    from lightning.pytorch.trainer.trainer import Trainer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for name in (name for name in node if name in TRAINER_OWN):
        if name == "logger":
            raise ConfigError("trainer.logger: skipstudy builds the loggers from the logger group; drop trainer.logger "
                              "and choose them with e.g. logger=[tensorboard,csv] (conf/logger/)")
        raise ConfigError(f"trainer.{name}: skipstudy sets {name} itself ({TRAINER_OWN[name]}); drop trainer.{name}")
    validate(signature_model(Trainer, tuple(TRAINER_OWN)), node, "trainer.", "lightning.Trainer")
    # The ranges are Lightning's, checked when a Trainer is built: one is built now (it writes
    # nothing; its device report is silenced), before the data, the network or the run directory.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        Trainer(**node, logger=False)
    except (TypeError, ValueError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {str(err).splitlines()[0]} (conf/trainer/default.yaml lists the keys)") from None
    finally:
        rank_zero.setLevel(level)
    # Lightning checks the accumulation factor only when fit starts, with this callback's own check.
    accumulate = node.get("accumulate_grad_batches", 1)
    try:
        GradientAccumulationScheduler({0: accumulate})
    except (TypeError, MisconfigurationException) as err:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate}: {str(err).splitlines()[0]} "
                          "e.g. trainer.accumulate_grad_batches=1") from None


def _loggers(node: Any) -> None:
    """Each logger's keys against its Lightning class's signature; a class that passes ``**kwargs``
    on to its library (W&B's ``entity``) takes those its ``conf/logger/<name>.yaml`` names too."""
    from hydra.utils import get_class

    if not isinstance(node, Mapping) or not node:
        raise ConfigError(f"logger={node!r} must name loggers; e.g. logger=[tensorboard,csv] (conf/logger/)")
    for name, options in node.items():
        options = {k: v for k, v in (options or {}).items() if k not in HYDRA_KEYS}
        shipped = Path(conf_dir()) / "logger" / f"{name}.yaml"
        passed_on = set(OmegaConf.load(shipped).get(name) or {}) if shipped.is_file() else set()
        model = signature_model(get_class(node[name]["_target_"]))
        validate(model, {k: v for k, v in options.items() if k not in passed_on or k in model.model_fields},
                 f"logger.{name}.", f"logger {name}")
    if "tensorboard" not in node:
        names = ",".join(node)
        raise ConfigError(f"logger=[{names}] leaves out tensorboard, the run's own record that resume, the report "
                          f"and the HParams read; use logger=[tensorboard,{names}]")


def check_group(group: str, target: str | None, options: Mapping) -> Options | None:
    """One group's node (the option whose ``_target_`` is ``target``) against its model, quoted as
    ``<group>.<key>``; None for a user's own ``_target_``, whose signature is its check."""
    if target not in GROUPS[group]:
        return None
    return validate(GROUPS[group][target], {k: v for k, v in options.items() if k not in HYDRA_KEYS}, f"{group}.",
                    f"{group} {target or '(no _target_)'}")


def _plain(cfg: Any, key: str) -> Any:
    try:
        value = cfg[key]
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception as err:  # noqa: BLE001 - an interpolation that cannot resolve
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def check(cfg: DictConfig | Mapping) -> None:
    """Refuse the first key of ``cfg`` whose value is outside its declared type or range."""
    node = {key: _plain(cfg, key) for key in cfg if key != "hydra"}
    own = (*GROUPS, "trainer", "logger")
    unknown = [k for k in node if k not in Top.model_fields and k not in own]
    if unknown:
        raise unknown_key(str(unknown[0]), [*Top.model_fields, *own], "the config")
    top = validate(Top, {k: v for k, v in node.items() if k not in own and (k != "probe" or v is None)}, "",
                   "the config")
    if (probe := node.get("probe")) is not None:
        check_probe(probe.get("name") if isinstance(probe, Mapping) else probe, probe, "probe")
    for name, options in top.probes.options.items():
        if name not in PROBE_OPTIONS:
            raise unknown_key(f"probes.options.{name}", PROBE_OPTIONS, "probes.options")
        check_probe(name, options or {}, f"probes.options.{name}")
    for group in (group for group in GROUPS if group in node):
        group_node = node[group] or {}
        if not isinstance(group_node, Mapping):
            raise ConfigError(f"{group}={group_node!r} must be a group of keys; e.g. {group}=<option> (conf/{group}/)")
        check_group(group, group_node.get("_target_"), group_node)
    if "trainer" in node:
        _trainer(node["trainer"] or {})
    if "logger" in node:
        _loggers(node["logger"])
