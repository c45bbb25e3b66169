"""Run directories: their names, the guard that keeps a new run out of an old one's, and
``resume=<run dir>`` (Hydra's resolvers here make ``<run dir>`` the run directory and put the
resume's Hydra files in ``.hydra/resume-<timestamp>/``; the run's own config is reloaded, and
overrides beside it may change how the run is carried out, never what it trains).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from skipstudy.errors import ConfigError
from skipstudy.runs.layout import CONFIG, EVENT_PREFIX, LAST

RESUMABLE_KEYS = ("trainer.", "checkpoint.", "paths.", "dataset.root", "dataset.num_workers", "dataset.loader",
                  "dataset.device", "dataset.download", "monitor.on_nonfinite", "resume")
# Left out of override_dirname (they name a single run's parent folder), yet they tell sweep jobs apart.
NAMING_KEYS = ("experiment", "name")


def run_name(override_dirname: str) -> str:
    """A run directory name from the job's overrides, safe as one path component."""
    name = override_dirname.replace("/", "_").replace(os.sep, "_")
    return (name or "defaults")[:200]


def sweep_subdir(override_dirname: str, task_overrides: Any) -> str:
    """A sweep job's subdirectory: its overrides, led by any ``experiment=``/``name=`` it sets,
    so that jobs differing only in those do not share a directory."""
    lead = sorted(str(o).lstrip("+~") for o in (task_overrides or [])
                  if str(o).lstrip("+~").split("=", 1)[0] in NAMING_KEYS)
    return run_name(",".join([*lead, override_dirname] if override_dirname else lead))


def _resumable(resume: Any) -> Path | None:
    path = Path(str(resume)).expanduser().resolve()
    return path if resume and (path / CONFIG).is_file() else None


def resume_dir(resume: Any, default: str) -> str:
    """``hydra.run.dir``: the run to resume, else the new run's directory (a bad ``resume=`` is
    refused later by :func:`resume_config`: a resolver cannot print a short error)."""
    return str(_resumable(resume) or default)


def resume_subdir(resume: Any, stamp: str) -> str:
    """``hydra.output_subdir``: a resume keeps the run's own ``.hydra/`` files."""
    return f".hydra/resume-{stamp}" if _resumable(resume) is not None else ".hydra"


def register_resolvers(extra: dict[str, Callable[..., Any]] | None = None) -> None:
    """The resolvers ``conf/train.yaml`` names its directories with, and ``extra`` ones (called by
    the entry points through :func:`skipstudy.overrides.register`, not at import)."""
    for name, fn in {"skipstudy.resume_dir": resume_dir, "skipstudy.resume_subdir": resume_subdir,
                     "skipstudy.run_name": run_name, "skipstudy.sweep_subdir": sweep_subdir, **(extra or {})}.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def quote_path(argv: list[str], key: str, existing_only: bool = False) -> list[str]:
    """Quote the value of ``key=`` (a run directory, a checkpoint) for Hydra's grammar: run
    directories are named by their overrides (``model=resnet50,model.skip=false``), so a path
    can be pasted as it is. Quoted values, ``null``, and with ``existing_only`` values that name
    no path (a sweep ``ckpt=a,b``) pass unchanged."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if (sep and name.lstrip("+") == key and value and value[0] not in "'\"" and value != "null"
                and (not existing_only or Path(value).expanduser().exists())):
            arg = f"{name}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def check_run_dir(resume: Any) -> Path:
    """The run directory named by ``resume=``, or a ConfigError saying what is wrong with it."""
    path = Path(str(resume)).expanduser()
    if not path.exists():
        problem = "does not exist"
    elif not path.is_dir():
        problem = "is a file, not a run directory"
    elif not (path / CONFIG).is_file():
        found = sorted(p.parent.parent for p in path.glob("**/.hydra/config.yaml"))[:3]
        hint = ("; run directories below it: " + ", ".join(str(p) for p in found)) if found else ""
        problem = f"is not a run directory (it has no {CONFIG}){hint}"
    else:
        return path.resolve()
    raise ConfigError(f"resume={resume}: {problem}. Pass the directory a run wrote, the one holding "
                      f".hydra/ and checkpoints/ (e.g. resume=logs/default/defaults/<timestamp>)")


def last_checkpoint(run_dir: Path) -> Path | None:
    """``<run>/checkpoints/last.ckpt``; None when the run wrote none; a ConfigError when it is
    damaged (a copy cut short, a full disk): a checkpoint is a zip archive, and a CRC pass
    finds a cut or flipped byte before Lightning would."""
    path = run_dir / LAST
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        problem = f"member {bad} fails its CRC check" if bad else None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        way = f"copy another checkpoint over it ({', '.join(others)}) to continue from there, or " if others else ""
        raise ConfigError(f"resume={run_dir}: {path} is damaged ({path.stat().st_size} bytes; {problem}); "
                          f"{way}move it away to start the run over")
    return path


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config the run ``cfg.resume`` started with, plus the allowed ``overrides`` (Hydra's
    ``overrides.task`` of the resume command); ``train`` checks it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = check_run_dir(cfg.resume)
    saved = OmegaConf.load(run_dir / CONFIG)
    OmegaConf.set_struct(saved, True)
    allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE_KEYS if k != "resume")
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "resume":
            continue
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(f"{override.input_line}: resume= continues a run with its own config, and {key} would "
                              f"change what it trains; start a new run instead (drop resume=). Beside resume= you "
                              f"may set: {allowed}")
        if override.is_delete():
            raise ConfigError(f"{override.input_line}: deleting keys is not possible with resume=")
        try:
            # Any lightning.Trainer argument may be added (names and types: skipstudy/config.py; ranges: Lightning's).
            add = override.is_force_add() or override.is_add() or key.startswith("trainer.")
            OmegaConf.update(saved, key, override.value(), merge=True, force_add=add)
        except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a bad key
            raise ConfigError(f"{override.input_line}: {key} is not a key of the run's config "
                              f"({err.__class__.__name__}); the run's keys are in {run_dir / CONFIG}") from None
    OmegaConf.update(saved, "resume", str(run_dir), force_add=True)
    return saved


def claim(run_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds one (``hydra.run.dir=`` at an old run;
    sweep jobs differing only in keys left out of directory names). ``run_info.json`` is created
    exclusively: of two processes racing for one directory exactly one wins."""
    taken = [p.name for p in run_dir.glob(EVENT_PREFIX + "*")][:1] + [
        n for n in ("checkpoints", "run_info.json") if (run_dir / n).exists()]
    if taken:
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(taken)}); a new run never writes into it. "
            f"Continue that run with resume={run_dir}, or leave hydra.run.dir unset for a fresh directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(run_dir / "run_info.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise ConfigError(f"hydra.run.dir={run_dir} was just taken by another job; leave hydra.run.dir unset "
                          f"for a fresh directory") from None


def run_info() -> dict[str, Any]:
    """What produced a run: git commit, package versions, machine."""
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[3]), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "platform": platform.platform(), "git_commit": commit,
            "packages": {pkg: installed.get(pkg) for pkg in
                         ("skipstudy", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy")},
            "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"}


def with_resumes(run_dir: Path, info: dict[str, Any], step: int | None) -> dict[str, Any]:
    """``run_info.json`` of a resumed run: what it started with, plus one entry per resume (time,
    checkpoint step, and the commit and versions it continued with)."""
    try:
        old = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError):
        return info
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": step,
             **{k: info.get(k) for k in ("git_commit", "packages", "cuda", "device", "resolved")}}
    old.setdefault("resumes", []).append(entry)
    return old


def refuse(err: ConfigError, log_dir: str, resume: Any = None) -> None:
    """A refused start: in a sweep raised (the launcher records it and goes on); alone one line,
    exit status 2, and no run directory left behind (never the run ``resume=`` points at), nor the
    folders above it that it alone filled, up to ``paths.log_dir``: never the working directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"Error: {err}", file=sys.stderr)
    run_dir = Path(hc.runtime.output_dir)
    unused = all(e.name == ".hydra" or (e.is_file() and e.suffix == ".log") for e in run_dir.iterdir())
    if unused and _resumable(resume) != run_dir.resolve():  # only Hydra's own files
        shutil.rmtree(run_dir, ignore_errors=True)
        top, cwd = Path(log_dir).resolve(), Path.cwd().resolve()
        for parent in run_dir.resolve().parents:  # <overrides>/, <name>/ and paths.log_dir if now empty
            if not parent.is_relative_to(top) or cwd.is_relative_to(parent):
                break
            try:
                parent.rmdir()
            except OSError:
                break
    sys.exit(2)
