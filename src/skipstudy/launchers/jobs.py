"""A sweep job as a single run: the command line that runs it in a fresh process, and the
one-line reason a failed job gives.

Two places run a job of a Hydra multirun in a process of its own:

- the ``pool`` launcher runs every job that way (parallel jobs, one GPU each);
- ``skipstudy.train`` hands a job over to a fresh process when the job needs Lightning's
  DDP processes (see :mod:`skipstudy.launchers.ddp`).

In both cases the job becomes exactly the command a user could type to rerun it alone:
``python -m skipstudy.train <the job's overrides> hydra.mode=RUN hydra.run.dir=<job dir>``.
A single run's ``sys.argv`` holds only that job, so anything that re-executes ``sys.argv``
(Lightning's DDP launcher does, for ranks > 0) reruns that job and not the whole sweep.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Command-line options of a Hydra app that are not overrides but still shape the job's config;
# each takes a value, as the next argument or after "=".
_HYDRA_VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_MULTIRUN_FLAGS = ("-m", "--multirun")

# Hydra overrides that describe the sweep (its launcher, sweeper, directory, mode) rather than
# the job; the single run gets its own values for them instead.
_SWEEP_KEYS = re.compile(
    r"^(hydra/launcher|hydra\.launcher(\..*)?|hydra/sweeper|hydra\.sweeper(\..*)?|hydra\.sweep(\..*)?"
    r"|hydra\.run(\..*)?|hydra\.mode|hydra\.job\.(num|id)|hydra\.callbacks\.skipstudy_pool_return(\..*)?)$"
)


def program_prefix(argv: Sequence[str] | None = None, orig_argv: Sequence[str] | None = None) -> list[str]:
    """The interpreter command that started this process, without the app's own arguments.

    ``python -m skipstudy.train a=1`` gives ``[python, -m, skipstudy.train]``, a script or
    console entry point ``[python, /path/script]``, and ``python -c CODE`` ``[python, -c, CODE]``:
    ``sys.orig_argv`` (Python >= 3.10) ends with the same arguments as ``sys.argv[1:]``.
    """
    argv = list(sys.argv if argv is None else argv)
    orig = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    n_args = len(argv) - 1
    if len(orig) > n_args and orig[len(orig) - n_args:] == argv[1:]:
        prefix = orig[: len(orig) - n_args]
        # orig_argv[0] may be a bare "python" resolved through PATH; the running interpreter is exact.
        return [sys.executable, *prefix[1:]]
    return [sys.executable, argv[0]]


def forwarded_flags(argv: Sequence[str] | None = None) -> list[str]:
    """The ``--config-dir``/``--config-name``/``--config-path`` options of this process's command
    line (``-m``/``--multirun`` and all overrides left out)."""
    argv = list(sys.argv if argv is None else argv)[1:]
    kept: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _HYDRA_VALUE_FLAGS and i + 1 < len(argv):
            kept += [arg, argv[i + 1]]
            i += 2
            continue
        if any(arg.startswith(flag + "=") for flag in _HYDRA_VALUE_FLAGS):
            kept.append(arg)
        i += 1
    return kept


def override_key(override: str) -> str:
    """``+hydra.launcher.workers=2`` -> ``hydra.launcher.workers``; ``hydra/launcher=pool`` ->
    ``hydra/launcher``."""
    key = override.split("=", 1)[0].strip()
    key = key.lstrip("+~")
    return key.split("@", 1)[0]


def job_hydra_overrides(hydra_overrides: Iterable[str]) -> list[str]:
    """The sweep's Hydra overrides that still matter to one of its jobs run alone (logging,
    verbosity, job config); those of the launcher, sweeper, sweep directory and mode go."""
    return [o for o in hydra_overrides if not _SWEEP_KEYS.match(override_key(o))]


def quote(value: str) -> str:
    """``value`` as a Hydra quoted string, so ``=``, ``,`` and spaces in a path stay literal."""
    # Hydra's grammar: inside quotes only a quote (and backslashes right before it) is escaped.
    return "'" + str(value).replace("'", "\\'") + "'"


def single_run_command(
    task_overrides: Sequence[str],
    hydra_overrides: Sequence[str],
    run_dir: str,
    *,
    job_num: int | None = None,
    extra: Sequence[str] = (),
    argv: Sequence[str] | None = None,
    orig_argv: Sequence[str] | None = None,
) -> list[str]:
    """The command that runs one sweep job as a single run writing into ``run_dir``.

    Args:
        task_overrides: the job's own overrides (``hydra.overrides.task`` of its config:
            the swept values and every other override of the sweep command).
        hydra_overrides: the sweep's ``hydra.overrides.hydra``; sweep-only ones are dropped.
        run_dir: the job's directory (``<sweep dir>/<subdir>``).
        job_num: recorded as ``hydra.job.num`` in the run's ``.hydra/hydra.yaml``.
        extra: further Hydra overrides appended last.
        argv, orig_argv: this process's ``sys.argv``/``sys.orig_argv`` (for tests).
    """
    cmd = [*program_prefix(argv, orig_argv), *forwarded_flags(argv), *task_overrides]
    cmd += job_hydra_overrides(hydra_overrides)
    # hydra.mode=RUN also wins over a preset that sets hydra.mode=MULTIRUN (he2016_depth).
    cmd += ["hydra.mode=RUN", f"hydra.run.dir={quote(run_dir)}"]
    if job_num is not None:
        cmd.append(f"hydra.job.num={int(job_num)}")
    cmd += list(extra)
    return cmd


# ------------------------------------------------------------------ why a job failed

# skipstudy.train's own one-line reports on stderr (a ConfigError, a divergence, a stop).
OWN_PREFIXES = ("Error: ", "Diverged: ", "Interrupted: ")

# "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt" - the last line of
# a Python traceback.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Warning)\b(?::.*)?$")
_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "Error executing job with overrides")


def failure_reason(output: str, returncode: int | None = None) -> str:
    """One line that says why a job failed, from its captured stdout/stderr.

    Prefers skipstudy's own ``Error: ...`` line (a ConfigError: names the key and the fix;
    or ``Diverged: ...``, ``Interrupted: ...``),
    then the last exception line of a traceback, then the last line of output; a job killed
    by a signal says so.
    """
    lines = [line.rstrip() for line in output.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line.strip()]
    for line in reversed(lines):
        if line.startswith(OWN_PREFIXES):
            return line
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()) and not line.startswith(_NOISE):
            return line.strip()
    if returncode is not None and returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    for line in reversed(lines):
        if not line.startswith(_NOISE) and not line.startswith(" "):
            return line.strip()
    return f"exit code {returncode}" if returncode is not None else "failed without output"


class SweepCheck(Callback):
    """Hydra callback: before a ``-m`` sweep starts, every job's config is composed and checked,
    so a bad value in job 7 is refused before job 1 trains (basic sweeper only; others'
    parameter syntax is their own)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from skipstudy import config as schema

        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") != "hydra._internal.core_plugins.basic_sweeper.BasicSweeper":
            return
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        for batch in BasicSweeper.split_arguments(overrides, None):
            for job in batch:
                try:
                    schema.check(compose(config.hydra.job.config_name, overrides=list(job)))
                except schema.ConfigError as err:
                    print(f"Error: {err} (sweep job {' '.join(job)})", file=sys.stderr)
                    sys.exit(2)
