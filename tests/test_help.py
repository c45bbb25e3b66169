"""``--help`` of each Hydra command lists exactly the config groups a user of that command
chooses from, each with every option its folder in ``conf/`` holds, and nothing internal."""

from __future__ import annotations

import subprocess

from conftest import CONF_DIR, PYTHON, cli_env

# The probe command composes train.yaml, but a probe reads only the network and its data.
PROBE_GROUPS = {"dataset", "model", "probe"}


def folder_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def listed_groups(stdout: str) -> dict[str, list[str]]:
    """The ``group: option, ...`` lines of Hydra's help, between its two headings."""
    head, sep, _ = stdout.partition("== Config ==")
    assert sep and "== Configuration groups ==" in head, stdout
    lines = head.split("(group=option)", 1)[1].strip().splitlines()
    return {g: o.split(", ") for g, o in (line.split(": ", 1) for line in lines if line.strip())}


def test_each_command_help_lists_exactly_its_groups(tmp_path):
    # Both at once: each is a real interpreter start and a composition (seconds on 2 cores).
    procs = {app: subprocess.Popen([PYTHON, "-m", f"skipstudy.{app}", "--help"], cwd=tmp_path, env=cli_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for app in ("train", "probe")}
    out = {}
    for app, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[app] = stdout

    # Every folder of conf/ is one of train's groups, except the probe command's and Hydra's own.
    folders = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml"))}
    train_groups = folders - {"probe", "hydra"}
    assert {"dataset", "model", "optimizer", "scheduler", "trainer", "monitor", "logger", "experiment"} <= train_groups
    assert listed_groups(out["train"]) == {g: folder_options(g) for g in train_groups}
    assert listed_groups(out["probe"]) == {g: folder_options(g) for g in PROBE_GROUPS}
    for app, text in out.items():
        # Internal nodes (no `paths` group either: the equalities above): the open Trainer node,
        # each option's defaults node.
        choices = text.split("== Config ==")[0]
        assert "skipstudy_open_node" not in text and "lightning" not in choices, app
        assert "skipstudy.models.options" not in choices, app
        # The composed config follows, as Hydra prints it.
        assert "\npaths:\n  log_dir: ./logs\n" in text and text.rstrip().endswith("Use --hydra-help to view Hydra specific help")
    assert "\nprobe:\n" in out["probe"] and "\nprobe:\n" not in out["train"]
