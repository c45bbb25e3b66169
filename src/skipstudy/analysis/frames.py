"""Runs as pandas tables, for analyses of one's own: :func:`load_runs` (every scalar of a run or
a sweep, one tidy table) and :func:`load_grad_stats` (one run's monitor values, a row per
recorded step). Both read through :mod:`skipstudy.analysis.logs`, as the report does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from skipstudy.analysis import logs, settings

LEADING = ("run", "path")
TRAILING = ("step", "epoch", "tag", "value")


def load_runs(path: str | os.PathLike | list[str | os.PathLike]) -> pd.DataFrame:
    """Every scalar of every run at or below ``path`` (a run directory, a sweep, a whole
    experiment folder, or a list of them) as one tidy table, a row per (run, tag, step):

    ``run`` (the run's directory relative to the runs' common parent), ``path`` (absolute), one
    column per override any run was started with (``model.depth``, ``model.skip``, ``seed``...;
    the run's own value from its config, also where the run left that key at its default;
    numbers and booleans as such), ``step`` (global step), ``epoch``, ``tag`` and ``value``
    (float; NaN and inf kept). Raises ConfigError when there is no run, as the report does.
    """
    runs, _ = logs.read_runs(list(path) if isinstance(path, (list, tuple)) else [path])
    keys = list(dict.fromkeys(settings.override_key(o) for run in runs for o in run.overrides))
    frames = []
    for run in runs:
        own = {k: settings.setting(run, k) for k in keys}
        for tag, series in run.scalars.items():
            frames.append(pd.DataFrame({
                "run": run.name, "path": str(run.path), **own,
                "step": series.steps, "epoch": run.epoch_at(series.steps), "tag": tag, "value": series.values}))
    columns = [*LEADING, *keys, *TRAILING]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)[columns]
    return table.sort_values(["run", "tag", "step"], kind="stable", ignore_index=True)


def load_grad_stats(run: str | os.PathLike | logs.Run) -> pd.DataFrame:
    """One run's gradient-monitor values as a table: a row per recorded step (columns ``step``,
    ``epoch``), a column per monitor tag (``grad_norm/output/conv1``, ``grad_decay/slope``...),
    in the monitor's layer order. Read from the run's ``grad_stats.json``/``.csv`` export
    (float64, missing or non-finite values NaN), else from its TensorBoard scalars (float32)."""
    if not isinstance(run, logs.Run):
        run = logs.load_run(run)
    export = logs.read_export(run.path)
    if export is not None:
        # float64 turns the export's nulls (steps a tag was not recorded at) into NaN.
        return pd.DataFrame({"step": export["step"], "epoch": export["epoch"],
                             **{tag: np.array(values, dtype=np.float64) for tag, values in export["series"].items()}})
    csv = Path(run.path) / "grad_stats.csv"
    if csv.is_file():
        return pd.read_csv(csv)
    monitored = {t: pd.Series(s.values, index=s.steps) for t, s in run.scalars.items() if logs.is_monitor_tag(t)}
    if not monitored:
        return pd.DataFrame(columns=["step", "epoch"])
    wide = pd.concat(monitored, axis=1).sort_index()
    wide.insert(0, "epoch", run.epoch_at(wide.index.to_numpy()))
    return wide.rename_axis("step").reset_index()
