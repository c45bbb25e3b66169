"""Reading runs back: TensorBoard event files (through tbparse), ``.hydra/`` and the monitor's
``grad_stats.json``. A run is a directory holding ``events.out.tfevents.*``; a sweep is any
directory with runs below it. A run may be unfinished, half-written or diverged (NaN, inf).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from logging.handlers import BufferingHandler
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf

from skipstudy.analysis.settings import is_locating, natural_order
from skipstudy.errors import ConfigError
from skipstudy.monitor import QUANTITIES
from skipstudy.runs.layout import EVENT_PREFIX

HIST_QUANTITY = "grad_hist/output"  # the monitor's histogram tag prefix (not a registered quantity)


@dataclass
class Series:
    steps: np.ndarray  # global steps, ascending
    values: np.ndarray  # float64; NaN/inf kept

    def last(self) -> float:
        return float(self.values[-1]) if self.values.size else math.nan


@dataclass
class Histogram:
    step: int
    edges: np.ndarray  # len(counts) + 1, ascending
    counts: np.ndarray


@dataclass
class Run:
    path: Path
    name: str = ""  # relative to the common parent of the runs loaded together
    overrides: list[str] = field(default_factory=list)
    # .hydra/config.yaml, or rebuilt from the run's HParams when it has no .hydra/
    config: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, Series] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # forward order
    blocks: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # "<event file>: <what>"
    nonfinite_steps: list[int] = field(default_factory=list)
    diverged_at: dict[str, Any] | None = None
    label: str = ""  # what tells this run from the others loaded with it
    wall_time: float | None = None  # seconds from the first to the last event
    epoch_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    epoch_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def option(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config  # by hand: OmegaConf would resolve .hydra/config.yaml's interpolations
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def skip(self) -> bool | None:
        return None if (value := self.option("model.skip")) is None else bool(value)

    @property
    def depth(self) -> int | None:
        """``model.depth``, else the number of a ``resnetNN`` builder, else None (the mini net)."""
        depth = self.option("model.depth")
        if isinstance(depth, (int, float)) and not isinstance(depth, bool):
            return int(depth)
        match = re.search(r"resnet(\d+)$", str(self.option("model._target_", "")))
        return int(match.group(1)) if match else None

    @property
    def group(self) -> tuple[str, ...]:
        """The overrides that change what the run computes: seeds and reruns share a group."""
        return tuple(o for o in self.overrides if not is_locating(o))

    def series(self, tag: str) -> Series | None:
        return self.scalars.get(tag)

    def units(self, quantity: str) -> list[str]:
        return self.blocks if quantity in declared("blocks") else self.layers

    def layer_series(self, quantity: str) -> dict[str, Series]:
        return {u: s for u in self.units(quantity) if (s := self.scalars.get(f"{quantity}/{u}")) is not None}

    @property
    def has_data(self) -> bool:
        return bool(self.scalars)

    def epoch_at(self, steps) -> np.ndarray:
        """The epoch of each global step: that of the nearest step Lightning logged ``epoch`` at."""
        steps = np.asarray(steps, dtype=np.int64)
        if self.epoch_steps.size == 0:
            return np.zeros(steps.shape, dtype=np.int64)
        idx = np.searchsorted(self.epoch_steps, steps, side="right") - 1
        return self.epoch_values[np.clip(idx, 0, None)]

    @property
    def epochs_done(self) -> int:
        return max((len(s.steps) for t in ("train/loss_epoch", "val/loss") if (s := self.scalars.get(t))), default=0)

    @property
    def num_steps(self) -> int:
        s = self.scalars.get("train/loss")
        return int(s.steps.max()) + 1 if s is not None and s.steps.size else 0

    def layer_profile(self, quantity: str, epoch: int) -> dict[str, float]:
        """Per layer, the median of the finite values in ``epoch`` (NaN: none, e.g. after divergence)."""
        profile = {}
        for layer, s in self.layer_series(quantity).items():
            v = s.values[self.epoch_at(s.steps) == epoch]
            v = v[np.isfinite(v)]
            profile[layer] = float(np.median(v)) if v.size else math.nan
        return profile

    @property
    def diverged(self) -> bool:
        loss = self.scalars.get("train/loss_epoch") or self.scalars.get("train/loss")
        loss_bad = loss is not None and not math.isfinite(loss.last())
        return bool(self.nonfinite_steps) or self.diverged_at is not None or loss_bad


def declared(over: str) -> list[str]:
    """The monitor's quantities written per ``"layers"`` or per ``"blocks"`` (tags
    ``<quantity>/<layer or block>``), in declaration order: a new one needs no line here."""
    return [q.name for q in QUANTITIES.values() if q.over == over]


def is_monitor_tag(tag: str) -> bool:
    """A tag the gradient monitor writes: a declared quantity (``grad_norm/total``) or one of its
    per-layer or per-block series (``grad_norm/output/conv1``)."""
    return any(tag == q or tag.startswith(q + "/") for q in QUANTITIES)


def read_export(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The monitor's ``grad_stats.json`` (``monitor.export=json``, the default), or None."""
    doc = _read(Path(run_dir) / "grad_stats.json", json.loads)
    return doc if isinstance(doc, dict) else None


def final_train_loss(run: Run) -> float:
    """The last epoch-mean training loss, else the last per-step one."""
    s = run.series("train/loss_epoch") or run.series("train/loss")
    return s.last() if s is not None else math.nan


def final_val_acc(run: Run) -> float:
    s = run.series("val/acc")
    return s.last() if s is not None else math.nan


def _event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(EVENT_PREFIX) and p.is_file())


def find_run_dirs(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(runs, pending)`` at or below ``path``: directories with event files, and those with
    Hydra's ``.hydra/`` but no event file yet. Raises ConfigError when there is no run."""
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"{root} does not exist; pass a run directory (it holds events.out.tfevents.* files) "
                          "or a sweep directory with runs below it")
    if root.is_file():
        if root.name.startswith(EVENT_PREFIX):
            return [root.parent], []
        raise ConfigError(f"{root} is a file; pass a run or sweep directory")
    runs, pending = [], []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
        if _event_files(Path(dirpath)):
            runs.append(Path(dirpath))
        elif (Path(dirpath) / ".hydra").is_dir():
            pending.append(Path(dirpath))
    if not runs:
        what = "is empty" if not any(root.iterdir()) else "holds no TensorBoard event files (events.out.tfevents.*)"
        hint = f"; {len(pending)} run(s) below it have not logged yet" if pending else ""
        raise ConfigError(f"{root} {what}{hint}; pass a run directory of `python -m skipstudy.train` "
                          "or a sweep directory that contains such runs")
    return runs, pending


def _read_events(run_dir: Path):
    """Scalars, histograms and HParams of each event file in ``run_dir`` (one at a time: tbparse
    on the directory would parse checkpoints too), and the files found damaged."""
    import pandas as pd
    from tbparse import SummaryReader

    scalars, hists, hparams, damaged = [], [], {}, []
    tb_log = logging.getLogger("tensorboard")
    level, propagate = tb_log.level, tb_log.propagate
    for path in _event_files(run_dir):
        # TensorBoard's loader logs a bad record at debug level and treats it as the end of the
        # file. A cut last record is normal (a run still writing, or killed); a failed CRC check
        # is a damaged file, which the report names.
        caught = BufferingHandler(capacity=1 << 30)
        tb_log.addHandler(caught)
        tb_log.setLevel(logging.DEBUG)
        tb_log.propagate = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = SummaryReader(str(path), extra_columns={"wall_time", "min", "max"},
                                       event_types={"scalars", "histograms", "hparams"})
                s, h, hp = reader.scalars, reader.histograms, reader.hparams
        except Exception as err:  # noqa: BLE001 - one unreadable file must not sink the others
            damaged.append(f"{path}: unreadable ({type(err).__name__}: {err})")
            continue
        finally:
            tb_log.removeHandler(caught)
            tb_log.setLevel(level)
            tb_log.propagate = propagate
        crc = [str(r.args[-1]).rsplit(" ", 3)[-3] for r in caught.buffer  # "header"/"event"
               if r.msg.startswith("Truncated record") and "crc32 check" in str(r.args[-1])]
        if crc:
            n = len(s) + len(h)
            damaged.append(f"{path}: damaged ({path.stat().st_size} bytes; a record fails its {crc[0]} "
                           f"CRC check; {f'the {n} values before it are used' if n else 'nothing before it'})")
        if not s.empty:
            # The order a file first wrote its tags in is the monitor's forward layer order.
            s["order"] = s["tag"].map({t: i for i, t in enumerate(reader.get_tags("scalars"))})
            scalars.append(s)
        if not h.empty:
            hists.append(h)
        hparams.update(zip(hp["tag"], hp["value"]) if not hp.empty else ())
    scalars, hists = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame() for frames in (scalars, hists))
    return scalars, hists, hparams, damaged


def _read(path: Path, parse) -> Any:
    if not path.is_file():
        return None  # in-process runs (tests, notebooks) have no .hydra/; monitor=off has no export
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        logging.getLogger(__name__).warning("could not read %s: %s", path, err)
        return None


def _suffixes(tags, quantity: str) -> list[str]:
    return [t[len(quantity) + 1:] for t in tags if t.startswith(quantity + "/")]


def _first_named(tags, quantities) -> list[str]:
    return next((names for q in quantities if (names := _suffixes(tags, q))), [])


def load_run(run_dir: str | os.PathLike) -> Run:
    run_dir = Path(run_dir)
    run = Run(path=run_dir, name=run_dir.name)
    scalars, hists, hparams, run.damaged = _read_events(run_dir)
    run.config = _read(run_dir / ".hydra" / "config.yaml", yaml.safe_load)
    if not isinstance(run.config, dict):  # no .hydra/: the flattened config train.py wrote as HParams
        nested = OmegaConf.create()
        for key, value in hparams.items():
            OmegaConf.update(nested, str(key), value, force_add=True)
        run.config = OmegaConf.to_container(nested)  # unresolved, as .hydra/config.yaml is read
    overrides = _read(run_dir / ".hydra" / "overrides.yaml", yaml.safe_load)
    run.overrides = list(map(str, overrides)) if isinstance(overrides, list) else []

    tag_order: list[str] = []
    if not scalars.empty:
        # A resumed run rewrites the steps after its last checkpoint in a new event file; the
        # later write of a (tag, step) counts.
        scalars = scalars.sort_values(["tag", "step", "wall_time"], kind="stable").drop_duplicates(["tag", "step"], keep="last")
        run.scalars = {str(tag): Series(g["step"].to_numpy(np.int64), g["value"].to_numpy(np.float64))
                       for tag, g in scalars.groupby("tag", sort=False)}
        run.wall_time = float(scalars["wall_time"].max() - scalars["wall_time"].min())
        tag_order = list(scalars.groupby("tag")["order"].min().sort_values(kind="stable").index)
    # TensorBoard stores right bucket edges; the first bucket starts at `min`.
    for r in hists.sort_values(["tag", "step"], kind="stable").itertuples(index=False) if not hists.empty else ():
        if len(r.counts) and np.isfinite(r.min):
            edges = np.concatenate(([min(r.min, r.limits[0])], r.limits)).astype(np.float64)
            run.histograms.setdefault(str(r.tag), []).append(Histogram(int(r.step), edges, np.asarray(r.counts, float)))

    export = read_export(run_dir) or {}
    # Without the export, the names after the first quantity present, in the order first written.
    layers = (export.get("layers") or _first_named(tag_order, declared("layers"))
              or _suffixes(run.histograms, HIST_QUANTITY))
    run.layers = [str(x) for x in layers]
    run.blocks = [str(x) for x in export.get("blocks") or _first_named(tag_order, declared("blocks"))]

    if (epoch := run.scalars.get("epoch")) is not None:
        run.epoch_steps, first = np.unique(epoch.steps, return_index=True)
        run.epoch_values = epoch.values[first].astype(np.int64)

    nonfinite = [int(s) for tag, v in run.scalars.items() if tag.startswith(("grad_norm/", "grad_rms/"))
                 for s in v.steps[~np.isfinite(v.values)]]
    run.nonfinite_steps = sorted({*nonfinite, *map(int, export.get("nonfinite_steps") or [])})
    run.diverged_at = export.get("diverged_at")
    if run.diverged_at is None and (d := run.scalars.get("train/diverged")) is not None:
        run.diverged_at = {"step": int(d.steps[0]), "layer": None}
    return run


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def assign_labels(runs: list[Run]) -> None:
    """Name each run relative to the runs' common parent and label it with the overrides not
    every run shares, so a legend shows what differs (the directory name where none do)."""
    paths = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    shared = set.intersection(*(set(r.group) for r in runs)) if len(runs) > 1 else set()
    for run, p in zip(runs, paths):
        run.name = p.relative_to(common).as_posix() if p != common else p.name
        run.label = ", ".join(o for o in run.group if o not in shared)
    labels = [run.label for run in runs]
    for run in runs:
        if not run.label:
            run.label = _short(run.name)
        elif labels.count(run.label) > 1:
            run.label = f"{run.label} ({_short(run.path.name)})"


def read_runs(paths: list[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Every run at or below ``paths``, sorted by group (numbers as numbers) then name, and notes
    for the reader."""
    found: dict[Path, None] = {}
    notes: list[str] = []
    for p in paths:
        runs, pending = find_run_dirs(p)
        found.update((r.resolve(), None) for r in runs)
        notes += [f"{d}: no event files yet (not started, or failed before logging); left out" for d in pending]
    runs = [load_run(d) for d in found]
    damaged = [d for run in runs for d in run.damaged]
    if damaged and not any(run.has_data for run in runs):
        raise ConfigError(f"{damaged[0]}{f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''}; "
                          "replace it from a backup, or pass runs whose event files are intact")
    notes += damaged
    notes += [f"{run.path}: event files hold no scalars yet; listed without numbers"
              for run in runs if not run.has_data and not run.damaged]
    assign_labels(runs)
    runs.sort(key=natural_order)
    return runs, notes
