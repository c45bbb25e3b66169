"""Bad input is refused before training: one short message naming the key, the value and the
fix, no traceback (unless HYDRA_FULL_ERROR=1), a non-zero exit, and nothing trained.

Each case runs ``python -m skipstudy.train`` as a user would, in a fresh directory: in this
process (conftest.run_in_process: the same argv, environment and working directory, without
seconds of interpreter start per case), and once as a real subprocess (the traceback case, with -m slow).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, PYTHON, REPO, SHARED_DATA, cli_env
from conftest import run_in_process

TINY = SHARED_DATA / "tiny-imagenet-mini" / "tiny-imagenet-200"
CIFAR = SHARED_DATA / "cifar10-mini" / "cifar-10-batches-py"
# Hydra's own "Could not find" error lists the group's options and its search path.
MAX_LINES = 20


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_in_process("skipstudy.train", args, cwd, env)


def run_subprocess(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "skipstudy.train", *args], cwd=cwd, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, cwd: Path, *expected: str) -> None:
    err = proc.stderr
    assert proc.returncode != 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= MAX_LINES, err
    for text in expected:
        assert text in err, f"{text!r} not in stderr:\n{err}"
    # Nothing trained, and a refused start leaves no run directory behind.
    assert not list(cwd.rglob("events.out.tfevents.*")), sorted(cwd.rglob("*"))
    assert not list(cwd.rglob("*.ckpt"))
    assert not list(cwd.rglob("run_info.json"))
    logs = cwd / "logs"  # nor an empty folder where the run would have gone
    assert not [d for d in [logs, *logs.rglob("*")] if d.is_dir() and not any(d.iterdir())], sorted(cwd.rglob("*"))


def small_tiny_imagenet(dest: Path) -> Path:
    """Two classes of the shared Tiny ImageNet subset, 4 training and 2 val images each."""
    if not TINY.is_dir():
        pytest.skip(f"real data subsets not found at {SHARED_DATA}")
    root = dest / "tiny-imagenet-200"
    wnids = TINY.joinpath("wnids.txt").read_text().split()[:2]
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    root.joinpath("wnids.txt").write_text("\n".join(wnids) + "\n")
    shutil.copy(TINY / "words.txt", root / "words.txt")
    for wnid in wnids:
        images = sorted((TINY / "train" / wnid / "images").glob("*.JPEG"))[:4]
        (root / "train" / wnid / "images").mkdir(parents=True)
        for p in images:
            shutil.copy(p, root / "train" / wnid / "images" / p.name)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{p.name}\t0\t0\t63\t63\n" for p in images))
    val = [line for line in (TINY / "val" / "val_annotations.txt").read_text().splitlines()
           if line.split("\t")[1] in wnids][:4]
    for line in val:
        shutil.copy(TINY / "val" / "images" / line.split("\t")[0], root / "val" / "images")
    (root / "val" / "val_annotations.txt").write_text("\n".join(val) + "\n")
    return dest


# (overrides, texts stderr must hold): the key, the value, and the choices or the fix.
CASES = {
    "unknown model": (["model=resnet51"], ["model=resnet51 is not an option of model", "resnet50", "resnet18"]),
    "unknown dataset": (["dataset=imagenet"], ["dataset=imagenet", "cifar10", "tiny_imagenet"]),
    "unknown optimizer": (["optimizer=adamw"], ["optimizer=adamw", "did you mean optimizer=adam?", "sgd"]),
    "wrong type": (["model.skip=maybe"], ["model.skip='maybe'", "true or false"]),
    "wrong trainer type": (["trainer.max_epochs=ten"], ["trainer.max_epochs='ten'", "integer"]),
    "invalid depth": (["model=cifar_resnet", "model.depth=21"], ["model.depth=21", "6n+2", "20, 32, 44"]),
    "unknown monitor layer": (["monitor.layers=[block1.conv9]"], ["monitor.layers", "block1.conv9", "block1.conv1"]),
    "zero lr": (["optimizer.lr=0"], ["optimizer.lr=0", "positive", "optimizer.lr=0.1"]),
    "negative lr": (["optimizer.lr=-1"], ["optimizer.lr=-1", "positive"]),
    "zero batch size": (["dataset.batch_size=0"], ["dataset.batch_size=0", "positive", "dataset.batch_size=64"]),
    "image too small": (["model=resnet50", "dataset.image_size=16", "monitor=off"],
                        ["dataset.image_size=16", "too small", ">= 32"]),
    "bad on_nonfinite": (["monitor=off", "monitor.on_nonfinite=maybe"], ["monitor.on_nonfinite='maybe'", "warn, stop"]),
    "resume missing": (["resume=/nonexistent/run"], ["resume=/nonexistent/run", "does not exist", ".hydra/"]),
}


# Misspelt keys and options, in every group: one line with the closest valid names, exit status 2,
# never Hydra's "To append to your config use +model.skp=false" (which advises the wrong fix).
TYPOS = {
    "model.skp=false": "did you mean model.skip?",
    "optimizer.lrr=0.1": "did you mean optimizer.lr?",
    "dataset.batchsize=8": "did you mean dataset.batch_size?",
    "monitor.every_n_step=2": "did you mean monitor.every_n_steps?",
    "scheduler=cosin": "did you mean scheduler=cosine?",
    "experiment=quickstrat": "did you mean experiment=quickstart?",
    "model=resnet_50": "did you mean model=resnet50",
    "checkpoint.save_lst=false": "did you mean checkpoint.save_last",
    "fast.compiled=true": "did you mean fast.compile?",
    "trainer.max_stepz=3": "did you mean trainer.max_steps",
    "paths.logdir=/tmp": "did you mean paths.log_dir?",
}


@pytest.mark.parametrize("typo", list(TYPOS))
def test_a_misspelt_key_or_option_is_one_line_naming_the_closest(typo, tmp_path):
    proc = run_cli([*FAST, typo], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"Error: {typo.split('=')[0]}"), proc.stderr
    assert TYPOS[typo] in lines[0] and "+" not in lines[0], proc.stderr
    assert_refused(proc, tmp_path)


def test_a_refused_start_with_its_run_directory_in_the_working_directory_leaves_that_directory(tmp_path):
    """hydra.run.dir=run in an empty folder: the refused run's directory goes, the folder the user
    works in (now empty again) stays."""
    work = tmp_path / "work"
    work.mkdir()
    proc = run_subprocess(["hydra.run.dir=run", "optimizer.lr=-1"], work)
    assert proc.returncode == 2, proc.stderr
    assert work.is_dir() and not any(work.iterdir())


def test_a_misspelt_key_after_a_flag_without_a_value_is_refused(tmp_path):
    """``--resolve`` (beside ``--cfg``) takes no value: the override after it is still checked."""
    from skipstudy import overrides
    from skipstudy.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.skp is not a key of model; did you mean model\.skip\?"):
        overrides.check(["--cfg", "job", "--resolve", "model.skp=false"], "train")


def _misspelt(name: str) -> str:
    """A short name with its last letter twice (lr -> lrr), a longer one with its last letter changed."""
    return name + name[-1] if len(name) <= 3 else name[:-1] + ("z" if name[-1] != "z" else "y")


def _leaves(node, prefix: str):
    for k, v in node.items():
        if not str(k).startswith("_"):
            yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]


def _refusal(args: list[str], config_name: str, tmp_path) -> str:
    """What the entry point says to ``args``: overrides.check, else (keys Hydra lets through, as
    the open trainer node does) the composed config's check."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from skipstudy import config, overrides
    from skipstudy.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        overrides.check(args, config_name)
        config.check(OmegaConf.to_container(compose_cfg(args, tmp_path), resolve=False)
                     if config_name == "train" else None)
    return str(err.value)


def test_every_group_refuses_each_misspelt_option_and_key_in_one_line(tmp_path):
    """Every option of every group (Hydra's own list: yaml files, stored nodes, plugins'), and every
    key of every group's default option, misspelt: one line naming the closest, no `+` advice."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = {g: loader.get_group_options(g) for g in [*loader.list_groups(""), "hydra/launcher"] if g != "hydra"}
        cfg = compose("probe", overrides=[])
    GlobalHydra.instance().clear()
    assert {"model", "optimizer", "experiment", "logger", "probe", "hydra/launcher"} <= groups.keys(), groups
    checked = 0
    for group, options in groups.items():
        app = "probe" if group == "probe" else "train"
        for option in options:
            msg = _refusal([f"{group}={_misspelt(option)}"], app, tmp_path)
            assert msg.startswith(f"{group}={_misspelt(option)} is not an option of {group}; did you mean"), msg
            assert f"{group}={option}" in msg.split("valid:")[0] and "\n" not in msg, msg
            checked += 1
        if group in ("experiment", "hydra/launcher"):
            continue  # presets and launchers set other groups' keys
        for key in _leaves(cfg[group], f"{group}."):
            parent, _, name = key.rpartition(".")
            typo = f"{parent}.{_misspelt(name)}"
            msg = _refusal([f"{typo}=1"], app, tmp_path)
            assert msg.startswith(f"{typo} is not a key of ") and "did you mean" in msg, msg
            assert key in msg.split("valid:")[0] and "+" not in msg and "\n" not in msg, msg
            checked += 1
    for key in [k for k in _leaves(cfg, "") if k.split(".")[0] not in groups and k.split(".")[0] != "hydra"]:
        parent, _, name = key.rpartition(".")
        typo = f"{parent}.{_misspelt(name)}" if parent else _misspelt(name)
        msg = _refusal([f"{typo}=1"], "probe", tmp_path)
        assert msg.startswith(f"{typo} is not a key of ") and key in msg.split("valid:")[0], msg
        checked += 1
    assert checked > 100, checked


def test_a_sweep_with_a_misspelt_key_is_refused_before_its_first_job(tmp_path):
    # The key exists only in one of the swept models: known when any job of the sweep has it.
    proc = run_cli(["-m", *FAST, "model=mini,cifar_resnet", "model.depth=8", "model.skp=true,false"], tmp_path)
    assert proc.returncode == 2 and "model.skp is not a key of model; did you mean model.skip?" in proc.stderr
    assert_refused(proc, tmp_path)
    assert not list(tmp_path.rglob("multirun.yaml"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_training(case, tmp_path):
    overrides, expected = CASES[case]
    # FAST first, so the case's own overrides win over its defaults.
    assert_refused(run_cli([*FAST, *overrides], tmp_path), tmp_path, *expected)


def test_resume_of_something_that_is_not_a_run_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    assert_refused(run_cli([f"resume={tmp_path / 'notes.txt'}"], tmp_path), tmp_path, "resume=", "is a file")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli([f"resume={tmp_path / 'empty'}"], tmp_path), tmp_path, "resume=", "not a run directory")


def test_missing_data_directory(tmp_path):
    proc = run_cli([*FAST[:4], "dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}", "dataset.download=false"],
                   tmp_path)
    assert_refused(proc, tmp_path, "dataset.root=", "does not exist", "dataset=synthetic")


@pytest.mark.slow
def test_incomplete_data_directory(tmp_path, shared_data):
    partial = tmp_path / "data" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    shutil.copy(CIFAR / "data_batch_1", partial)
    proc = run_cli([*FAST[:4], "dataset=cifar10", f"dataset.root={partial.parent}", "dataset.download=false"], tmp_path)
    assert_refused(proc, tmp_path, "dataset.root=", "MD5")

    root = small_tiny_imagenet(tmp_path / "tin")
    shutil.rmtree(root / "tiny-imagenet-200" / "val")
    proc = run_cli([*FAST[:4], "dataset=tiny_imagenet", f"dataset.root={root}"], tmp_path)
    assert_refused(proc, tmp_path, "dataset.root=", "val", "Fix:")


@pytest.mark.slow
def test_corrupt_image(tmp_path, shared_data):
    root = small_tiny_imagenet(tmp_path / "tin")
    bad = sorted((root / "tiny-imagenet-200" / "train").rglob("*.JPEG"))[0]
    bad.write_bytes(b"\xff\xd8 this is no JPEG" * 20)
    proc = run_cli([*FAST[:4], "dataset=tiny_imagenet", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}"],
                   tmp_path)
    assert_refused(proc, tmp_path, "corrupt", bad.name, "dataset.skip_corrupt=true")


@pytest.mark.slow  # a real subprocess: seconds of interpreter start and imports
def test_full_error_shows_the_traceback(tmp_path):
    proc = run_subprocess([*FAST, "model.skip=maybe"], tmp_path, {"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "model.skip='maybe'" in proc.stderr


def test_readme_typo_examples_print_what_the_readme_shows(tmp_path):
    readme = (REPO / "README.md").read_text()
    examples = re.findall(r"^\$ python -m skipstudy\.train (\S+)\n(Error: .*)$", readme, flags=re.M)
    assert len(examples) == 2, examples
    for override, shown in examples:
        proc = run_cli([override], tmp_path)
        pattern = ".*".join(re.escape(part) for part in shown.split("..."))
        assert proc.returncode == 2 and re.fullmatch(pattern, proc.stderr.strip()), (shown, proc.stderr)
