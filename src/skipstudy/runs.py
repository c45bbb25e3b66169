"""Run directories: where a run writes, how ``resume=<run dir>`` finds its way back, and the
guard that keeps a new run out of an existing run's directory.

Resume semantics (``python -m skipstudy.train resume=<run dir> [overrides]``):

* Hydra's run directory becomes ``<run dir>`` (``hydra.run.dir`` goes through
  :func:`resume_dir`), so logs, checkpoints and TensorBoard events continue in place. Hydra
  writes the resume command's own ``config.yaml``/``overrides.yaml`` to
  ``<run dir>/.hydra/resume-<timestamp>/``; the run's ``.hydra/config.yaml`` stays the one
  it started with.
* The run's config is reloaded from ``<run dir>/.hydra/config.yaml``; nothing has to be
  repeated. Overrides given beside ``resume=`` are applied on top of it if they only change
  how the run is carried out (:data:`RESUMABLE_KEYS`: ``trainer.max_epochs=...`` to extend a
  finished run, devices, paths, the data location); an override that would change what is
  trained (model, data set, optimizer, seed, ...) is refused: that is a new run.
* Training continues from ``<run dir>/checkpoints/last.ckpt``; a run killed before its first
  checkpoint starts over in the same directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.layout import CONFIG, EVENT_PREFIX, LAST  # noqa: F401 - runs.LAST etc. stay importable

# Keys an override beside resume= may change: how the run is carried out, not what it computes.
RESUMABLE_KEYS = ("trainer.", "checkpoint.", "paths.", "dataset.root", "dataset.num_workers", "dataset.loader",
                  "dataset.device", "dataset.download", "monitor.on_nonfinite", "resume")


def quote_resume(argv: list[str]) -> list[str]:
    """Quote the value of a ``resume=`` argument for Hydra's override grammar.

    Run directories are named by their overrides (``model=resnet50,model.skip=false``), and
    ``=`` and ``,`` are grammar in an unquoted override value; the path is quoted so that
    ``resume=<dir>`` can be pasted as it is.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "resume" and value and value[0] not in "'\"" and value != "null":
            arg = f"{key}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def resume_argument_quoted(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for the Hydra entry point: :func:`quote_resume` on ``sys.argv`` first."""

    @functools.wraps(entry)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sys.argv[1:] = quote_resume(sys.argv[1:])
        return entry(*args, **kwargs)

    return wrapper


def _resumable(resume: Any) -> Path | None:
    """``resume`` as an absolute run directory, or None when it is not one."""
    if resume in (None, ""):
        return None
    path = Path(str(resume)).expanduser().resolve()
    return path if (path / CONFIG).is_file() else None


def resume_dir(resume: Any, default: str) -> str:
    """Resolver for ``hydra.run.dir``: the run to resume, else the new run's directory.

    A ``resume=`` that is no run directory also gives ``default``; :func:`resume_config`
    then refuses it with a message (a resolver cannot print a short error).
    """
    path = _resumable(resume)
    return str(path) if path is not None else default


def resume_subdir(resume: Any, stamp: str) -> str:
    """Resolver for ``hydra.output_subdir``: a resume keeps the run's own ``.hydra/`` files."""
    return f".hydra/resume-{stamp}" if _resumable(resume) is not None else ".hydra"


for _name, _fn in (("skipstudy.resume_dir", resume_dir), ("skipstudy.resume_subdir", resume_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def check_run_dir(resume: Any) -> Path:
    """The run directory named by ``resume=``, or a ConfigError saying what is wrong with it."""
    if not isinstance(resume, (str, os.PathLike)) or not str(resume):
        raise ConfigError(f"resume={resume!r} must be the directory of a run, e.g. "
                          "resume=logs/default/defaults/2025-01-31_12-00-00_123456")
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
    """``<run>/checkpoints/last.ckpt``, None when the run wrote none, or a ConfigError naming it
    when it is damaged (a copy cut short, a full disk): PyTorch checkpoints are zip archives,
    so a CRC pass over the members finds a cut or flipped byte before Lightning would."""
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


def resume_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config a run started with, for ``resume=<run dir>``, plus the allowed ``overrides``.

    Args:
        cfg: the config composed for the resume command (only ``cfg.resume`` is used).
        overrides: the resume command's task overrides (Hydra's ``overrides.task``).
    """
    run_dir = check_run_dir(cfg.resume)
    saved = OmegaConf.load(run_dir / CONFIG)
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"resume={cfg.resume}: {run_dir / CONFIG} is not a config mapping")
    OmegaConf.set_struct(saved, True)
    for override in _parse(overrides or []):
        key = override.key_or_group
        if key == "resume":
            continue
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(
                f"{override.input_line}: resume= continues a run with its own config, and {key} would change "
                f"what it trains; start a new run instead (drop resume=). Beside resume= you may set: "
                f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_KEYS if k != 'resume')}"
            )
        if override.is_delete():
            raise ConfigError(f"{override.input_line}: deleting keys is not possible with resume=")
        try:
            # Any lightning.Trainer argument may be added (checked by skipstudy/config.py).
            add = override.is_force_add() or override.is_add() or key.startswith("trainer.")
            OmegaConf.update(saved, key, override.value(), merge=True, force_add=add)
        except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a bad key
            raise ConfigError(f"{override.input_line}: {key} is not a key of the run's config ({err.__class__.__name__}); "
                              f"the run's keys are in {run_dir / CONFIG}") from None
    with _writable(saved):
        saved.resume = str(run_dir)
    config.check(saved)
    return saved


class _writable:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def claim(run_dir: Path, resuming: bool) -> None:
    """Refuse to start a new run in a directory that already holds one.

    Two jobs started in the same second already get different directories (the run
    directory's timestamp has microseconds); this catches the rest: an explicit
    ``hydra.run.dir=`` pointing at an old run, or two sweep jobs whose overrides differ only
    in keys left out of directory names. ``run_info.json`` is created exclusively, so of two
    processes racing for one directory exactly one wins.
    """
    if resuming:
        return
    taken = [p.name for p in run_dir.glob(EVENT_PREFIX + "*")][:1] + [
        n for n in ("checkpoints", "run_info.json") if (run_dir / n).exists()
    ]
    if taken:
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(taken)}); a new run never writes into it. "
            f"Continue that run with resume={run_dir}, or leave hydra.run.dir unset for a fresh directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / "run_info.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ConfigError(f"hydra.run.dir={run_dir} was just taken by another job; leave hydra.run.dir unset "
                          f"for a fresh directory") from None
    os.close(fd)


def with_resumes(run_dir: Path, info: dict[str, Any], ckpt_path: Path | None) -> dict[str, Any]:
    """``run_info.json`` of a resumed run: what the run started with, plus one entry per
    resume (time, checkpoint step, and the commit and versions it continued with)."""
    path = run_dir / "run_info.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return info
    step = None
    if ckpt_path is not None:
        from skipstudy.resume import checkpoint_record

        step = checkpoint_record(ckpt_path)[0]
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": step,
             **{k: info.get(k) for k in ("git_commit", "packages", "cuda", "device", "resolved")}}
    old.setdefault("resumes", []).append(entry)
    return old


def remove_if_unused(run_dir: Path, resume: Any = None) -> None:
    """After a refused start: remove the run directory Hydra made if it holds only Hydra's
    own files (``.hydra/`` and the job log), so bad input leaves nothing behind. The run a
    ``resume=`` points at is never removed."""
    target = _resumable(resume)
    if target is not None and target == Path(run_dir).resolve():
        return
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if not entries or any(not (e.name == ".hydra" or (e.is_file() and e.suffix == ".log")) for e in entries):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):  # <overrides>/ and <name>/ if now empty
        try:
            parent.rmdir()
        except OSError:
            break
