"""Reading runs back: TensorBoard event files, Hydra's ``.hydra/`` and the monitor's export.

A *run* is a directory that holds ``events.out.tfevents.*`` files (``skipstudy.train``
writes them straight into the Hydra output directory). A *sweep* is any directory with
runs below it. Everything here only reads; nothing assumes a run has finished: event files
may end in a half-written record, the monitor's ``grad_stats.json`` may be absent, and a
diverged run holds NaN and inf values.

Tag vocabulary (TEAM.md): ``train/loss``, ``train/loss_epoch``, ``train/acc``, ``val/loss``,
``val/acc``, ``epoch`` (Lightning), and the monitor's ``grad_norm/output/<layer>``,
``grad_rms/output/<layer>``, ``grad_norm/weight/<layer>``, ``grad_rms/weight/<layer>``,
``grad_norm/total``, ``grad_hist/output/<layer>`` (histograms over log10|g|),
``act/{mean,std,zero_frac}/<layer>``, ``grad_decay/slope``, per residual block
``grad_split/{shortcut,branch,ratio,cos}/<block>`` and
``spp/{mean_sq,var,branch_var,grad_mean_rms,grad_std,grad_branch_std}/<block>``,
``train/diverged``; steps are global steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from skipstudy.errors import ConfigError

log = logging.getLogger(__name__)

EVENT_PREFIX = "events.out.tfevents."
# Per-layer quantities whose tags end in ``/<layer>``; the first one present gives the
# layer order when the monitor's export is missing.
LAYER_QUANTITIES = (
    "grad_rms/output",
    "grad_norm/output",
    "grad_rms/weight",
    "grad_norm/weight",
    "act/mean",
    "act/std",
    "act/zero_frac",
)
HIST_QUANTITY = "grad_hist/output"
# Per-block quantities (tags end in ``/<block>``); the first one present gives the block order
# when the export is missing.
BLOCK_QUANTITIES = (
    "grad_split/branch",
    "grad_split/shortcut",
    "grad_split/ratio",
    "grad_split/cos",
    "spp/mean_sq",
    "spp/var",
    "spp/branch_var",
    "spp/grad_mean_rms",
    "spp/grad_std",
    "spp/grad_branch_std",
)
# Overrides that locate or name a run but do not change what it computes; they never make
# two runs different groups (train.yaml excludes the same keys from directory names).
LOCATING_KEYS = ("name", "experiment", "resume", "paths.", "hydra.", "dataset.root", "seed")


@dataclass
class Series:
    """One scalar tag: ``steps`` (global steps, ascending) and ``values`` (float64, may hold
    NaN/inf), with the ``wall_times`` they were written at."""

    steps: np.ndarray
    values: np.ndarray
    wall_times: np.ndarray

    def last(self) -> float:
        """The last written value (NaN when the series is empty)."""
        return float(self.values[-1]) if self.values.size else math.nan


@dataclass
class Histogram:
    """One histogram event: bucket ``edges`` (len(counts) + 1, ascending) and ``counts``."""

    step: int
    edges: np.ndarray
    counts: np.ndarray


@dataclass
class Run:
    """Everything the report needs from one run directory.

    Attributes:
        path: the run directory.
        name: the path relative to the common parent of all loaded runs (display only).
        overrides: Hydra's overrides of the run (``.hydra/overrides.yaml``), in order.
        config: the composed config (``.hydra/config.yaml``, interpolations unresolved), or
            one rebuilt from the HParams the run wrote when ``.hydra/`` is missing.
        scalars: tag -> :class:`Series`.
        histograms: tag -> histograms in step order.
        layers: tracked layer names in forward order (empty without the monitor).
        damaged: its event files that fail a CRC check or cannot be read ("<path>: <what>").
        blocks: residual block names (empty without the monitor's ``blocks``).
        nonfinite_steps: steps whose gradients were non-finite (monitor export and events).
        label: short name that tells this run from the others loaded with it.
    """

    path: Path
    name: str = ""
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, Series] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)
    diverged_at: dict[str, Any] | None = None
    label: str = ""
    _epoch_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _epoch_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    # ------------------------------------------------------------------ config

    def option(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``model.skip``), or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def skip(self) -> bool | None:
        """``model.skip``: True for the residual net, False for its plain twin, None if unknown."""
        value = self.option("model.skip")
        return None if value is None else bool(value)

    @property
    def depth(self) -> int | None:
        """Network depth: ``model.depth`` (CIFAR ResNets), else the number in an ImageNet
        builder's name (``skipstudy.models.resnet50`` -> 50), else None (the mini net)."""
        depth = self.option("model.depth")
        if isinstance(depth, (int, float)) and not isinstance(depth, bool):
            return int(depth)
        target = str(self.option("model._target_", ""))
        match = re.search(r"resnet(\d+)$", target)
        return int(match.group(1)) if match else None

    @property
    def group(self) -> tuple[str, ...]:
        """The overrides that change what the run computes; runs that share them (seeds,
        reruns) form one group."""
        return tuple(o for o in self.overrides if not _is_locating(o))

    # ------------------------------------------------------------------ series

    def series(self, tag: str) -> Series | None:
        """The scalar series ``tag``, or None when the run never wrote it."""
        return self.scalars.get(tag)

    def units(self, quantity: str) -> list[str]:
        """The names a quantity's tags end in: blocks for ``grad_split/*`` and ``spp/*``, else layers."""
        return self.blocks if quantity in BLOCK_QUANTITIES else self.layers

    def layer_series(self, quantity: str) -> dict[str, Series]:
        """``{layer or block: series}`` of a per-layer (``grad_rms/output``) or per-block
        (``spp/var``) quantity, forward order."""
        return {u: s for u in self.units(quantity) if (s := self.scalars.get(f"{quantity}/{u}")) is not None}

    @property
    def has_data(self) -> bool:
        return bool(self.scalars)

    # ------------------------------------------------------------------ epochs

    def epoch_at(self, steps: np.ndarray | list[int]) -> np.ndarray:
        """The training epoch of each global step.

        Lightning logs an ``epoch`` scalar at every logged step; a step it did not log takes
        the epoch of the nearest logged step before it (the first epoch before any).
        """
        steps = np.asarray(steps, dtype=np.int64)
        if self._epoch_steps.size == 0:
            return np.zeros(steps.shape, dtype=np.int64)
        idx = np.searchsorted(self._epoch_steps, steps, side="right") - 1
        return self._epoch_values[np.clip(idx, 0, None)]

    def epochs_of(self, quantity: str) -> list[int]:
        """Epochs in which any layer of ``quantity`` has a value, ascending."""
        seen: set[int] = set()
        for s in self.layer_series(quantity).values():
            seen.update(self.epoch_at(s.steps).tolist())
        return sorted(seen)

    @property
    def epochs_done(self) -> int:
        """Completed epochs: the number of epoch-end records (``train/loss_epoch`` or
        ``val/loss``, whichever is longer)."""
        return max((len(s.steps) for t in ("train/loss_epoch", "val/loss") if (s := self.scalars.get(t))), default=0)

    @property
    def num_steps(self) -> int:
        """Optimizer steps seen: the last logged ``train/loss`` step + 1 (0 without one)."""
        s = self.scalars.get("train/loss")
        return int(s.steps.max()) + 1 if s is not None and s.steps.size else 0

    def layer_profile(self, quantity: str, epoch: int) -> dict[str, float]:
        """Per layer, the median of ``quantity``'s finite values over the steps of ``epoch``
        (NaN when the epoch has none, e.g. after divergence)."""
        profile = {}
        for layer, s in self.layer_series(quantity).items():
            v = s.values[self.epoch_at(s.steps) == epoch]
            v = v[np.isfinite(v)]
            profile[layer] = float(np.median(v)) if v.size else math.nan
        return profile

    def histograms_by_epoch(self) -> dict[int, dict[str, Histogram]]:
        """``{epoch: {layer: histogram}}`` of ``grad_hist/output``; several histograms of one
        layer in one epoch are added up (they share the monitor's fixed bins)."""
        out: dict[int, dict[str, Histogram]] = {}
        for layer in self.layers or _layers_from_tags(self.histograms, HIST_QUANTITY):
            for h in self.histograms.get(f"{HIST_QUANTITY}/{layer}", []):
                epoch = int(self.epoch_at([h.step])[0])
                prev = out.setdefault(epoch, {}).get(layer)
                out[epoch][layer] = h if prev is None else _add_histograms(prev, h)
        return dict(sorted(out.items()))

    @property
    def diverged(self) -> bool:
        """Non-finite gradients were recorded, the monitor stopped the run, or the last
        training loss is not finite."""
        loss = self.scalars.get("train/loss_epoch") or self.scalars.get("train/loss")
        loss_bad = loss is not None and loss.values.size > 0 and not math.isfinite(loss.last())
        return bool(self.nonfinite_steps) or self.diverged_at is not None or loss_bad

    @property
    def wall_time(self) -> float | None:
        """Seconds between the first and the last event the run wrote (None without events)."""
        times = [s.wall_times for s in self.scalars.values() if s.wall_times.size]
        if not times:
            return None
        allt = np.concatenate(times)
        return float(allt.max() - allt.min())


# ---------------------------------------------------------------------- discovery


def _is_locating(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in LOCATING_KEYS)


def _has_events(directory: Path) -> bool:
    try:
        return any(e.name.startswith(EVENT_PREFIX) and e.is_file() for e in os.scandir(directory))
    except OSError:
        return False


def find_run_dirs(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Run directories at or below ``path``: ``(runs, pending)``.

    ``runs`` hold event files; ``pending`` have Hydra's ``.hydra/`` but no event file yet
    (a job that has not started logging, or one that failed before). Hidden directories and
    ``checkpoints/`` are not searched.

    Raises:
        ConfigError: ``path`` does not exist, or nothing at or below it is a run.
    """
    root = Path(path)
    if not root.exists():
        raise ConfigError(
            f"{root} does not exist; pass a run directory (it holds events.out.tfevents.* files) "
            "or a sweep directory with runs below it"
        )
    if root.is_file():
        if root.name.startswith(EVENT_PREFIX):
            return [root.parent], []
        raise ConfigError(f"{root} is a file; pass a run or sweep directory")
    runs: list[Path] = []
    pending: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
        if _has_events(here):
            runs.append(here)
        elif (here / ".hydra").is_dir():
            pending.append(here)
    if not runs:
        what = "is empty" if not any(root.iterdir()) else "holds no TensorBoard event files (events.out.tfevents.*)"
        hint = f"; {len(pending)} run(s) below it have not logged yet" if pending else ""
        raise ConfigError(
            f"{root} {what}{hint}; pass a run directory of `python -m skipstudy.train` "
            "or a sweep directory that contains such runs"
        )
    return runs, pending


# ---------------------------------------------------------------------- loading


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(EVENT_PREFIX) and p.is_file())


class _DataLoss(logging.Handler):
    """Collects TensorBoard's record-level read errors, which its loader logs at debug level
    and treats as the end of the file. A cut last record is normal (a run still writing, or
    killed); a failed CRC check is a damaged file, and the report names it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Truncated record") and "crc32 check" in str(record.args[-1]):
            self.errors.append(str(record.args[-1]).rsplit(" ", 3)[-3])  # "header"/"event"


def _read_events(run_dir: Path):
    """Scalars and histograms of every event file directly in ``run_dir``, and the files
    found damaged (``"<path>: <what>"``).

    Each file is read on its own (tbparse on a directory would also try to parse
    checkpoints and YAML files as event files). A truncated last record (a run still
    writing, or killed) ends that file's data without an error; a record that fails its
    CRC check ends it too, and the file is reported as damaged.
    """
    import pandas as pd
    from tbparse import SummaryReader

    scalars, hists, damaged = [], [], []
    tb_log = logging.getLogger("tensorboard")
    for path in _event_files(run_dir):
        handler, level, propagate = _DataLoss(), tb_log.level, tb_log.propagate
        tb_log.addHandler(handler)
        tb_log.setLevel(logging.DEBUG)
        tb_log.propagate = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                reader = SummaryReader(str(path), extra_columns={"wall_time", "min", "max"},
                                       event_types={"scalars", "histograms"})
                s, h = reader.scalars, reader.histograms
            except Exception as err:  # noqa: BLE001 - one unreadable file must not sink the report
                damaged.append(f"{path}: unreadable ({type(err).__name__}: {err})")
                continue
            finally:
                tb_log.removeHandler(handler)
                tb_log.setLevel(level)
                tb_log.propagate = propagate
        if handler.errors:
            n = len(s) + len(h)
            damaged.append(f"{path}: damaged ({path.stat().st_size} bytes; a record fails its {handler.errors[0]} "
                           f"CRC check; {f'the {n} values before it are used' if n else 'nothing before it'})")
        # Tags in the order the file first wrote them: the monitor writes a step's layers in
        # forward order, so this is the layer order when no export says otherwise.
        order = reader.get_tags("scalars")
        if not s.empty:
            s["order"] = s["tag"].map({t: i for i, t in enumerate(order)})
            scalars.append(s)
        if not h.empty:
            hists.append(h)
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # noqa: E731
    return cat(scalars), cat(hists), damaged


def _read_hparams(run_dir: Path) -> dict[str, Any]:
    """The flattened config train.py wrote as HParams (``{"model.skip": 1.0, ...}``), or {}."""
    from tbparse import SummaryReader

    flat: dict[str, Any] = {}
    for path in _event_files(run_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                df = SummaryReader(str(path), event_types={"hparams"}).hparams
            except Exception as err:  # noqa: BLE001 - the config is optional for the report
                log.warning("could not read the HParams of %s: %s", path, err)
                continue
        if not df.empty:
            flat.update(zip(df["tag"], df["value"]))
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return nested


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None  # in-process runs (tests, notebooks) have no .hydra/
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        log.warning("could not read %s: %s", path, err)
        return None


def _read_export(run_dir: Path) -> dict[str, Any]:
    """The monitor's ``grad_stats.json`` (layer order, non-finite steps), or {}."""
    path = run_dir / "grad_stats.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("could not read %s: %s", path, err)
        return {}
    return doc if isinstance(doc, dict) else {}


def _layers_from_tags(tags, quantity: str) -> list[str]:
    prefix = quantity + "/"
    return [t[len(prefix):] for t in tags if t.startswith(prefix)]


def _add_histograms(a: Histogram, b: Histogram) -> Histogram:
    edges = np.union1d(a.edges, b.edges)
    counts = np.zeros(edges.size - 1)
    for h in (a, b):
        idx = np.searchsorted(edges, h.edges[:-1])
        np.add.at(counts, np.clip(idx, 0, counts.size - 1), h.counts)
    return Histogram(step=min(a.step, b.step), edges=edges, counts=counts)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run directory (events, ``.hydra/``, ``grad_stats.json``) into a :class:`Run`."""
    run_dir = Path(run_dir)
    run = Run(path=run_dir, name=run_dir.name)
    scalars, hists, run.damaged = _read_events(run_dir)

    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    if not isinstance(config, dict):
        # In-process runs (tests, notebooks) have no .hydra/; train.py wrote the flattened
        # config as HParams, which is enough for model.skip and model.depth.
        config = _unflatten(_read_hparams(run_dir))
    run.config = config if isinstance(config, dict) else {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    run.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []

    if not scalars.empty:
        # A resumed run repeats the steps between its last checkpoint and the kill in a new
        # event file; the later write of a (tag, step) is the one that counts.
        scalars = scalars.sort_values(["tag", "step", "wall_time"], kind="stable")
        scalars = scalars.drop_duplicates(["tag", "step"], keep="last")
        for tag, g in scalars.groupby("tag", sort=False):
            run.scalars[str(tag)] = Series(
                steps=g["step"].to_numpy(np.int64),
                values=g["value"].to_numpy(np.float64),
                wall_times=g["wall_time"].to_numpy(np.float64),
            )
        first_seen = scalars.groupby("tag")["order"].min().sort_values(kind="stable")
        tag_order = list(first_seen.index)
    else:
        tag_order = []

    if not hists.empty:
        for tag, g in hists.sort_values(["tag", "step"], kind="stable").groupby("tag", sort=False):
            items = []
            for row in g.itertuples(index=False):
                limits = np.asarray(row.limits, dtype=np.float64)
                counts = np.asarray(row.counts, dtype=np.float64)
                if counts.size == 0 or not np.isfinite(row.min):
                    continue
                # TensorBoard stores right bucket edges; the first bucket starts at `min`.
                edges = np.concatenate(([min(row.min, limits[0])], limits))
                items.append(Histogram(step=int(row.step), edges=edges, counts=counts))
            if items:
                run.histograms[str(tag)] = items

    export = _read_export(run_dir)
    layers = export.get("layers")
    if not (isinstance(layers, list) and layers):
        layers = []
        for q in LAYER_QUANTITIES:
            layers = _layers_from_tags(tag_order, q)
            if layers:
                break
        if not layers:
            layers = _layers_from_tags(list(run.histograms), HIST_QUANTITY)
    run.layers = [str(x) for x in layers]
    blocks = export.get("blocks")
    if not (isinstance(blocks, list) and blocks):
        blocks = next((b for q in BLOCK_QUANTITIES if (b := _layers_from_tags(tag_order, q))), [])
    run.blocks = [str(x) for x in blocks]

    epoch = run.scalars.get("epoch")
    if epoch is not None and epoch.steps.size:
        steps, first = np.unique(epoch.steps, return_index=True)
        run._epoch_steps, run._epoch_values = steps, epoch.values[first].astype(np.int64)
    elif export.get("step") and export.get("epoch") and len(export["step"]) == len(export["epoch"]):
        run._epoch_steps = np.asarray(export["step"], np.int64)
        run._epoch_values = np.asarray(export["epoch"], np.int64)
    elif (val := run.scalars.get("val/loss")) is not None and val.steps.size:
        # Validation closes an epoch and is logged at that epoch's last step.
        ends = np.unique(val.steps)
        run._epoch_steps = np.concatenate(([0], ends + 1))
        run._epoch_values = np.arange(run._epoch_steps.size, dtype=np.int64)

    nonfinite = {int(s) for s in export.get("nonfinite_steps") or []}
    for tag, s in run.scalars.items():
        if tag.startswith(("grad_norm/", "grad_rms/")):
            nonfinite.update(s.steps[~np.isfinite(s.values)].tolist())
    run.nonfinite_steps = sorted(nonfinite)
    run.diverged_at = export.get("diverged_at") if isinstance(export.get("diverged_at"), dict) else None
    if run.diverged_at is None and (d := run.scalars.get("train/diverged")) is not None and d.steps.size:
        run.diverged_at = {"step": int(d.steps[0]), "layer": None}
    return run


def assign_labels(runs: list[Run]) -> None:
    """Give each run a short ``label`` and a ``name`` relative to the runs' common parent.

    The label lists the overrides that not every run shares (``model.skip=false``), so a
    legend shows what differs; runs whose overrides are identical add their directory name.
    """
    if not runs:
        return
    paths = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    for run, p in zip(runs, paths):
        run.name = p.relative_to(common).as_posix() if p != common else p.name
    shared = set.intersection(*(set(r.group) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        differing = [o for o in run.group if o not in shared]
        run.label = ", ".join(differing) if differing else ""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if not run.label:
            run.label = _short(run.name)
        elif counts[run.label] > 1:
            run.label = f"{run.label} ({_short(run.path.name)})"


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def load_runs(paths: list[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Find and read every run at or below ``paths``; returns ``(runs, notes)``.

    ``notes`` are short messages for the reader (runs that have not logged yet, runs with
    no scalars). Runs are sorted by their group (overrides), then path.

    Raises:
        ConfigError: a path is missing, or holds no run.
    """
    if not paths:
        raise ConfigError("no directory given; usage: python -m skipstudy.report RUN_OR_SWEEP_DIR... [--out DIR]")
    found: dict[Path, None] = {}
    notes: list[str] = []
    for p in paths:
        runs, pending = find_run_dirs(p)
        for r in runs:
            found[r.resolve()] = None
        for d in pending:
            notes.append(f"{d}: no event files yet (not started, or failed before logging); left out")
    runs = [load_run(d) for d in found]
    damaged = [d for run in runs for d in run.damaged]
    if damaged and not any(run.has_data for run in runs):
        raise ConfigError(f"{damaged[0]}{f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''}; "
                          "replace it from a backup, or pass runs whose event files are intact")
    notes += damaged
    for run in runs:
        if run.damaged and not run.has_data:
            continue
        if not run.has_data:
            notes.append(f"{run.path}: event files hold no scalars yet; listed without numbers")
    assign_labels(runs)
    runs.sort(key=lambda r: (r.group, r.name))
    return runs, notes
