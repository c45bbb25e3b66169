"""The declared schema (skipstudy/config.py): every key of every config group refuses a wrong
type and an out-of-range value in one line that names the key, the value, the valid range and
an example whose value the schema accepts; damaged inputs name the file.

Most cases call ``config.check`` on configs composed with Hydra's compose API (milliseconds
each); a few run the real command lines for the exit status, stderr and the run directory.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, FAST, PYTHON, SHARED_DATA, cli_env, compose_cfg
from conftest import run_in_process
from skipstudy import config
from skipstudy.keys import field_schema
from skipstudy.probes.options import PROBE_OPTIONS
from skipstudy.runs import dirs as runs
from skipstudy.errors import ConfigError

GROUPS = ("dataset", "model", "optimizer", "scheduler", "monitor", "trainer")


def leaves(node, prefix=""):
    """Dotted keys of every leaf of ``node`` (lists and nulls are leaves too)."""
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key.startswith("_") and key.endswith("_"):
            continue
        if isinstance(value, dict) and value:
            yield from leaves(value, full + ".")
        else:
            yield full


def spec_of(cfg, key: str) -> dict | None:
    """The JSON schema of ``key``'s declared field in ``cfg``, found as config.check finds it
    (None for a Trainer argument: its range is Lightning's to check)."""
    group, _, rest = key.partition(".")
    if group == "trainer":
        return None
    if group in config.GROUPS:
        model = config.GROUPS[group][cfg[group].get("_target_")]
    elif group == "probe":
        model = PROBE_OPTIONS[cfg["probe"]["name"]]
    else:
        model, rest = config.Top, key
    *parents, last = rest.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return field_schema(model, last)


def bad_range(schema: dict):
    """A value of the declared type outside the declared range (None: the type is the range)."""
    if "bad" in schema:
        return schema["bad"]
    for part in schema.get("anyOf", [schema]):
        if "enum" in part or "const" in part:
            return "nosuch"
        if part.get("type") == "array" and (item := bad_range(part.get("items", {}))) is not None:
            return [item]
        for bound, step in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1), ("exclusiveMaximum", 0)):
            if bound in part:
                return part[bound] + step
    return None


def get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def wrong_type(value):
    """A value of another type than the yaml's, as a CLI override could give it."""
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return "abc"
    if isinstance(value, str):
        return [["x"]]
    if isinstance(value, list):
        return "abc"
    return {"a": [1]}  # a null default: no scalar or list takes a mapping


def with_value(cfg: dict, key: str, value) -> dict:
    """A copy of the plain config ``cfg`` with ``key`` set to ``value``."""
    out = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def assert_one_line_refusal(cfg: dict, key: str, value) -> None:
    with pytest.raises(ConfigError) as err:
        config.check(with_value(cfg, key, value))
    if str(err.value).startswith("trainer: "):  # Lightning's words, on one line
        assert "\n" not in str(err.value) and key.split(".", 1)[1] in str(err.value), (key, value, err.value)
        return
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{key}="), (key, value, msg)
    assert "; e.g. " in msg, msg
    # The example fix is itself accepted.
    fix = msg.rsplit("; e.g. ", 1)[1]
    assert fix.startswith(f"{key}="), msg
    config.check(with_value(cfg, key, _parse(fix.split("=", 1)[1])))


def _parse(text: str):
    """An override value as Hydra parses it (``0.9`` -> float, ``[0,1]`` -> list, ``true`` -> bool)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def plain(cfg) -> dict:
    """The config as the app gets it (no ``hydra`` node), resolved into plain dicts and lists:
    cheap to copy hundreds of times."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def option_configs(tmp_path):
    """Composed configs that together hold every option of every group (the i-th option of each
    group in the i-th config: few composes), each with the group keys it covers."""
    options = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in GROUPS}
    for i in range(max(map(len, options.values()))):
        chosen = {group: names[i] for group, names in options.items() if i < len(names)}
        cfg = plain(compose_cfg([f"{group}={name}" for group, name in chosen.items()], tmp_path))
        yield cfg, [f"{group}.{k}" for group in chosen for k in leaves(cfg[group])]


def test_every_key_of_every_group_refuses_a_wrong_type_and_an_out_of_range_value(tmp_path):
    checked = 0
    configs = list(option_configs(tmp_path))
    for cfg, keys in configs:
        config.check(cfg)  # every shipped option is valid as it stands
        for key in keys:
            assert_one_line_refusal(cfg, key, wrong_type(get(cfg, key)))
            spec = spec_of(cfg, key)
            if spec is not None and bad_range(spec) is not None:
                assert_one_line_refusal(cfg, key, bad_range(spec))
            checked += 1
    cfg = configs[0][0]  # the keys outside the groups
    for key in leaves({k: v for k, v in cfg.items() if k not in GROUPS}):
        if key.startswith("probes.options"):
            continue
        assert_one_line_refusal(cfg, key, wrong_type(get(cfg, key)))
        if bad_range(spec_of(cfg, key)) is not None:
            assert_one_line_refusal(cfg, key, bad_range(spec_of(cfg, key)))
        checked += 1
    assert checked > 150


def test_every_probe_option_is_declared_and_checked(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for yaml in sorted((CONF_DIR / "probe").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = plain(compose("probe", overrides=[f"probe={yaml.stem}", f"paths.log_dir={tmp_path}"]))
        config.check(cfg)
        for key in leaves(cfg["probe"], "probe."):
            if key == "probe.name":
                continue
            assert_one_line_refusal(cfg, key, wrong_type(get(cfg, key)))
            if bad_range(spec_of(cfg, key)) is not None:
                assert_one_line_refusal(cfg, key, bad_range(spec_of(cfg, key)))
        # In training the same options live under probes.options.<name>.
        train_cfg = compose_cfg([f"+probes.options.{yaml.stem}.batches=0"], tmp_path)
        with pytest.raises(ConfigError, match=rf"probes.options.{yaml.stem}.batches=0 must be a positive integer"):
            config.check(train_cfg)
    GlobalHydra.instance().clear()


# (overrides, the one line). The cases first.
CASES = {
    "momentum above 1": (["optimizer.momentum=1.5"],
                         "optimizer.momentum=1.5 must be a number in [0, 1); e.g. optimizer.momentum=0.9"),
    "milestones not numbers": (["scheduler=multistep", "scheduler.milestones=[a,b]"],
                               "scheduler.milestones=['a', 'b'] must be a list of values, each a positive integer; "
                               "e.g. scheduler.milestones=[100,150]"),
    "negative weight decay": (["optimizer.weight_decay=-1"],
                              "optimizer.weight_decay=-1 must be a number >= 0; e.g. optimizer.weight_decay=0.0005"),
    "seed not a number": (["seed=abc"], "seed='abc' must be an integer in [0, 4294967295]; e.g. seed=0"),
    "typo in a group key": (["+optimizer.momentun=0.9"],
                            "optimizer.momentun is not a key of optimizer torch.optim.SGD; did you mean "
                            "optimizer.momentum? valid: fused, lr, momentum, nesterov, weight_decay"),
    "typo in a trainer key": (["trainer.max_epoch=3"],
                              "trainer.max_epoch is not a key of lightning.Trainer; did you mean trainer.max_epochs"),
    "trainer type from Lightning's signature": (["trainer.enable_checkpointing=maybe"],
                                               "trainer.enable_checkpointing='maybe' must be true or false or null"),
    # The ranges of trainer.* are Lightning's, its refusal on one line.
    "trainer range": (["trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer or -1. You passed in -5."),
    # Lightning checks it only when fit starts; refused up front with its own check.
    "accumulation factor": (["trainer.accumulate_grad_batches=0"],
                            "trainer.accumulate_grad_batches=0: Accumulation factor should be an int greater than 0. "
                            "Got [0]. e.g. trainer.accumulate_grad_batches=1"),
    "trainer choice from Lightning's registry": (["trainer.accelerator=gpus"],
                                                 "trainer: You selected an invalid accelerator name: `accelerator='gpus'`"),
    "trainer argument skipstudy sets": (["trainer.callbacks=null"], "trainer.callbacks: skipstudy sets callbacks itself"),
    "loggers through the trainer": (["trainer.logger=false"],
                                    "trainer.logger: skipstudy builds the loggers from the logger group; drop "
                                    "trainer.logger and choose them with e.g. logger=[tensorboard,csv]"),
    "loggers without tensorboard": (["logger=csv"], "logger=[csv] leaves out tensorboard, the run's own record"),
    "logger option typo": (["logger=[tensorboard,wandb]", "+logger.wandb.ofline=true"],
                           "logger.wandb.ofline is not a key of logger wandb; did you mean logger.wandb.offline?"),
    "nesterov without momentum": (["optimizer.momentum=0", "optimizer.nesterov=true"],
                                  "optimizer.nesterov=true needs optimizer.momentum > 0"),
    "top-level typo": (["+sed=1"], "sed is not a key of the config; did you mean seed?"),
    "depth not 6n+2": (["model=cifar_resnet", "model.depth=21"], "model.depth=21 must be 6n+2 >= 8; the paper's: 20, 32, 44, 56, 110, 1202; e.g. model.depth=20"),
    "fixup with batch norm": (["model.init=fixup"], "model.init=fixup needs model.norm=none (got model.norm=batch)"),
    "zeroed branch without a shortcut": (["model.skip=false", "model.init=skipinit"],
                                         "model.init=skipinit needs model.skip=true"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_are_refused_in_one_line(case, tmp_path):
    overrides, expected = CASES[case]
    with pytest.raises(ConfigError) as err:
        config.check(compose_cfg(overrides, tmp_path))
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_any_lightning_trainer_argument_without_plus(tmp_path):
    cfg = compose_cfg(["trainer.enable_checkpointing=false", "trainer.inference_mode=false",
                       "trainer=ddp", "trainer.min_steps=3"], tmp_path)
    assert cfg.trainer.enable_checkpointing is False and cfg.trainer.min_steps == 3 and cfg.trainer.strategy == "ddp"
    config.check(cfg)
    # Everywhere else a typo still needs no `+` to be caught: Hydra refuses unknown keys.
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["optimizer.momentun=0.9"], tmp_path)


def test_readme_trainer_argument_line(tmp_path):
    """The README's ``trainer.enable_checkpointing=false`` line trains and writes no checkpoint."""
    from test_readme import readme_commands

    from skipstudy.train import train

    line = next(c for c in readme_commands() if "trainer.enable_checkpointing=false" in c)
    cfg = compose_cfg([*line.split()[3:], *FAST, "monitor=off"], tmp_path)
    assert cfg.trainer.enable_checkpointing is False
    metrics = train(cfg, cfg.hydra.runtime.output_dir)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    assert "val/acc" in metrics and list(run_dir.glob("events.out.tfevents.*"))
    assert not (run_dir / "checkpoints").exists()


def test_resume_takes_a_new_trainer_argument_and_checks_it(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = compose_cfg([], tmp_path)
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved.pop("hydra")
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    fresh = compose_cfg([f"resume='{run_dir}'"], tmp_path / "fresh")
    resumed = runs.resume_config(fresh, [f"resume='{run_dir}'", "trainer.enable_checkpointing=false"])
    assert resumed.trainer.enable_checkpointing is False
    with pytest.raises(ConfigError, match=r"^trainer: `max_epochs` must be a non-negative integer or -1"):
        config.check(runs.resume_config(fresh, [f"resume='{run_dir}'", "trainer.max_epochs=-5"]))


def test_a_damaged_last_checkpoint_is_named(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    import torch

    torch.save({"state_dict": {"net.w": torch.ones(1000)}, "global_step": 3}, ckpt_dir / "last.ckpt")
    assert runs.last_checkpoint(tmp_path) == ckpt_dir / "last.ckpt"
    data = (ckpt_dir / "last.ckpt").read_bytes()
    (ckpt_dir / "last.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ConfigError, match=rf"resume={tmp_path}: {ckpt_dir / 'last.ckpt'} is damaged "
                                          rf"\({len(data) // 2} bytes; BadZipFile"):
        runs.last_checkpoint(tmp_path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # one byte of a tensor changed in place
    (ckpt_dir / "last.ckpt").write_bytes(bytes(flipped))
    shutil.copy(ckpt_dir / "last.ckpt", ckpt_dir / "best-0-3.ckpt")
    with pytest.raises(ConfigError, match=r"fails its CRC check\); copy another checkpoint over it \(best-0-3.ckpt\)"):
        runs.last_checkpoint(tmp_path)


CIFAR = SHARED_DATA / "cifar10-mini" / "cifar-10-batches-py"


@pytest.mark.parametrize("verify", [True, False])
def test_a_truncated_cifar_batch_is_named(shared_data, tmp_path, verify):
    from skipstudy.data.cifar import CIFAR10DataModule

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR, folder)
    bad = folder / "data_batch_3"
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ConfigError) as err:
        CIFAR10DataModule(root=str(tmp_path), download=False, verify=verify, num_workers=0).prepare_data()
    first = str(err.value).splitlines()[0]
    if verify:  # the mini copy's sums all differ from the release: the first file is named
        assert f"{folder / 'data_batch_1'} (881250 bytes) differs from the release's MD5 sum" in first
    else:
        assert f"{bad} (5000 bytes) cannot be read (UnpicklingError: pickle data was truncated)" in first
    bad.unlink()
    with pytest.raises(ConfigError, match=f"{bad} is missing"):
        CIFAR10DataModule(root=str(tmp_path), download=False, verify=verify, num_workers=0).prepare_data()


def event_run(path: Path, steps: int = 40) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for i in range(steps):
            writer.add_scalar("train/loss", 1.0 / (i + 1), i)
    return next(path.glob("events.out.tfevents.*"))


def test_report_names_damaged_event_files(tmp_path, capsys):
    from skipstudy.report import main

    good, cut, flipped = (event_run(tmp_path / name) for name in ("good", "cut", "flipped"))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 7])  # a run killed mid-write: no complaint
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert main([str(tmp_path / "good"), str(tmp_path / "cut"), str(tmp_path / "flipped"), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"note: {re.escape(str(flipped))}: damaged \({len(data)} bytes; a record fails its "
                     r"(header|event) CRC check; the \d+ values before it are used\)", err), err
    assert str(cut) not in err and str(good) not in err
    garbage = event_run(tmp_path / "garbage")
    garbage.write_bytes(b"not an event file" * 20)
    assert main([str(tmp_path / "garbage"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"Error: {garbage}: damaged (340 bytes; a record fails its header CRC check; nothing before it); "
                   "replace it from a backup, or pass runs whose event files are intact")
    assert not (tmp_path / "r2").exists()


# -- a few real command lines: exit status 2, one line on stderr, nothing left behind -----

def run_cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


def assert_cli_refused(proc, cwd: Path, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"Error: {expected}"), proc.stderr
    assert not any(cwd.rglob("*.yaml")) and not any(cwd.rglob("events.out.tfevents.*")), sorted(cwd.rglob("*"))


def test_cli_train_refuses_a_bad_value(tmp_path):
    assert_cli_refused(run_cli("skipstudy.train", [*FAST, "seed=abc"], tmp_path), tmp_path, "seed='abc' must be")


def test_cli_sweep_refuses_a_bad_job_before_the_first_job(tmp_path):
    proc = run_cli("skipstudy.train", ["-m", *FAST, "optimizer.momentum=0.9,1.5"], tmp_path)
    assert_cli_refused(proc, tmp_path, "optimizer.momentum=1.5 must be a number in [0, 1)")
    assert "(sweep job " in proc.stderr and not (tmp_path / "logs").exists()


def test_cli_probe_refuses_a_bad_value(tmp_path):
    proc = run_in_process("skipstudy.probe", ["probe=landscape", "probe.grid=4", "paths.log_dir=logs"], tmp_path)
    assert_cli_refused(proc, tmp_path, "probe.grid=4 must be an odd integer >= 3 (the centre is the checkpoint); e.g. probe.grid=21")


def test_cli_resume_names_a_damaged_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = compose_cfg([*FAST], tmp_path / "compose")
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved.pop("hydra")
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    proc = run_in_process("skipstudy.train", [f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"Error: resume={run_dir}: {run_dir / 'checkpoints' / 'last.ckpt'} is damaged (14 bytes; BadZipFile: "
        "File is not a zip file); move it away to start the run over"]
    assert not list(run_dir.rglob("events.out.tfevents.*")) and not (run_dir / "run_info.json").exists()


def test_each_default_lives_in_one_place():
    """A group option's yaml takes its keys and defaults from the option's declared model (its
    defaults list names the model's node) and sets only what it wires or changes."""
    checked = 0
    for group in ("dataset", "model", "optimizer", "scheduler", "monitor", "probe"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
            models = PROBE_OPTIONS if group == "probe" else config.GROUPS[group]
            model = models[raw.get("name") if group == "probe" else raw.get("_target_")]
            if not model.model_fields:  # scheduler=none: no keys
                continue
            assert raw["defaults"][0] == f"/{model.__module__}.{model.__name__}@_here_", path
            for name, value in raw.items():
                if name in ("defaults", "name", *config.HYDRA_KEYS):
                    continue
                field = model.model_fields[name]
                assert str(value).startswith("${") or field.is_required() or value != field.default, (path, name)
                checked += 1
    assert checked >= 4  # the wiring left: data roots, the cache directory, T_max
