"""``python -m skipstudy.report RUN_OR_SWEEP_DIR... [--out DIR]``: the runs' TensorBoard logs in,
figures, a GIF per run, tables and an offline ``index.html`` out (README, "Report"). A figure
no run has data for is left out, and index.html says why."""

from __future__ import annotations

import argparse
import html
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from skipstudy.analysis import figures as F
from skipstudy.analysis import histograms as H
from skipstudy.analysis import summary as S
from skipstudy.analysis.logs import Run, read_runs
from skipstudy.analysis.settings import varying_keys
from skipstudy.errors import ConfigError

# Figure stem -> (section title, what it shows, why it may be missing).
SECTIONS = {
    "gradient_flow": (
        "1. Gradient flow",
        "RMS and L2 norm of the gradient w.r.t. each tracked layer's output, against layer depth "
        "(forward order), at the first, middle and last epoch; median over each epoch's recorded steps.",
        "no run has grad_rms/output or grad_norm/output scalars (trained with monitor=off?)"),
    "grad_norm_steps": (
        "2. Per-layer gradient norm over training",
        "grad_norm/output of every tracked layer at every recorded step; dark lines are early layers.",
        "no run has grad_norm/output scalars (trained with monitor=off?)"),
    "grad_hist_epochs": (
        "3. Gradient magnitude histograms",
        "Histogram of log10|gradient w.r.t. the layer output| per layer (rows, forward order), per epoch; "
        "colour: fraction of the layer's non-zero gradient elements. Animated per run below.",
        "no run has grad_hist/output histograms (monitor.hist_every_n_epochs=0 or monitor=off?)"),
    "training_curves": (
        "4. Loss and accuracy",
        "Per-step training loss and accuracy, per-epoch validation loss and accuracy.",
        "no run has train/* or val/* scalars yet"),
    "depth_sweep": (
        "5. Depth sweep",
        "Final training loss and validation error against depth, skip (solid) vs plain (dashed), "
        "after He et al. 2016, Fig. 6.",
        "no run has a known depth (model.depth, or a resnetNN model); the mini net has none"),
    "activation_std": (
        "6. Forward activation std",
        "Standard deviation of each tracked layer's output against depth, first/middle/last epoch.",
        "no run has act/std scalars (monitor.activations=false or monitor=off?)"),
    "grad_split": (
        "7. Skip/branch gradient split",
        "Per residual block, the gradient reaching its input split into the part through the shortcut "
        "and the part through the residual branch: their norm ratio, the branch part's norm and their cosine, "
        "first/middle/last epoch. Plain twins have only the branch part (no ratio or cosine).",
        "no run has grad_split/* scalars (no residual blocks, monitor.blocks=false or monitor=off?)"),
    "signal_propagation": (
        "8. Signal propagation",
        "Signal-propagation plot (Brock et al. 2021): per block output, the average channel variance and "
        "squared mean, the residual branch's average channel variance, and the output gradient's "
        "sqrt(average channel variance), against block depth.",
        "no run has spp/* scalars (no residual blocks, monitor.blocks=false or monitor=off?)"),
}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.path { white-space: normal; min-width: 16em; }
td.path code { font-size: 0.8em; word-break: break-all; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 48%; }
figcaption, .small { font-size: 0.85em; color: #555; }
.bad { color: #b00; font-weight: bold; }
"""


@dataclass
class Report:
    out: Path
    runs: list[Run]
    files: list[str] = field(default_factory=list)  # relative to out
    gif_frames: dict[str, tuple[str, int]] = field(default_factory=dict)  # run name -> (GIF, frames)
    notes: list[str] = field(default_factory=list)
    probe_images: list[tuple[str, str]] = field(default_factory=list)  # (file in out, caption)
    probe_rows: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the overrides that differ between the runs


def _slug(text: str, n: int = 50) -> str:
    return (re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_.")[:n] or "run").replace("=", "-")


def build_report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None,
                 relative_depth: bool = False) -> Report:
    """Write the report of the runs at or below ``paths`` into ``out`` (default ``DIR/report``
    for one directory, ``./report`` for several). ``relative_depth``: depth profiles against
    layer index / (layers - 1), so nets of different depth overlay. Raises ConfigError when
    there is no run."""
    paths = [str(p) for p in paths]
    runs, notes = read_runs(paths)
    if out is None:
        first = Path(paths[0])
        out = (first.parent if first.is_file() else first) / "report" if len(paths) == 1 else "report"
    report = Report(out=Path(out), runs=runs, notes=notes)
    report.out.mkdir(parents=True, exist_ok=True)

    for stem, fig in F.run_figures(runs, relative_depth=relative_depth).items():
        fig.savefig(report.out / f"{stem}.png")
        report.files.append(f"{stem}.png")
    grid = H.HistogramGrid(runs)
    for i, run in enumerate(runs, start=1):
        name = f"grad_hist_{i:02d}_{_slug(run.label)}.gif"  # the number keeps names apart
        if frames := H.write_histogram_gif(grid, run, report.out / name):
            report.files.append(name)
            report.gif_frames[run.name] = name, frames

    # Tables show only the overrides that tell these runs apart, one typed column each.
    report.keys = varying_keys(runs)
    rows = S.summary_rows(runs, report.keys)
    # summary.csv: every column, the varying keys' after the full overrides.
    S.write_csv(rows, report.out / "summary.csv", (*S.COLUMNS[:2], *report.keys, *S.COLUMNS[2:]))
    columns = S.table_columns(report.keys)
    S.write_markdown(columns, S.cells(rows, columns), [f"- `{c}`: {note}" for c, note in S.COLUMN_NOTES.items()],
                     report.out / "summary.md")
    report.files += ["summary.csv", "summary.md"]
    slopes = S.slope_by_setting(runs, report.keys)
    if slopes:
        S.write_markdown(S.SLOPE_COLUMNS, S.cells(slopes, S.SLOPE_COLUMNS),
                         ["- grad_decay_slope per run as in summary.md; mean over a setting's seeds, 95% Student-t "
                          "interval."], report.out / "decay_slope.md")
        report.files.append("decay_slope.md")

    report.notes += [f"{run.name}: {len(run.nonfinite_steps)} step(s) with non-finite gradients, first at step "
                     f"{run.nonfinite_steps[0]}; figures leave non-finite values out" for run in runs if run.nonfinite_steps]
    report.probe_images = copy_probe_images(paths, report.out)
    report.probe_rows = S.probe_rows(paths)
    if report.probe_rows:
        S.write_csv(report.probe_rows, report.out / "probes.csv", S.PROBE_COLUMNS)
        report.files.append("probes.csv")
    report.files += [name for name, _ in report.probe_images]
    write_index(report, rows, paths, slopes)
    report.files.append("index.html")
    return report


def copy_probe_images(paths: list[str], out: Path) -> list[tuple[str, str]]:
    """Copy the probes' PNGs (``<run>/probes/<name>/*.png``, a probe sweep's
    ``<sweep>/probes/<name>/*_comparison.png``) into ``out/probes/``, so index.html stays
    self-contained; the caption is the path relative to the input directory."""
    out = out.resolve()
    found: list[tuple[str, str]] = []
    for root in (Path(p).resolve() for p in paths):
        for png in sorted(root.rglob("probes/**/*.png")) if root.is_dir() else []:
            if out not in png.parents:  # not an earlier report's copy
                name = f"probes/{len(found) + 1:03d}_{_slug(png.stem, 80)}.png"
                (out / "probes").mkdir(exist_ok=True)
                shutil.copyfile(png, out / name)
                found.append((name, str(png.relative_to(root))))
    return found


def _number(text: str) -> bool:
    try:
        return float(text) is not None
    except ValueError:
        return False


def _table(header, rows: list[list[str]]) -> str:
    def cell(column: str, text: str) -> str:
        kind = ("bad" if column == "status" and text.startswith("diverged") else "path" if column in ("run", "overrides")
                else "num" if _number(text) else "")
        attr = f' class="{kind}"' if kind else ""
        text = html.escape(text)
        return f"<td{attr}><code>{text}</code></td>" if column in S.CODE_COLUMNS and text else f"<td{attr}>{text}</td>"

    return ("<div class='scroll'><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(cell(c, t) for c, t in zip(header, row)) + "</tr>" for row in rows)
            + "</table></div>")


def write_index(report: Report, rows, paths: list[str], slopes) -> None:
    """Relative file names only: works offline."""
    esc = html.escape
    notes = "".join(f"<li><b>{esc(c)}</b>: {esc(n)}</li>" for c, n in S.COLUMN_NOTES.items())
    columns = S.table_columns(report.keys)
    keys = (f"<li>{', '.join(f'<b>{esc(k)}</b>' for k in report.keys)}: the overrides that differ between these "
            "runs (all overrides: summary.csv)</li>" if report.keys else "")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>skipstudy report</title>',
        f"<style>{STYLE}</style></head><body>\n<h1>skipstudy report</h1>",
        f"<p class='small'>{len(report.runs)} run(s) from {esc(', '.join(paths))}; "
        f"written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Line style: solid = skip connections, "
        "dashed = plain twin (model.skip=false); colour = setting.</p>",
        f"<h2>Summary</h2>{_table(columns, S.cells(rows, columns))}<ul class='small'>{keys}{notes}</ul>",
        "<p class='small'>Also as <a href='summary.csv'>summary.csv</a> and <a href='summary.md'>summary.md</a>.</p>",
    ]
    if slopes:
        parts.append(f"<h2>Depth-decay exponent across seeds</h2>{_table(S.SLOPE_COLUMNS, S.cells(slopes, S.SLOPE_COLUMNS))}"
                     "<p class='small'>grad_decay_slope (see the summary) per setting: mean over its seeds and a 95% "
                     "Student-t interval. Also as <a href='decay_slope.md'>decay_slope.md</a>.</p>")
    for stem, (title, what, missing) in SECTIONS.items():
        parts += [f"<h2>{esc(title)}</h2>",
                  f"<p class='small'>{esc(what)}</p><img src=\"{esc(stem)}.png\" alt=\"{esc(title)}\">"
                  if f"{stem}.png" in report.files else f"<p class='small'>Not drawn: {esc(missing)}.</p>"]
        if stem == "grad_hist_epochs":
            labels = {run.name: esc(run.label) for run in report.runs}
            parts += [f'<figure><img src="{esc(gif)}" alt="histogram animation of {labels[name]}">'
                      f"<figcaption>{labels[name]} ({frames} epoch{'s' if frames != 1 else ''})</figcaption></figure>"
                      for name, (gif, frames) in report.gif_frames.items()]
    if report.probe_images or report.probe_rows:
        parts.append("<h2>Probes</h2><p class='small'>Written by <code>python -m skipstudy.probe</code> "
                     "or by probes during training (see the README's probe table for each number).</p>")
    parts += [f"<h3>{esc(probe)}</h3>{_table(header, table)}"
              for probe, (header, table) in S.probe_tables(report.probe_rows).items()]
    if report.probe_rows:
        parts.append("<p class='small'>Also as <a href='probes.csv'>probes.csv</a>.</p>")
    parts += [f'<figure><img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
              for name, caption in report.probe_images]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    (report.out / "index.html").write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipstudy.report", description=(
        "Turn the TensorBoard logs of skipstudy runs into comparison figures, a GIF per run, a summary table "
        "and an offline index.html."))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run directories, or directories with runs below them (sweeps)")
    parser.add_argument("--out", default=None, help="output folder (default: DIR/report for one DIR, ./report for several)")
    parser.add_argument("--relative-depth", action="store_true",
                        help="draw depth profiles against relative depth, layer index / (layers - 1), so that nets of "
                             "different depth overlay (default: the layers by name, in forward order)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = build_report(args.dirs, args.out, relative_depth=args.relative_depth)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(report.runs)} run(s) -> {report.out / 'index.html'} ({len(report.files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
