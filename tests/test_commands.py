"""The installed commands ``skipstudy-train``, ``skipstudy-probe`` and ``skipstudy-report``
(pyproject's ``[project.scripts]``) do what their ``python -m`` forms do."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path


from conftest import PYTHON, REPO, cli_env

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# pip's console-script wrapper (what <venv>/bin/skipstudy-* holds) for an entry point
# `module:function`, run once per call below inside one interpreter (torch imports once).
WRAPPER = ("from {module} import {function}\n"
           "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\nsys.exit({function}())")
DRIVER = """
import contextlib, io, re, sys
for name, code, args in CALLS:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [name, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(code, {"re": re, "sys": sys, "__name__": "__main__"})
            status = 0
        except SystemExit as e:
            status = e.code or 0
    print(repr((name, status, out.getvalue(), err.getvalue())))
"""


def run_scripts(calls: list[tuple[str, list[str]]], cwd: Path) -> list[tuple[str, int, str, str]]:
    """Each ``(command, args)`` as pip installs the command: the wrapper around pyproject's entry
    point, from this checkout (the shared environment may hold an older install)."""
    wrapped = [(name, WRAPPER.format(module=SCRIPTS[name].split(":")[0], function=SCRIPTS[name].split(":")[1]), args)
               for name, args in calls]
    proc = subprocess.run([PYTHON, "-c", f"CALLS = {wrapped!r}\n{DRIVER}"], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("(")]


def test_the_three_commands_are_declared():
    assert SCRIPTS == {"skipstudy-train": "skipstudy.train:main", "skipstudy-probe": "skipstudy.probe:main",
                       "skipstudy-report": "skipstudy.report:main"}


def test_each_command_answers_help_and_the_report_names_a_missing_folder(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    results = run_scripts([("skipstudy-train", ["--help"]), ("skipstudy-probe", ["--help"]),
                           ("skipstudy-report", ["--help"]), ("skipstudy-report", [missing])], tmp_path)
    (_, *train), (_, *probe), (_, *report), (_, *refused) = results
    assert train[:1] == [0] and "dataset: cifar10, cifar100, synthetic, tiny_imagenet" in train[1]
    assert probe[:1] == [0] and "probe: feature_maps, grad_snr, hessian" in probe[1]
    assert report[:1] == [0] and "RUN_OR_SWEEP_DIR" in report[1]
    assert refused[0] == 2 and refused[2].startswith(f"Error: {missing} does not exist")


def test_installed_commands_match_the_entry_points():
    """Where this environment's install already has them (a `pip install -e .` after the entry
    points were added), the scripts beside the interpreter call the declared functions."""
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
                 if ep.dist is not None and ep.dist.name == "skipstudy"}
    assert installed.get("skipstudy-train") == SCRIPTS["skipstudy-train"]
    for name, value in installed.items():
        assert SCRIPTS.get(name) == value
        script = Path(sys.executable).parent / name
        assert script.is_file(), script
        module, function = value.split(":")
        assert f"from {module} import {function}" in script.read_text()
