"""A sweep job as a single run in a fresh process (the pool launcher's jobs, a DDP job inside a
multirun): the command a user would type to rerun it alone, whose ``sys.argv`` Lightning's DDP
may re-execute; the one-line reason a failed job gives; every job's config checked up front."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# A Hydra app's options that shape the job's config; each takes a value (next argument or "=").
_HYDRA_VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra overrides of the sweep (launcher, sweeper, directory, mode), not of the job.
_SWEEP_KEYS = re.compile(
    r"^(hydra/launcher|hydra\.launcher(\..*)?|hydra/sweeper|hydra\.sweeper(\..*)?|hydra\.sweep(\..*)?"
    r"|hydra\.run(\..*)?|hydra\.mode|hydra\.job\.(num|id)|hydra\.callbacks\.skipstudy_pool_return(\..*)?)$"
)


def program_prefix(argv: Sequence[str] | None = None, orig_argv: Sequence[str] | None = None) -> list[str]:
    """The interpreter command that started this process (``[python, -m, skipstudy.train]``,
    ``[python, script]``, ``[python, -c, CODE]``): ``sys.orig_argv`` ends with ``sys.argv[1:]``."""
    argv = list(sys.argv if argv is None else argv)
    orig = list(sys.orig_argv if orig_argv is None else orig_argv)
    n_args = len(argv) - 1
    if len(orig) > n_args and orig[len(orig) - n_args:] == argv[1:]:
        # orig_argv[0] may be a bare "python" found on PATH; the running interpreter is exact.
        return [sys.executable, *orig[1: len(orig) - n_args]]
    return [sys.executable, argv[0]]


def forwarded_flags(argv: Sequence[str] | None = None) -> list[str]:
    """The ``--config-dir``/``--config-name``/``--config-path`` options of the command line."""
    argv = list(sys.argv if argv is None else argv)[1:]
    kept: list[str] = []
    for i, arg in enumerate(argv):
        if arg in _HYDRA_VALUE_FLAGS and i + 1 < len(argv):
            kept += [arg, argv[i + 1]]
        elif arg.startswith(tuple(flag + "=" for flag in _HYDRA_VALUE_FLAGS)):
            kept.append(arg)
    return kept


def job_hydra_overrides(hydra_overrides: Iterable[str]) -> list[str]:
    """The sweep's Hydra overrides that still matter to one job run alone."""
    return [o for o in hydra_overrides if not _SWEEP_KEYS.match(o.split("=", 1)[0].strip().lstrip("+~").split("@")[0])]


def quote(value: str) -> str:
    """A Hydra quoted string, so ``=``, ``,`` and spaces in a path stay literal."""
    return "'" + str(value).replace("'", "\\'") + "'"


def single_run_command(task_overrides: Sequence[str], hydra_overrides: Sequence[str], run_dir: str, *,
                       job_num: int, extra: Sequence[str] = (), argv: Sequence[str] | None = None,
                       orig_argv: Sequence[str] | None = None) -> list[str]:
    """The command that runs one job (its ``hydra.overrides.task``) as a single run in ``run_dir``."""
    return [*program_prefix(argv, orig_argv), *forwarded_flags(argv), *task_overrides,
            *job_hydra_overrides(hydra_overrides),
            # hydra.mode=RUN also wins over a preset's hydra.mode=MULTIRUN (he2016_depth).
            "hydra.mode=RUN", f"hydra.run.dir={quote(run_dir)}", f"hydra.job.num={int(job_num)}", *extra]


def job_config(hydra_context: Any, sweep_config: DictConfig, overrides: Sequence[str], job_num: int):
    """A launcher's job: its composed config, ``hydra.sweep.dir`` (absolute) and ``hydra.sweep.subdir``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    config = hydra_context.config_loader.load_sweep_config(sweep_config, list(overrides))
    with open_dict(config):
        config.hydra.job.num = job_num
        config.hydra.job.id = config.hydra.job.get("id") or job_num
    # The subdir may use ${hydra:...}; resolve it as Hydra's run_job does.
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(config)
    try:
        return config, Path(str(config.hydra.sweep.dir)).absolute(), str(OmegaConf.select(config, "hydra.sweep.subdir"))
    finally:
        HydraConfig.instance().cfg = previous


# skipstudy.train's own one-line reports on stderr.
OWN_PREFIXES = ("Error: ", "Diverged: ", "Interrupted: ")
# The last line of a traceback: "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Warning)\b(?::.*)?$")
_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "Error executing job with overrides")


def failure_reason(output: str, returncode: int) -> str:
    """Why a job failed, in one line of its output: skipstudy's own ``Error: ...`` line, else the
    exception ending a traceback, else the signal that killed it, else the last line."""
    lines = [line.rstrip() for line in output.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(_NOISE)]
    own = [line for line in lines if line.startswith(OWN_PREFIXES)]
    raised = [line.strip() for line in lines if _EXCEPTION_LINE.match(line.strip())]
    if own or raised:
        return (own or raised)[-1]
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    unindented = [line for line in lines if not line.startswith(" ")]
    return unindented[-1].strip() if unindented else f"exit code {returncode}"


class SweepCheck(Callback):
    """Before a ``-m`` sweep starts, every job's config is composed and checked, so a bad value in
    job 7 is refused before job 1 trains (basic sweeper only; others have their own syntax)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import itertools

        from hydra import compose
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from skipstudy import config as schema

        sweeper = config.hydra.sweeper
        if str(sweeper.get("_target_", "")).rpartition(".")[2] != "BasicSweeper":
            return
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        # The basic sweeper's jobs: the product of each key's values, a later override of a key
        # (the command line after the sweeper's params) replacing an earlier one, as it does.
        values: dict[str, list[str]] = {}
        for o in OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task]):
            key = o.get_key_element()
            values[key] = [f"{key}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                  else [o.get_value_element_as_str()])]
        for job in itertools.product(*values.values()):
            try:
                schema.check(compose(config.hydra.job.config_name, overrides=list(job)))
            except schema.ConfigError as err:
                print(f"Error: {err} (sweep job {' '.join(job)})", file=sys.stderr)
                sys.exit(2)
