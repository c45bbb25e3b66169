"""The report's summary table: one row per run, written as ``summary.csv`` and ``summary.md``."""

from __future__ import annotations

import csv
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from skipstudy.analysis.figures import final_train_loss, final_val_acc
from skipstudy.analysis.logs import Run, load_run, load_runs
from skipstudy.errors import ConfigError

COLUMNS = (
    "run",
    "overrides",
    "skip",
    "depth",
    "epochs",
    "steps",
    "final_train_loss",
    "final_val_acc",
    "grad_attenuation",
    "grad_decay_slope",
    "nonfinite_steps",
    "wall_time_s",
    "status",
)

# What each column means, shown under the Markdown table and in index.html.
COLUMN_NOTES = {
    "epochs": "completed epochs",
    "final_train_loss": "last epoch-mean training loss",
    "final_val_acc": "last validation accuracy",
    "grad_attenuation": (
        "median over the last recorded epoch of RMS(dL/d output) of the first tracked layer "
        "divided by that of the last; << 1 means gradients shrink on their way to the input"
    ),
    "grad_decay_slope": (
        "median over the last recorded epoch of grad_decay/slope: least-squares slope of log10 RMS(dL/d output) "
        "against tracked-layer index; decades per layer by which gradients shrink towards the input"
    ),
    "nonfinite_steps": "recorded steps with non-finite gradients (empty: no gradient monitor)",
    "wall_time_s": "seconds from the run's first to its last logged event",
    "status": "ok, diverged (non-finite gradients or loss), partial (fewer epochs than trainer.max_epochs: running or stopped), no data",
}


def gradient_attenuation(run: Run, quantity: str = "grad_rms/output") -> float:
    """Median, over the last epoch with values, of ``quantity`` at the first tracked layer
    divided by ``quantity`` at the last tracked layer (same steps, finite values only)."""
    series = run.layer_series(quantity)
    if len(series) < 2:
        return math.nan
    names = list(series)  # forward order
    first, last = series[names[0]], series[names[-1]]
    steps, i, j = np.intersect1d(first.steps, last.steps, return_indices=True)
    a, b = first.values[i], last.values[j]
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    if not ok.any():
        return math.nan
    epochs = run.epoch_at(steps)
    last_epoch = epochs[ok].max()
    sel = ok & (epochs == last_epoch)
    return float(np.median(a[sel] / b[sel]))


def decay_slope(run: Run) -> float:
    """Median of the finite ``grad_decay/slope`` values of the last epoch that has any (NaN: none)."""
    s = run.series("grad_decay/slope")
    if s is None:
        return math.nan
    ok = np.isfinite(s.values)
    if not ok.any():
        return math.nan
    epochs = run.epoch_at(s.steps)
    return float(np.median(s.values[ok & (epochs == epochs[ok].max())]))


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (> 0.5) of Student's t with ``df`` degrees of freedom: the CDF from the
    density (closed form) integrated numerically, inverted by interpolation."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, 200.0 if df < 3 else 40.0, 400_001)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    cdf = 0.5 + np.concatenate(([0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))))
    return float(np.interp(p, cdf, x))


SLOPE_COLUMNS = ("setting", "seeds", "mean", "ci95_low", "ci95_high")


def slope_by_setting(runs: list[Run]) -> list[dict[str, Any]]:
    """``grad_decay_slope`` across the seeds of each setting (runs that share their
    computing overrides): mean and a 95% Student-t interval (none from a single seed)."""
    groups: dict[tuple[str, ...], list[float]] = {}
    for run in runs:
        value = decay_slope(run)
        if math.isfinite(value):
            groups.setdefault(run.group, []).append(value)
    rows = []
    for group, values in groups.items():
        v = np.asarray(values)
        mean = float(v.mean())
        half = t_quantile(0.975, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else math.nan
        rows.append({"setting": " ".join(group) or "(defaults)", "seeds": int(v.size), "mean": mean,
                     "ci95_low": mean - half, "ci95_high": mean + half})
    return rows


def write_slope_table(rows: list[dict[str, Any]], path: str | Path) -> None:
    """``decay_slope.md``: the depth-decay exponent per setting across seeds."""
    lines = ["| " + " | ".join(SLOPE_COLUMNS) + " |", "|" + "|".join("---" for _ in SLOPE_COLUMNS) + "|"]
    for row in rows:
        cells = [f"`{row['setting']}`", str(row["seeds"])] + [_fmt(row[c], c) for c in SLOPE_COLUMNS[2:]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines += ["", "- grad_decay_slope per run as in summary.md; mean over a setting's seeds, 95% Student-t interval."]
    Path(path).write_text("\n".join(lines) + "\n")


def run_status(run: Run) -> str:
    """``no data``, ``diverged``, ``partial`` or ``ok`` (see :data:`COLUMN_NOTES`)."""
    if not run.has_data:
        return "no data"
    if run.diverged:
        step = run.diverged_at.get("step") if run.diverged_at else (run.nonfinite_steps[0] if run.nonfinite_steps else None)
        return "diverged" + (f" at step {step}" if step is not None else "")
    max_epochs = run.option("trainer.max_epochs")
    bounded_otherwise = run.option("trainer.max_steps", -1) not in (-1, None) or run.option("trainer.max_time") or run.option(
        "trainer.fast_dev_run"
    )
    if isinstance(max_epochs, int) and max_epochs > 0 and not bounded_otherwise and run.epochs_done < max_epochs:
        return f"partial ({run.epochs_done}/{max_epochs} epochs)"
    return "ok"


def summary_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One dict per run with the keys of :data:`COLUMNS` (numbers stay numbers; NaN and
    None mean "not available")."""
    rows = []
    for run in runs:
        has_monitor = bool(run.layers) or bool(run.nonfinite_steps)
        wall = run.wall_time
        rows.append({
            "run": run.name,
            "overrides": " ".join(run.overrides),
            "skip": run.skip,
            "depth": run.depth,
            "epochs": run.epochs_done,
            "steps": run.num_steps,
            # None (blank) when nothing was logged; NaN (shown) when the loss itself is NaN.
            "final_train_loss": final_train_loss(run) if run.series("train/loss") or run.series("train/loss_epoch") else None,
            "final_val_acc": final_val_acc(run),
            "grad_attenuation": gradient_attenuation(run),
            "grad_decay_slope": decay_slope(run),
            "nonfinite_steps": len(run.nonfinite_steps) if has_monitor else None,
            "wall_time_s": None if wall is None else round(wall, 2),
            "status": run_status(run),
        })
    return rows


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan" if column in ("final_train_loss",) else ""
        if not math.isfinite(value):
            return str(value)
        if column == "final_val_acc":
            return f"{value:.4f}"
        if column == "wall_time_s":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def formatted_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The rows as display strings (used by the Markdown and HTML tables)."""
    return [{c: _fmt(row[c], c) for c in COLUMNS} for row in rows]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"  # as in the overrides and the Markdown table
    return value


def write_csv(rows: list[dict[str, Any]], path: str | Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """``summary.csv`` (or ``probes.csv`` with :data:`PROBE_COLUMNS`): full-precision numbers;
    empty cells mean "not available"."""
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=columns)
        out.writeheader()
        for row in rows:
            out.writerow({c: _csv_cell(row[c]) for c in columns})


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: list[dict[str, Any]], path: str | Path) -> None:
    """``summary.md``: the table as GitHub-flavoured Markdown, with the column notes."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in formatted_rows(rows):
        lines.append("| " + " | ".join(_md_cell(row[c] if c != "overrides" else f"`{row[c]}`" if row[c] else "") for c in COLUMNS) + " |")
    lines.append("")
    lines += [f"- `{c}`: {note}" for c, note in COLUMN_NOTES.items()]
    Path(path).write_text("\n".join(lines) + "\n")


# -- probe results -------------------------------------------------------------------------

PROBE_COLUMNS = ("run", "probe", "step", "skip", "depth", "key", "value")


def probe_rows(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per headline number of every probe record at or below ``paths``.

    Probes write ``<run>/probes/<name>/<name>_step<N>.json`` with their returned numbers
    under ``"summary"``; the headline numbers are those without a ``/`` in their key
    (per-layer and per-stage values stay in the JSON and TensorBoard).
    """
    import json

    rows = []
    for path in paths:
        root = Path(path)
        if not root.is_dir():
            continue
        for record_path in sorted(root.rglob("probes/*/*_step*.json")):
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            summary = record.get("summary") if isinstance(record, dict) else None
            if not isinstance(summary, dict):
                continue
            run = record_path.parents[2]
            model = record.get("model") or {}
            for key, value in summary.items():
                if "/" not in key:
                    rows.append({"run": str(run.relative_to(root)) if run != root else run.name,
                                 "probe": record_path.parent.name, "step": record.get("step"),
                                 "skip": model.get("skip"), "depth": record.get("depth"), "key": key, "value": value})
    return rows


def probe_tables(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per probe: ``(header, cells)``, one line per run and step, one column per headline key."""
    tables: dict[str, tuple[list[str], dict[tuple, dict[str, Any]]]] = {}
    for row in rows:
        keys, lines = tables.setdefault(row["probe"], ([], {}))
        if row["key"] not in keys:
            keys.append(row["key"])
        lines.setdefault((row["run"], row["step"], row["skip"], row["depth"]), {})[row["key"]] = row["value"]
    out = {}
    for probe, (keys, lines) in tables.items():
        header = ["run", "step", "skip", "depth", *keys]
        cells = [[run, _fmt(step, "step"), _fmt(skip, "skip"), _fmt(depth, "depth"),
                  *(_fmt(values.get(k), k) for k in keys)] for (run, step, skip, depth), values in lines.items()]
        out[probe] = (header, cells)
    return out


# ---------------------------------------------------------------------- end-of-run text
# What `python -m skipstudy.train` prints when a run (and, for a sweep, the whole sweep) ends:
# the same numbers as the report's summary table, read back from the run's own logs once, so
# nothing is added to the training loop.


def _shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it, shell-quoted."""
    path = Path(path).resolve()
    try:
        text = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return shlex.quote(text or ".")


def end_layer_rms(run: Run, quantity: str = "grad_rms/output") -> dict[str, Any] | None:
    """The first and last tracked layer's ``quantity``: at the first recorded step (the
    network at initialisation) and as the median over the last recorded epoch.

    Returns ``{"first", "last": layer names, "init": (first, last), "final": (first, last)}``,
    or None when fewer than two layers were recorded.
    """
    series = run.layer_series(quantity)
    if len(series) < 2:
        return None
    names = list(series)
    first, last = series[names[0]], series[names[-1]]

    def final(s) -> float:
        v = s.values[np.isfinite(s.values)]
        epochs = run.epoch_at(s.steps[np.isfinite(s.values)])
        return float(np.median(v[epochs == epochs.max()])) if v.size else math.nan

    return {
        "first": names[0], "last": names[-1],
        "init": (float(first.values[0]) if first.values.size else math.nan,
                 float(last.values[0]) if last.values.size else math.nan),
        "final": (final(first), final(last)),
    }


def _g(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _ratio(pair: tuple[float, float]) -> float:
    a, b = pair
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def run_summary(run_dir: str | Path) -> str:
    """A few lines on a finished run: where it is, its final metrics, how much the output
    gradient shrinks from the last tracked layer to the first, and how to look further."""
    run = load_run(run_dir)
    row = summary_rows([run])[0]
    val_loss = run.series("val/loss")
    lines = [f"Run {row['status']}: {_shown(run_dir)}",
             f"  epochs {row['epochs']}, steps {row['steps']}: train loss {_g(row['final_train_loss'])}, "
             f"val loss {_g(val_loss.last() if val_loss else None)}, val acc {_g(row['final_val_acc'])}"]
    ends = end_layer_rms(run)
    if ends is not None:
        lines.append(
            f"  output-gradient RMS {ends['first']} / {ends['last']}: "
            f"{_g(ends['init'][0])} / {_g(ends['init'][1])} = {_g(_ratio(ends['init']))} at step 0, "
            f"{_g(ends['final'][0])} / {_g(ends['final'][1])} = {_g(_ratio(ends['final']))} in the last epoch")
    lines.append(f"  tensorboard --logdir {_shown(run_dir)}")
    return "\n".join(lines)


def sweep_summary(sweep_dir: str | Path) -> str | None:
    """The sweep's runs side by side (one line each), and the commands that show more;
    None when no run below ``sweep_dir`` has logged anything."""
    try:
        runs, _ = load_runs([sweep_dir])
    except ConfigError:
        return None
    header = ("run", "train loss", "val acc", "first/last layer", "grad RMS first", "grad RMS last",
              "first/last", "first/last at step 0")
    table = [header]
    for run, row in zip(runs, summary_rows(runs)):
        ends = end_layer_rms(run)
        # The overrides that tell the runs apart (their directories are below the sweep's).
        cells = [run.label or run.name, _g(row["final_train_loss"]), _g(row["final_val_acc"])]
        if ends is None:
            cells += ["-"] * 5
        else:
            cells += [f"{ends['first']}/{ends['last']}", _g(ends["final"][0]), _g(ends["final"][1]),
                      _g(_ratio(ends["final"])), _g(_ratio(ends["init"]))]
        table.append(tuple(cells))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"Sweep done: {len(runs)} runs in {_shown(sweep_dir)}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines += ["  (output-gradient RMS: median over the last epoch, and at step 0; << 1 means the gradient",
              "   shrinks on its way back to the input)",
              "Look further:",
              f"  tensorboard --logdir {_shown(sweep_dir)}",
              f"  python -m skipstudy.report {_shown(sweep_dir)}"]
    return "\n".join(lines)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback of ``skipstudy.train`` (``hydra.callbacks.sweep_summary`` in train.yaml):
    after a multirun, print its runs side by side. ``enabled=false`` turns it off (the probe
    app composes train.yaml, and its jobs are not training runs)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not self.enabled:
            return
        text = sweep_summary(config.hydra.sweep.dir)
        if text:
            print(text, flush=True)
