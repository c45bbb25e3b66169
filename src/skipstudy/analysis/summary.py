"""The numbers of the report: one row per run (``summary.csv``/``.md``), the decay slope across
seeds, the probes' headline numbers, and the lines a run and a sweep end with."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from skipstudy.analysis.logs import Run, final_train_loss, final_val_acc, load_run, read_runs
from skipstudy.analysis.settings import override_key, setting
from skipstudy.errors import ConfigError

METRICS = ("epochs", "steps", "final_train_loss", "final_val_acc", "grad_attenuation", "grad_decay_slope",
           "nonfinite_steps", "wall_time_s", "status")
COLUMNS = ("run", "overrides", "skip", "depth", *METRICS)  # summary.csv, before the varying keys
# Shown under the Markdown table and in index.html.
COLUMN_NOTES = {
    "epochs": "completed epochs",
    "final_train_loss": "last epoch-mean training loss",
    "final_val_acc": "last validation accuracy",
    "grad_attenuation": "median over the last recorded epoch of RMS(dL/d output) of the first tracked layer "
                        "divided by that of the last; << 1 means gradients shrink on their way to the input",
    "grad_decay_slope": "median over the last recorded epoch of grad_decay/slope: least-squares slope of log10 "
                        "RMS(dL/d output) against tracked-layer index; decades per layer by which gradients shrink "
                        "towards the input",
    "nonfinite_steps": "recorded steps with non-finite gradients (empty: no gradient monitor)",
    "wall_time_s": "seconds from the run's first to its last logged event",
    "status": "ok, diverged (non-finite gradients or loss), partial (fewer epochs than trainer.max_epochs: "
              "running or stopped), no data",
}
SLOPE_COLUMNS = ("setting", "seeds", "mean", "ci95_low", "ci95_high")
PROBE_COLUMNS = ("run", "probe", "step", "skip", "depth", "key", "value")
CODE_COLUMNS = ("run", "overrides", "setting")  # shown as code in the Markdown and HTML tables


def _last_epoch_median(run: Run, steps: np.ndarray, values: np.ndarray) -> float:
    """Median of the finite ``values`` in the last epoch that has any (NaN: none)."""
    ok = np.isfinite(values)
    if not ok.any():
        return math.nan
    epochs = run.epoch_at(steps)
    return float(np.median(values[ok & (epochs == epochs[ok].max())]))


def gradient_attenuation(run: Run, quantity: str = "grad_rms/output") -> float:
    series = list(run.layer_series(quantity).values())
    if len(series) < 2:
        return math.nan
    steps, i, j = np.intersect1d(series[0].steps, series[-1].steps, return_indices=True)
    a, b = series[0].values[i], series[-1].values[j]
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    return _last_epoch_median(run, steps, np.divide(a, b, out=np.full(a.shape, np.nan), where=ok))


def decay_slope(run: Run) -> float:
    return math.nan if (s := run.series("grad_decay/slope")) is None else _last_epoch_median(run, s.steps, s.values)


def slope_by_setting(runs: list[Run], keys: list[str] | None = None) -> list[dict[str, Any]]:
    """``grad_decay_slope`` over the seeds of each setting: mean and 95% Student-t interval. A
    setting is named by its overrides of ``keys`` (default: all of its group)."""
    from scipy import stats  # here: scipy.stats takes a while to import, and training never needs it

    groups: dict[tuple[str, ...], list[float]] = {}
    for run in runs:
        if math.isfinite(value := decay_slope(run)):
            groups.setdefault(run.group, []).append(value)
    rows = []
    for group, values in groups.items():
        v = np.asarray(values)
        low, high = stats.t.interval(0.95, v.size - 1, v.mean(), stats.sem(v)) if v.size > 1 else (math.nan, math.nan)
        shown = [o for o in group if keys is None or override_key(o) in keys]
        rows.append({"setting": ", ".join(shown) or "(all runs)", "seeds": int(v.size), "mean": float(v.mean()),
                     "ci95_low": float(low), "ci95_high": float(high)})
    return rows


def run_status(run: Run) -> str:
    if not run.has_data:
        return "no data"
    if run.diverged:
        step = run.diverged_at.get("step") if run.diverged_at else (run.nonfinite_steps or [None])[0]
        return "diverged" + (f" at step {step}" if step is not None else "")
    max_epochs = run.option("trainer.max_epochs")
    bounded_otherwise = (run.option("trainer.max_steps", -1) not in (-1, None) or run.option("trainer.max_time")
                         or run.option("trainer.fast_dev_run"))
    if isinstance(max_epochs, int) and max_epochs > 0 and not bounded_otherwise and run.epochs_done < max_epochs:
        return f"partial ({run.epochs_done}/{max_epochs} epochs)"
    return "ok"


def table_columns(keys: list[str]) -> tuple[str, ...]:
    """summary.md and index.html: the keys that vary across the runs (their values typed), the
    numbers, and the run's directory last; ``skip``/``depth`` only when no key says them already."""
    derived = [c for c, key in (("skip", "model.skip"), ("depth", "model.depth")) if key not in keys]
    return (*keys, *derived, *METRICS, "run")


def summary_rows(runs: list[Run], keys: list[str] = ()) -> list[dict[str, Any]]:
    """A row per run; ``keys``: override keys to add as columns (:func:`settings.varying_keys`)."""
    return [{
        **{key: setting(run, key) for key in keys},
        "run": run.name, "overrides": " ".join(run.overrides), "skip": run.skip, "depth": run.depth,
        "epochs": run.epochs_done, "steps": run.num_steps,
        # None (blank) when nothing was logged; NaN (shown) when the loss itself is NaN.
        "final_train_loss": final_train_loss(run) if run.series("train/loss") or run.series("train/loss_epoch") else None,
        "final_val_acc": final_val_acc(run), "grad_attenuation": gradient_attenuation(run),
        "grad_decay_slope": decay_slope(run),
        "nonfinite_steps": len(run.nonfinite_steps) if run.layers or run.nonfinite_steps else None,
        "wall_time_s": None if run.wall_time is None else round(run.wall_time, 2), "status": run_status(run),
    } for run in runs]


def fmt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan" if column == "final_train_loss" else ""
        return {"final_val_acc": f"{value:.4f}", "wall_time_s": f"{value:.1f}"}.get(column, f"{value:.4g}")
    return str(value)


def cells(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> list[list[str]]:
    return [[fmt(row[c], c) for c in columns] for row in rows]


def write_csv(rows: list[dict[str, Any]], path: str | Path, columns: tuple[str, ...] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        # Booleans as in the overrides and the Markdown table.
        out.writerows([fmt(v, "") if v is None or isinstance(v, bool) else v for v in (row[c] for c in columns)]
                      for row in rows)


def write_markdown(header: tuple[str, ...], rows: list[list[str]], notes: list[str], path: str | Path) -> None:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        row = [f"`{text}`" if c in CODE_COLUMNS and text else text for c, text in zip(header, row)]
        lines.append("| " + " | ".join(text.replace("|", "\\|").replace("\n", " ") for text in row) + " |")
    Path(path).write_text("\n".join([*lines, "", *notes]) + "\n")


def probe_rows(paths: list[str | Path]) -> list[dict[str, Any]]:
    """A row per headline number (a key without ``/``) of every probe record
    ``<run>/probes/<name>/<name>_step<N>.json`` at or below ``paths``."""
    rows = []
    for root in map(Path, paths):
        for record_path in sorted(root.rglob("probes/*/*_step*.json")) if root.is_dir() else []:
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue  # a probe still writing
            run = record_path.parents[2]
            rows += [{"run": str(run.relative_to(root)) if run != root else run.name, "probe": record_path.parent.name,
                      "step": record.get("step"), "skip": record.get("model", {}).get("skip"),
                      "depth": record.get("depth"), "key": key, "value": value}
                     for key, value in record.get("summary", {}).items() if "/" not in key]
    return rows


def probe_tables(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per probe: ``(header, cells)``, a line per run and step, a column per headline key."""
    tables: dict[str, tuple[dict[str, None], dict[tuple, dict[str, Any]]]] = {}  # keys: in order first seen
    for row in rows:
        keys, lines = tables.setdefault(row["probe"], ({}, {}))
        keys[row["key"]] = None
        lines.setdefault((row["run"], row["step"], row["skip"], row["depth"]), {})[row["key"]] = row["value"]
    return {probe: (["run", "step", "skip", "depth", *keys],
                    [[*(fmt(v, "") for v in line), *(fmt(values.get(k), k) for k in keys)] for line, values in lines.items()])
            for probe, (keys, lines) in tables.items()}


# What `python -m skipstudy.train` prints when a run or a sweep ends: the report's numbers, read
# back from the logs once, so nothing is added to the training loop.

def _shown(path: str | Path) -> str:
    path, cwd = Path(path).resolve(), Path.cwd().resolve()
    return shlex.quote(str(path.relative_to(cwd) if path.is_relative_to(cwd) else path))


def end_layer_rms(run: Run, quantity: str = "grad_rms/output") -> dict[str, Any] | None:
    """The first and last tracked layer's ``quantity`` at the first recorded step (the net at
    initialisation) and as the median over the last recorded epoch."""
    series = run.layer_series(quantity)
    if len(series) < 2:
        return None
    names = list(series)
    ends = (series[names[0]], series[names[-1]])
    return {"first": names[0], "last": names[-1], "init": tuple(float(s.values[0]) for s in ends),
            "final": tuple(_last_epoch_median(run, s.steps, s.values) for s in ends)}


def _g(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _ratio(pair: tuple[float, float]) -> float:
    a, b = pair
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def run_summary(run_dir: str | Path, run: Run | None = None) -> str:
    """The lines a finished run prints; ``run``: the run already read from ``run_dir``'s logs."""
    run = run or load_run(run_dir)
    row = summary_rows([run])[0]
    val_loss = run.series("val/loss")
    lines = [f"Run {row['status']}: {_shown(run_dir)}",
             f"  epochs {row['epochs']}, steps {row['steps']}: train loss {_g(row['final_train_loss'])}, "
             f"val loss {_g(val_loss.last() if val_loss else None)}, val acc {_g(row['final_val_acc'])}"]
    if (ends := end_layer_rms(run)) is not None:
        lines.append(
            f"  output-gradient RMS {ends['first']} / {ends['last']}: "
            f"{_g(ends['init'][0])} / {_g(ends['init'][1])} = {_g(_ratio(ends['init']))} at step 0, "
            f"{_g(ends['final'][0])} / {_g(ends['final'][1])} = {_g(_ratio(ends['final']))} in the last epoch")
    return "\n".join([*lines, f"  tensorboard --logdir {_shown(run_dir)}"])


def sweep_summary(sweep_dir: str | Path) -> str | None:
    """None before any run logged."""
    try:
        runs, _ = read_runs([sweep_dir])
    except ConfigError:
        return None
    table = [("run", "train loss", "val acc", "first/last layer", "grad RMS first", "grad RMS last",
              "first/last", "first/last at step 0")]
    for run, row in zip(runs, summary_rows(runs)):
        ends = end_layer_rms(run)
        # The label: the overrides that tell the runs apart.
        table.append((run.label or run.name, _g(row["final_train_loss"]), _g(row["final_val_acc"]),
                      *(["-"] * 5 if ends is None else
                        [f"{ends['first']}/{ends['last']}", _g(ends["final"][0]), _g(ends["final"][1]),
                         _g(_ratio(ends["final"])), _g(_ratio(ends["init"]))])))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join([f"Sweep done: {len(runs)} runs in {_shown(sweep_dir)}",
                      *("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table),
                      "  (output-gradient RMS: median over the last epoch, and at step 0; << 1 means the gradient",
                      "   shrinks on its way back to the input)",
                      "Look further:",
                      f"  tensorboard --logdir {_shown(sweep_dir)}",
                      f"  python -m skipstudy.report {_shown(sweep_dir)}"])


class SweepSummary(Callback):
    """Hydra callback (train.yaml's ``hydra.callbacks.sweep_summary``): a multirun ends with its
    runs side by side. The probe app composes train.yaml too and sets ``enabled=false``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.enabled and (text := sweep_summary(config.hydra.sweep.dir)):
            print(text, flush=True)
