"""``python -m skipstudy.report RUN_OR_SWEEP_DIR... [--out DIR]``: logs in, comparison out.

Reads the TensorBoard event files of one run or many (every run directory at or below the
given paths), and writes into ``--out``:

* ``gradient_flow.png``     output-gradient RMS and norm per layer vs depth (first/middle/last epoch)
* ``grad_norm_steps.png``   per-layer output-gradient norm over training steps
* ``grad_hist_<run>.gif``   log10|gradient| histogram per layer, one frame per epoch, per run
* ``grad_hist_epochs.png``  the same histograms as small multiples (runs x epochs)
* ``training_curves.png``   train/val loss and accuracy
* ``depth_sweep.png``       final train loss and val error vs depth, skip vs plain
* ``activation_std.png``    forward activation std per layer vs depth
* ``summary.csv``, ``summary.md``  one row per run
* ``probes.csv``            the probes' headline numbers (when runs have probe outputs)
* ``index.html``            all of the above; works offline (local, relative files only)

A figure whose data no run has (no gradient monitor, no depth) is left out, and
``index.html`` says why. Missing or empty input directories end with ``Error: ...`` on
stderr and exit status 2, like ``skipstudy.train``.
"""

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
from skipstudy.analysis.logs import Run, load_runs
from skipstudy.analysis.summary import (
    COLUMN_NOTES,
    COLUMNS,
    PROBE_COLUMNS,
    SLOPE_COLUMNS,
    formatted_rows,
    probe_rows,
    probe_tables,
    slope_by_setting,
    summary_rows,
    write_csv,
    write_markdown,
    write_slope_table,
)
from skipstudy.errors import ConfigError

log = logging.getLogger(__name__)

# Figure stem -> (section title, what it shows, why it may be missing).
SECTIONS = {
    "gradient_flow": (
        "1. Gradient flow",
        "RMS and L2 norm of the gradient w.r.t. each tracked layer's output, against layer depth "
        "(forward order), at the first, middle and last epoch; median over each epoch's recorded steps.",
        "no run has grad_rms/output or grad_norm/output scalars (trained with monitor=off?)",
    ),
    "grad_norm_steps": (
        "2. Per-layer gradient norm over training",
        "grad_norm/output of every tracked layer at every recorded step; dark lines are early layers.",
        "no run has grad_norm/output scalars (trained with monitor=off?)",
    ),
    "grad_hist_epochs": (
        "3. Gradient magnitude histograms",
        "Histogram of log10|gradient w.r.t. the layer output| per layer (rows, forward order), per epoch; "
        "colour: fraction of the layer's non-zero gradient elements. Animated per run below.",
        "no run has grad_hist/output histograms (monitor.hist_every_n_epochs=0 or monitor=off?)",
    ),
    "training_curves": (
        "4. Loss and accuracy",
        "Per-step training loss and accuracy, per-epoch validation loss and accuracy.",
        "no run has train/* or val/* scalars yet",
    ),
    "depth_sweep": (
        "5. Depth sweep",
        "Final training loss and validation error against depth, skip (solid) vs plain (dashed), "
        "after He et al. 2016, Fig. 6.",
        "no run has a known depth (model.depth, or a resnetNN model); the mini net has none",
    ),
    "activation_std": (
        "6. Forward activation std",
        "Standard deviation of each tracked layer's output against depth, first/middle/last epoch.",
        "no run has act/std scalars (monitor.activations=false or monitor=off?)",
    ),
    "grad_split": (
        "7. Skip/branch gradient split",
        "Per residual block, the gradient reaching its input split into the part through the shortcut "
        "and the part through the residual branch: their norm ratio, the branch part's norm and their cosine, "
        "first/middle/last epoch. Plain twins have only the branch part (no ratio or cosine).",
        "no run has grad_split/* scalars (no residual blocks, monitor.blocks=false or monitor=off?)",
    ),
    "signal_propagation": (
        "8. Signal propagation",
        "Signal-propagation plot (Brock et al. 2021): per block output, the average channel variance and "
        "squared mean, the residual branch's average channel variance, and the output gradient's "
        "sqrt(average channel variance), against block depth.",
        "no run has spp/* scalars (no residual blocks, monitor.blocks=false or monitor=off?)",
    ),
}


@dataclass
class Report:
    """What :func:`build_report` wrote: the output folder, the loaded runs, every file
    written (relative to ``out``), each run's GIF and its frame count (by run name), and
    notes for the reader."""

    out: Path
    runs: list[Run]
    files: list[str] = field(default_factory=list)
    gifs: dict[str, str] = field(default_factory=dict)
    gif_frames: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # (file in out/, caption): the probes' own PNGs, copied in (see copy_probe_images)
    probe_images: list[tuple[str, str]] = field(default_factory=list)
    # the probes' headline numbers (skipstudy.analysis.summary.probe_rows)
    probe_rows: list[dict] = field(default_factory=list)


def _slug(text: str, n: int = 50) -> str:
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_.")
    return (slug[:n] or "run").replace("=", "-")


def default_out(paths: list[str]) -> Path:
    """``<DIR>/report`` for one input directory, ``./report`` for several."""
    if len(paths) == 1:
        p = Path(paths[0])
        return (p.parent if p.is_file() else p) / "report"
    return Path("report")


def build_report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Report:
    """Read the runs at or below ``paths`` and write the figures, GIFs, tables and
    ``index.html`` into ``out`` (default: :func:`default_out`).

    Raises:
        ConfigError: a path does not exist or holds no run.
    """
    paths = [str(p) for p in paths]
    runs, notes = load_runs(paths)
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out=out, runs=runs, notes=list(notes))

    for stem, fig in F.run_figures(runs).items():
        fig.savefig(out / f"{stem}.png")
        report.files.append(f"{stem}.png")

    grid = F.HistogramGrid(runs)
    used: set[str] = set()
    for i, run in enumerate(runs, start=1):
        name = f"grad_hist_{i:02d}_{_slug(run.label)}.gif"
        while name in used:
            name = name.replace(".gif", "_.gif")
        used.add(name)
        frames = F.write_histogram_gif(grid, run, out / name)
        if frames:
            report.files.append(name)
            report.gifs[run.name] = name
            report.gif_frames[run.name] = frames

    rows = summary_rows(runs)
    write_csv(rows, out / "summary.csv")
    write_markdown(rows, out / "summary.md")
    report.files += ["summary.csv", "summary.md"]
    slopes = slope_by_setting(runs)
    if slopes:
        write_slope_table(slopes, out / "decay_slope.md")
        report.files.append("decay_slope.md")

    for run in runs:
        if run.nonfinite_steps:
            report.notes.append(
                f"{run.name}: {len(run.nonfinite_steps)} step(s) with non-finite gradients, first at step "
                f"{run.nonfinite_steps[0]}; figures leave non-finite values out"
            )
    report.probe_images = copy_probe_images(paths, out)
    report.probe_rows = probe_rows(paths)
    if report.probe_rows:
        write_csv(report.probe_rows, out / "probes.csv", PROBE_COLUMNS)
        report.files.append("probes.csv")
    report.files += [name for name, _ in report.probe_images]
    write_index(report, rows, paths, slopes)
    report.files.append("index.html")
    return report


def copy_probe_images(paths: list[str], out: Path) -> list[tuple[str, str]]:
    """Copy the probes' PNGs into ``out/probes/`` so that index.html stays self-contained.

    ``python -m skipstudy.probe`` writes ``<run>/probes/<name>/*.png`` and, after a probe
    sweep, ``<sweep>/probes/<name>/*_comparison.png``. Returns ``(file, caption)`` pairs,
    the caption being the image's path relative to the input directory.
    """
    out = out.resolve()
    found: list[tuple[str, str]] = []
    for path in paths:
        root = Path(path).resolve()
        if not root.is_dir():
            continue
        for png in sorted(root.rglob("probes/**/*.png")):
            if out in png.parents:  # an earlier report's copies, not a probe's output
                continue
            name = f"probes/{len(found) + 1:03d}_{_slug(png.stem, 80)}.png"
            (out / "probes").mkdir(exist_ok=True)
            shutil.copyfile(png, out / name)
            found.append((name, str(png.relative_to(root))))
    return found


def _table_html(rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for row in formatted_rows(rows):
        cells = []
        for c in COLUMNS:
            text = html.escape(row[c])
            cls = ' class="bad"' if c == "status" and row[c].startswith("diverged") else ""
            cells.append(f"<td{cls}><code>{text}</code></td>" if c in ("overrides", "run") and text else f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(n)}</li>" for c, n in COLUMN_NOTES.items())
    return f"<table><tr>{head}</tr>{''.join(body)}</table><ul class='small'>{notes}</ul>"


STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
td code { font-size: 0.9em; word-break: break-all; }
img { max-width: 100%; border: 1px solid #eee; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 48%; }
figcaption, .small { font-size: 0.85em; color: #555; }
.bad { color: #b00; font-weight: bold; }
"""


def _slope_html(slopes) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SLOPE_COLUMNS)
    body = "".join(
        "<tr><td><code>" + html.escape(r["setting"]) + f"</code></td><td>{r['seeds']}</td>"
        + "".join(f"<td>{r[c]:.4g}</td>" if r[c] == r[c] else "<td></td>" for c in SLOPE_COLUMNS[2:]) + "</tr>"
        for r in slopes
    )
    return (f"<h2>Depth-decay exponent across seeds</h2><table><tr>{head}</tr>{body}</table>"
            "<p class='small'>grad_decay_slope (see the summary) per setting: mean over its seeds and a 95% "
            "Student-t interval. Also as <a href='decay_slope.md'>decay_slope.md</a>.</p>")


def write_index(report: Report, rows, paths: list[str], slopes=()) -> None:
    """``index.html``: the table and every figure, referenced by relative file names only."""
    out = report.out
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>skipstudy report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>skipstudy report</h1>",
        f"<p class='small'>{len(report.runs)} run(s) from {esc(', '.join(paths))}; "
        f"written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Line style: solid = skip connections, "
        "dashed = plain twin (model.skip=false); colour = setting.</p>",
        "<h2>Summary</h2>",
        _table_html(rows),
        "<p class='small'>Also as <a href='summary.csv'>summary.csv</a> and <a href='summary.md'>summary.md</a>.</p>",
    ]
    if slopes:
        parts.append(_slope_html(slopes))
    for stem, (title, what, missing) in SECTIONS.items():
        parts.append(f"<h2>{esc(title)}</h2>")
        if (out / f"{stem}.png").is_file() and f"{stem}.png" in report.files:
            parts.append(f"<p class='small'>{esc(what)}</p>")
            parts.append(f'<img src="{esc(stem)}.png" alt="{esc(title)}">')
        else:
            parts.append(f"<p class='small'>Not drawn: {esc(missing)}.</p>")
        if stem == "grad_hist_epochs":
            for run in report.runs:
                gif = report.gifs.get(run.name)
                if gif:
                    parts.append(
                        f'<figure><img src="{esc(gif)}" alt="histogram animation of {esc(run.label)}">'
                        f"<figcaption>{esc(run.label)} ({report.gif_frames[run.name]} epochs)</figcaption></figure>"
                    )
    if report.probe_images or report.probe_rows:
        parts.append("<h2>Probes</h2><p class='small'>Written by <code>python -m skipstudy.probe</code> "
                     "or by probes during training (see the README's probe table for each number).</p>")
    for probe, (header, cells) in probe_tables(report.probe_rows).items():
        parts.append(f"<h3>{esc(probe)}</h3><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>" for line in cells)
                     + "</table>")
    if report.probe_rows:
        parts.append("<p class='small'>Also as <a href='probes.csv'>probes.csv</a>.</p>")
    if report.probe_images:
        for name, caption in report.probe_images:
            parts.append(f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts), encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m skipstudy.report",
        description="Turn the TensorBoard logs of skipstudy runs into comparison figures, "
        "a GIF per run, a summary table and an offline index.html.",
    )
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run directories, or directories with runs below them (sweeps)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: DIR/report for one DIR, ./report for several)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = build_report(args.dirs, args.out)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(report.runs)} run(s) -> {report.out / 'index.html'} ({len(report.files)} files)")
    return 0
