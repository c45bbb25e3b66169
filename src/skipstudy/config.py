"""Every config key's type and valid range, declared once (a new key is one line in ``GROUPS``,
``PROBES`` or ``TOP``) and checked once, by :func:`check` before anything is built, or by
:func:`check_args` for objects built without Hydra. ``trainer.<name>`` takes any
``lightning.Trainer`` argument: names and types from its signature, ranges from ``TRAINER``."""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skipstudy.errors import ConfigError
from skipstudy.keys import Bool, Choice, Int, Key, List, Num, Str  # noqa: F401 - also config.Key, config.Int for callers


BATCH = Int(1, eg=64)
IMAGE = Int(1, eg=32)
WORKERS = Int(0, eg=4, null=True)  # null: the cores available, less one, at most 4
LOADER = Choice("auto", "torch", "device")
PAD = Choice("zero", "reflect")
PATH = Str(eg="/data")
SEED = Int(0, 2**32 - 1, eg=0)
BATCHES = Int(1, eg=4, null=True)
_SPLIT = Choice("train", "val")
_BN = Choice("auto", "eval", "calibrate")     # eval-mode BN: running stats, or calibrated on the probe's inputs
_LOSS_BN = Choice("train", "eval")            # probes of the training loss: batch or running statistics
ODD = (lambda n: n % 2 == 1, "an odd integer >= 3 (the centre is the checkpoint)", 4)

_IMAGES = {"root": PATH, "batch_size": BATCH, "augment": Bool(), "pad_mode": PAD, "loader": LOADER,
           "num_workers": WORKERS}  # the split base's keys (skipstudy.data.arrays)
_CIFAR = {**_IMAGES, "download": Bool(), "verify": Bool(), "image_size": IMAGE, "crop_padding": Int(0, 31, eg=4),
          "val_split": Int(0, eg=5000) | Num(0, 1, lo_open=True, hi_open=True, eg=0.1)}
_MODEL = {"skip": Bool(), "norm": Choice("batch", "none"),
          "init": Choice("default", "kaiming", "zero_residual", "fixup", "skipinit")}
_RESNET = {**_MODEL, "stem": Choice("imagenet", "cifar")}
_INTERVAL = Choice("epoch", "step")
_NONFINITE = Choice("warn", "stop")

# Config groups whose option is told apart by its _target_ (None: an option without one).
GROUPS: dict[str, dict[str | None, dict[str, Key]]] = {
    "dataset": {
        "skipstudy.data.cifar.CIFAR10DataModule": _CIFAR,
        "skipstudy.data.cifar.CIFAR100DataModule": _CIFAR,
        "skipstudy.data.synthetic.SyntheticDataModule": {
            "num_classes": Int(2, eg=10), "channels": Int(1, eg=3), "image_size": IMAGE, "num_train": Int(1, eg=2048),
            "num_val": Int(1, eg=512), "batch_size": BATCH, "noise": Num(0, eg=0.5)},
        "skipstudy.data.tiny_imagenet.TinyImageNetDataModule": {
            **_IMAGES, "cache_dir": PATH, "image_size": Int(1, eg=64), "crop_padding": Int(0, 63, eg=4),
            "skip_corrupt": Bool()},
    },
    "model": {
        "skipstudy.models.cifar_resnet": {
            **_MODEL, "shortcut": Choice("A", "B"),
            "depth": Int(8, eg=20, rule=(lambda d: (d - 2) % 6 == 0, "6n+2 >= 8; the paper's: 20, 32, 44, 56, 110, 1202", 21))},
        "skipstudy.models.mini": _MODEL,
        **{f"skipstudy.models.resnet{d}": _RESNET for d in (18, 34, 50, 101, 152)},
        # Depth against family and block: _preact_depth.
        "skipstudy.models.preact_resnet": {
            **_MODEL, "shortcut": Choice("A", "B"), "family": Choice("cifar", "imagenet"),
            "block": Choice("basic", "bottleneck", null=True), "stem": Choice("imagenet", "cifar", null=True),
            "depth": Int(8, eg=164)},
        "skipstudy.models.wide_resnet": {
            **_MODEL, "shortcut": Choice("B", "A"), "width": Int(1, eg=10), "dropout": Num(0, 1, hi_open=True, eg=0.3),
            "depth": Int(10, eg=28, rule=(lambda d: (d - 4) % 6 == 0, "6n+4 >= 10; the paper's: 16, 22, 28, 40", 27))},
    },
    "optimizer": {
        "torch.optim.SGD": {"lr": Num(0, lo_open=True, eg=0.1), "momentum": Num(0, 1, hi_open=True, eg=0.9),
                            "weight_decay": Num(0, eg=5e-4), "nesterov": Bool(eg=False)},
        "torch.optim.Adam": {"lr": Num(0, lo_open=True, eg=1e-3), "weight_decay": Num(0, eg=0.0),
                             "betas": List(Num(0, 1, hi_open=True, eg=0.9), size=2, eg=[0.9, 0.999])},
    },
    "scheduler": {
        None: {},
        "torch.optim.lr_scheduler.MultiStepLR": {
            "milestones": List(Int(1, eg=100), eg=[100, 150]), "gamma": Num(0, lo_open=True, eg=0.1),
            "interval": _INTERVAL},
        "torch.optim.lr_scheduler.CosineAnnealingLR": {
            "T_max": Int(1, eg=200), "eta_min": Num(0, eg=0.0), "interval": _INTERVAL},
    },
    "monitor": {
        None: {"on_nonfinite": _NONFINITE},
        "skipstudy.monitor.GradientFlowMonitor": {
            "layers": (Str(eg="conv1") | List(Str(eg="conv1"), eg=["conv1", "fc"])).nullable(),
            "schedule": Choice("every", "log"), "every_n_steps": Int(1, eg=10), "points_per_decade": Int(1, eg=10),
            "hist_every_n_epochs": Int(0, eg=1), "activations": Bool(), "on_nonfinite": _NONFINITE,
            "export": Choice("json", "csv", "none"), "figure": Bool(), "blocks": Bool(null=True)},
    },
}

# Probe options by probe name: conf/probe/<name>.yaml, probes.options.<name>.* in training.
PROBES: dict[str, dict[str, Key]] = {
    "feature_maps": {"batches": BATCHES, "images": Int(1, eg=4)},
    "landscape": {"batches": BATCHES, "split": _SPLIT, "steps": Int(3, eg=51, rule=ODD),
                  "grid": Int(3, eg=21, rule=ODD), "span": Num(0, lo_open=True, eg=1.0), "seed": SEED},
    "lesion": {"batches": BATCHES, "samples": Int(1, eg=10), "max_k": Int(1, eg=3, null=True), "seed": SEED},
    "shattering": {"batches": BATCHES, "points": Int(4, eg=256), "logit": Int(0, eg=0), "chunk": Int(1, eg=64),
                   "pair": List(Int(0, eg=0), size=2, distinct=True, eg=[0, 1]), "bn": _BN},
    "paths": {"batches": BATCHES, "split": _SPLIT, "samples": Int(1, eg=10), "bn": _BN, "seed": SEED,
              "mass": Num(0, 1, lo_open=True, eg=0.9)},
    "jacobian": {"batches": BATCHES, "samples": Int(1, eg=2), "k": Int(1, eg=4), "iters": Int(1, eg=50),
                 "tol": Num(0, eg=1e-4), "probes": Int(1, eg=8), "bn": _BN, "seed": SEED},
    "grad_snr": {"batches": BATCHES, "splits": Int(2, eg=4), "bn": _LOSS_BN},
    "hessian": {"batches": BATCHES, "k": Int(1, eg=1), "iters": Int(1, eg=20), "tol": Num(0, eg=1e-3),
                "bn": _LOSS_BN, "seed": SEED},
}
_PROBE_NAMES = Choice(*PROBES)


def check_probe(name: Any, options: Any, key: str = "probe") -> None:
    """Probe ``name``'s options against :data:`PROBES`, quoted as ``<key>.<option>``."""
    _PROBE_NAMES.check(f"{key}.name", name)
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options
    _table(key, {"name": Choice(name), **PROBES[name]}, options, f"probe {name}")


# The logger group (conf/logger/): options by logger name; where each writes is the run's (runs/loggers.py).
LOGGERS: dict[str, dict[str, Key]] = {
    "tensorboard": {},
    "csv": {"flush_logs_every_n_steps": Int(1, eg=100)},
    "mlflow": {"experiment_name": Str(eg="my_study"), "save_dir": PATH,
               "tracking_uri": Str(eg="sqlite:///mlflow.db", null=True)},
    "wandb": {"project": Str(eg="my_study"), "offline": Bool(), "entity": Str(eg="my_team", null=True)},
}


def _loggers(key: str, node: Any) -> None:
    if not isinstance(node, Mapping) or not node:
        raise ConfigError(f"{key}={node!r} must name loggers; e.g. {key}=[tensorboard,csv] "
                          f"(choices: {', '.join(LOGGERS)})")
    for name, options in node.items():
        Choice(*LOGGERS).check(f"{key}.{name}", name)
        _table(f"{key}.{name}", LOGGERS[name], options or {}, f"logger {name}")
    if "tensorboard" not in node:
        names = ",".join(node)
        raise ConfigError(f"{key}=[{names}] leaves out tensorboard, the run's own record that resume, the report "
                          f"and the HParams read; use {key}=[tensorboard,{names}]")


def _probe(key: str, node: Any) -> None:
    check_probe(node.get("name") if isinstance(node, Mapping) else node, node, key)


def _probe_options(key: str, node: Any) -> None:
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}={node!r} must map probe names to options; e.g. +{key}.landscape.grid=11")
    for name, options in node.items():
        _PROBE_NAMES.check(f"{key}.{name}", name)
        _table(f"{key}.{name}", PROBES[name], options, f"probe {name}")



# Everything outside the groups: train.yaml (and the probe app's name/ckpt/device/probe).
TOP: dict[str, Any] = {
    "name": Str(eg="my_study"),
    "seed": SEED,
    "resume": Str(eg="logs/default/defaults/2025-01-31_12-00-00_123456", null=True),
    "paths": {"log_dir": PATH, "data_dir": PATH},
    "fast": {"channels_last": Choice("auto", True, False), "compile": Bool(eg=False)},
    "probes": {"names": List(_PROBE_NAMES, eg=["feature_maps"], distinct=True),
               "at_epochs": List(Int(0, eg=0), eg=[0, 10]), "batches": BATCHES, "options": _probe_options},
    "report": {"custom_scalars": Bool(), "figures_to_tensorboard": Bool(eg=False)},
    "logger": _loggers,
    "checkpoint": {"save_last": Bool(), "save_top_k": Int(-1, eg=1), "monitor": Str(eg="val/acc"),
                   "mode": Choice("max", "min"), "every_n_train_steps": Int(1, eg=500, null=True)},
    # python -m skipstudy.probe
    "ckpt": Str(eg="logs/default/defaults/<time>", null=True),
    "device": Str(eg="cpu", pattern=r"auto|cpu|cuda(:\d+)?|mps", form="auto, cpu, cuda, cuda:<index> or mps"),
    "probe": _probe,
}

_TIME = r"\d+:\d\d:\d\d:\d\d"
# Ranges of lightning.Trainer arguments (their names and types come from its signature).
TRAINER: dict[str, Key] = {
    "max_epochs": Int(-1, eg=10, null=True), "min_epochs": Int(0, eg=1, null=True), "max_steps": Int(-1, eg=1000),
    "min_steps": Int(0, eg=100, null=True),
    "max_time": Str(eg="00:12:00:00", pattern=_TIME, form="a time DD:HH:MM:SS", null=True),
    **{f"limit_{s}_batches": (Int(0, eg=10) | Num(0, 1, eg=0.25)).nullable() for s in ("train", "val", "test", "predict")},
    "val_check_interval": (Int(1, eg=100) | Num(0, 1, lo_open=True, eg=0.5)
                           | Str(eg="00:00:10:00", pattern=_TIME, form="a time DD:HH:MM:SS")).nullable(),
    "check_val_every_n_epoch": Int(1, eg=1, null=True), "overfit_batches": Int(0, eg=10) | Num(0, 1, eg=0.1),
    "fast_dev_run": Bool(eg=False) | Int(0, eg=5), "accumulate_grad_batches": Int(1, eg=1),
    "gradient_clip_val": Num(0, eg=1.0, null=True), "gradient_clip_algorithm": Choice("norm", "value", null=True),
    "devices": Int(1, eg=1) | Choice(-1, "auto") | List(Int(0, eg=0), eg=[0, 1])
    | Str(eg="0,1", pattern=r"\d+(,\d+)*,?", form="a device list like '0,1'"),
    "num_nodes": Int(1, eg=1), "log_every_n_steps": Int(0, eg=50, null=True),
    "num_sanity_val_steps": Int(-1, eg=2, null=True), "reload_dataloaders_every_n_epochs": Int(0, eg=1),
}
# Arguments train.py passes itself.
TRAINER_OWN = {"logger": "from the logger group", "callbacks": "the monitor, checkpoints and guards",
               "default_root_dir": "the run directory"}


def closest(name: str, known: Any) -> list[str]:
    """Up to three of ``known`` that ``name`` may have meant: those it begins, else the nearest."""
    return [k for k in sorted(known) if k.startswith(name) and name][:3] or \
        difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)


def unknown_key(key: str, known: Any, where: str) -> ConfigError:
    """The refusal of ``key``, not among ``known`` (the keys of ``where``), with the closest."""
    name = key.rsplit(".", 1)[-1]
    prefix = key[: -len(name)]
    close = closest(name, known)
    hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    valid = ", ".join(sorted(known)) if len(known) <= 20 else f"the arguments of {where}"
    return ConfigError(f"{key} is not a key of {where}; {hint}valid: {valid}")


def _table(key: str, keys: Mapping[str, Any], node: Any, where: str) -> None:
    """Each key of ``node`` against its declaration: a Key, a nested table, or a function that
    checks the whole subtree (a group, the trainer, probe options)."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}={node!r} must be a group of keys; valid keys: {', '.join(keys)}")
    for name, value in node.items():
        full = f"{key}.{name}" if key else str(name)
        if name in ("_target_", "_partial_", "_recursive_", "_convert_") and key:
            continue
        if name not in keys:
            raise unknown_key(full, keys, where)
        spec = keys[name]
        if isinstance(spec, Key):
            spec.check(full, value)
        elif isinstance(spec, dict):
            _table(full, spec, value, full)
        else:
            spec(full, value)


def _group(group: str, node: Any) -> None:
    node = {} if node is None else node
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if target in GROUPS[group]:  # else a user's own _target_: its signature is the check
        _table(group, GROUPS[group][target], node, f"{group} {target or '(no _target_)'}")
        _rules(group, node)


def _rules(group: str, node: Mapping) -> None:
    """Checks that read two keys of one group."""
    if group == "optimizer" and node.get("nesterov") and not node.get("momentum", 0) > 0:
        raise ConfigError(f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {node.get('momentum')!r}); "
                          "e.g. optimizer.momentum=0.9, or optimizer.nesterov=false")
    init, norm = node.get("init"), node.get("norm", "batch")
    if group == "model" and node.get("skip") is False and init in ("zero_residual", "fixup", "skipinit"):
        raise ConfigError(f"model.init={init} needs model.skip=true: without a shortcut a zeroed branch makes "
                          "every block output a constant; use model.init=default or model.init=kaiming")
    if group == "model" and init == "fixup" and node.get("_target_") in _PREACT:
        raise ConfigError(f"model.init=fixup is defined for post-activation blocks (Zhang et al. 2019), not "
                          f"{node['_target_'].rpartition('.')[2]}'s pre-activation ones; use model.init=skipinit "
                          "(De & Smith 2020 used it in pre-activation Wide ResNets) or model.init=zero_residual")
    if group == "model" and node.get("_target_") == "skipstudy.models.preact_resnet":
        _preact_depth(node.get("depth", 164), node.get("family", "cifar"), node.get("block"))
    if group == "model" and init == "fixup" and norm != "none":
        raise ConfigError(f"model.init=fixup needs model.norm=none (got model.norm={norm}): Fixup replaces "
                          "normalisation layers; with batch norm use model.init=zero_residual")


_PREACT = ("skipstudy.models.preact_resnet", "skipstudy.models.wide_resnet")
_PREACT_IMAGENET = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck"}


def _preact_depth(depth: int, family: str, block: str | None) -> None:
    """model.depth of a pre-activation ResNet against model.family and model.block."""
    if family == "imagenet":
        if depth not in _PREACT_IMAGENET:
            raise ConfigError(f"model.depth={depth} is not an ImageNet ResNet depth (model.family=imagenet); "
                              "valid: 18, 34, 50, 101, 152; e.g. model.depth=50, or model.family=cifar")
        if block not in (None, _PREACT_IMAGENET[depth]):
            raise ConfigError(f"model.block={block} does not fit model.depth={depth} (model.family=imagenet uses "
                              f"{_PREACT_IMAGENET[depth]}); e.g. model.block=null")
        return
    rules = {"basic": (6, "6n+2; the paper's: 110"), "bottleneck": (9, "9n+2; the paper's: 164, 1001")}
    chosen = block or ("bottleneck" if depth >= 164 and (depth - 2) % 9 == 0 else "basic")  # preact.cifar_block
    step, words = rules[chosen]
    if (depth - 2) % step or depth < step + 2:
        if block is None:
            raise ConfigError(f"model.depth={depth} must be 6n+2 (basic blocks) or 9n+2 >= 164 (bottlenecks) "
                              "for model.family=cifar; e.g. model.depth=110, model.depth=164 or model.depth=1001")
        raise ConfigError(f"model.depth={depth} must be {words} with model.block={block}; "
                          f"e.g. model.depth={110 if block == 'basic' else 164}")


def _from_hint(hint: Any, default: Any) -> Key | None:
    """A Key from a type annotation of lightning.Trainer (None: no value from a config fits it)."""
    eg = None if default in (None, inspect.Parameter.empty) else default
    scalar = {bool: (Bool, True), int: (Int, 1), float: (Num, 1.0), str: (Str, "auto")}.get(hint)
    if scalar is not None:
        return scalar[0](eg=scalar[1] if eg is None else eg)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return Choice(*args)
    if origin is list and args and (item := _from_hint(args[0], None)) is not None:
        return List(item, eg=[item.eg])
    if origin not in (typing.Union, types.UnionType):
        return None
    literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    parts = [Choice(*literals)] if literals else []
    parts += [k for a in args if typing.get_origin(a) is not typing.Literal and (k := _from_hint(a, default))]
    if not parts:
        return None
    key = functools.reduce(Key.__or__, parts)
    return key.nullable() if type(None) in args else key


@functools.cache
def _trainer_keys() -> dict[str, Key]:
    """Every lightning.Trainer argument: its declared range, else a Key from its type hint, else
    any value (a type no config value has, such as a callable: Lightning's own check decides)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry
    # Lightning's own class: scripts/benchmark.py swaps lightning.Trainer for a timing subclass.
    from lightning.pytorch.trainer.trainer import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    params = inspect.signature(Trainer.__init__).parameters
    ranges = {**TRAINER, "accelerator": Choice("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
              "strategy": Choice("auto", *StrategyRegistry.available_strategies())}
    anything = Key(lambda v: True, "anything", None, null=True)
    return {name: ranges.get(name) or _from_hint(hints.get(name), p.default) or anything
            for name, p in params.items() if name != "self" and name not in TRAINER_OWN}


def _trainer(key: str, node: Any) -> None:
    for name in (name for name in node or () if name in TRAINER_OWN):
        if name == "logger":
            raise ConfigError("trainer.logger: skipstudy builds the loggers from the logger group; drop trainer.logger "
                              f"and choose them with e.g. logger=[tensorboard,csv] (choices: {', '.join(LOGGERS)})")
        raise ConfigError(f"trainer.{name}: skipstudy sets {name} itself ({TRAINER_OWN[name]}); drop trainer.{name}")
    if node is not None:
        _table(key, _trainer_keys(), node, "lightning.Trainer")


def check_args(group: str, owner: object, **values: Any) -> None:
    """Arguments of a class or builder called without Hydra against its group's declaration,
    quoted as ``<group>.<name>``: ``owner`` is the ``_target_`` or an instance of it (or of a
    subclass). An owner the schema does not declare is left to its signature."""
    target = owner if isinstance(owner, str) else next(
        (t for cls in type(owner).__mro__ for t in GROUPS[group] if t and t.rpartition(".")[2] == cls.__qualname__
         and cls.__module__.startswith(t.rpartition(".")[0])), "")
    _group(group, {**values, "_target_": target})


def _plain(cfg: DictConfig, key: str) -> Any:
    try:
        value = cfg[key]
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception as err:  # noqa: BLE001 - an interpolation that cannot resolve
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None


def check(cfg: DictConfig | Mapping) -> None:
    """Refuse the first key of ``cfg`` whose value is outside its declared type or range."""
    node = {key: _plain(cfg, key) for key in cfg if key != "hydra"}
    _table("", {**TOP, **dict.fromkeys(GROUPS, _group), "trainer": _trainer}, node, "the config")
