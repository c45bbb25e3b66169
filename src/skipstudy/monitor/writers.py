"""Where the monitor's host-side numbers go: TensorBoard, a JSON/CSV export, figures.
Everything here receives numpy arrays already on the host; only rank 0 writes."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from skipstudy.monitor.quantities import BINS


def write_scalars(writer: Any, values: dict[str, float], step: int) -> None:
    """A step's scalars as one event: one protobuf, not one ``add_scalar`` per tag (hundreds
    of tags: 27 ms a step for 400, one proto 1.6 ms), through the open writer's public ``file_writer``
    (torch's ``add_hparams`` writes so); the monitor writes before Lightning's ``finalize`` closes it."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
    writer.file_writer.add_summary(summary, step)


def write_histograms(writer: Any, layers: list[str], rows: np.ndarray, scale: float, step: int) -> None:
    """``grad_hist/output/<layer>`` from the ``hist`` statistic's rows ``[n, sum, sum of squares,
    count per bin...]`` over :data:`BINS`. They were binned from the raw (micro-batch,
    per-process, loss-scaled) elements: shifting by log10(scale) makes them elements of the
    gradient of the optimised loss."""
    shift = math.log10(scale)
    edges = np.asarray(BINS.edges()) + shift
    for name, (n, s1, s2, *counts) in zip(layers, rows):
        nonzero = np.flatnonzero(counts)
        if nonzero.size == 0:
            continue
        first, last = nonzero[0], nonzero[-1]
        writer.add_histogram_raw(f"grad_hist/output/{name}", min=float(edges[first]), max=float(edges[last + 1]),
                                 num=float(n), sum=float(s1 + n * shift),
                                 sum_squares=float(s2 + 2 * shift * s1 + n * shift * shift),
                                 bucket_limits=[float(e) for e in edges[first + 1 : last + 2]],
                                 bucket_counts=[float(c) for c in counts[first : last + 1]], global_step=step)


class SeriesExport:
    """The recorded series as ``<run>/grad_stats.json`` or ``<run>/grad_stats.csv``.

    JSON: ``{"layers": [...forward order], "blocks": [...], "step": [...], "epoch": [...],
    "series": {tag: [value per recorded step]}, "nonfinite_steps": [...], "diverged_at":
    {"step", "layer"} or null}``, missing and non-finite values ``null``. CSV: columns
    ``step, epoch`` and one per tag (empty: missing or non-finite); rows are appended, so a
    long run's CSV costs nothing to flush.
    """

    def __init__(self, path: Path, fmt: str, layers: list[str], tags: list[str], blocks: list[str]) -> None:
        self.path, self.fmt, self.layers, self.tags, self.blocks = path, fmt, layers, tags, blocks
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.rows: list[np.ndarray] = []
        self.earlier_nonfinite: list[int] = []  # a resumed run's, before the resumed step
        self._csv_written = 0

    def keep_earlier(self, before: int) -> None:
        """On resume into the same run directory: take over the file's rows for steps before
        ``before`` if it tracked the same layers and tags, so the export stays whole."""
        try:
            if self.fmt == "json":
                doc = json.loads(self.path.read_text())
                if doc["layers"] != self.layers or set(doc["series"]) != set(self.tags):
                    return
                steps, epochs = doc["step"], doc["epoch"]
                table = np.array([doc["series"][t] for t in self.tags], dtype=np.float64).T  # null: NaN
                self.earlier_nonfinite = [s for s in doc["nonfinite_steps"] if s < before]
            else:
                with self.path.open(newline="") as f:
                    header, *lines = csv.reader(f)
                if header != ["step", "epoch", *self.tags]:
                    return
                steps, epochs = [int(r[0]) for r in lines], [int(r[1]) for r in lines]
                table = np.array([[v or "nan" for v in r[2:]] for r in lines], dtype=np.float64)
        except (OSError, ValueError, KeyError, IndexError):
            return  # no old export, or an unreadable one: replaced, not merged
        for step, epoch, row in zip(steps, epochs, table):
            if step < before:
                self.append(step, epoch, row)

    def append(self, step: int, epoch: int, row: np.ndarray) -> None:
        self.steps.append(step)
        self.epochs.append(epoch)
        self.rows.append(row.astype(np.float64))  # a 1e-40 norm survives; TensorBoard keeps float32

    def flush(self, nonfinite_steps: list[int], diverged_at: tuple[int, str] | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "csv":
            with self.path.open("a" if self._csv_written else "w", newline="") as f:
                out = csv.writer(f)
                if not self._csv_written:
                    out.writerow(["step", "epoch", *self.tags])
                for i in range(self._csv_written, len(self.rows)):
                    cells = ("" if not math.isfinite(v) else repr(v) for v in self.rows[i].tolist())
                    out.writerow([self.steps[i], self.epochs[i], *cells])
            self._csv_written = len(self.rows)
            return
        table = np.stack(self.rows)
        doc = {"layers": self.layers, "blocks": self.blocks, "step": self.steps, "epoch": self.epochs,
               "series": {tag: [v if math.isfinite(v) else None for v in table[:, j].tolist()]
                          for j, tag in enumerate(self.tags)},
               "nonfinite_steps": self.earlier_nonfinite + nonfinite_steps,
               "diverged_at": None if diverged_at is None else {"step": diverged_at[0], "layer": diverged_at[1]}}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, allow_nan=False))
        os.replace(tmp, self.path)  # a reader never sees half a file


# ------------------------------------------------------------------ figures


def mark_zeros(ax, x, values, color, label: str | None = "exactly 0 (at the axis floor)") -> None:
    """Points where ``values`` is exactly 0 as down-triangles on the floor of a log-y ``ax``
    (a log axis has no 0, and a gap would read as "not recorded"), whatever its limits later."""
    from matplotlib.transforms import blended_transform_factory

    zero = np.asarray(values, dtype=np.float64) == 0
    if zero.any():
        ax.plot(np.asarray(x)[zero], np.zeros(int(zero.sum())), ls="none", marker="v", ms=6, color=color,
                transform=blended_transform_factory(ax.transData, ax.transAxes), clip_on=False, label=label)


def figure_rgb(fig) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 array (for ``add_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _profiles(ax, names: list[str], series: dict[str, np.ndarray], xlabel: str) -> None:
    """Each ``[steps, units]`` series against depth, log y: the median over the steps, a band
    from the 10th to the 90th percentile, a median of exactly 0 on the axis floor."""
    depth = np.arange(1, len(names) + 1)
    for label, data in series.items():
        data = np.where(np.isfinite(data), data, np.nan)  # zeros stay: a median can be 0
        if np.all(np.isnan(data)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: layers without weights
            med, lo, hi = np.nanmedian(data, axis=0), *np.nanpercentile(data, [10, 90], axis=0)
        (line,) = ax.plot(depth, np.where(med > 0, med, np.nan), marker="o", ms=3, label=f"{label} (median)")
        mark_zeros(ax, depth, med, line.get_color(), label=f"{label} exactly 0 (axis floor)")
        if data.shape[0] > 1:
            lo, hi = np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan)
            ax.fill_between(depth, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    step = max(1, math.ceil(len(names) / 40))
    ax.set_xticks(depth[::step], names[::step], rotation=90, fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def profile_figure(names: list[str], panels: dict[str, dict[str, np.ndarray]], title: str, xlabel: str):
    """One panel per ``{panel title: {label: [steps, units]}}`` (:func:`_profiles`), on an Agg
    canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.18 * len(names) + 3) * len(panels), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (panel, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        _profiles(ax, names, series, xlabel)
        ax.set_title(panel, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gradient_flow_figure(layers: list[str], out_norms: np.ndarray, weight_norms: np.ndarray, title: str):
    """Output and weight gradient norms (``[steps, layers]``) against layer depth."""
    series = {"output gradient norm": out_norms, "weight gradient norm": weight_norms}
    return profile_figure(layers, {"L2 norm": series}, title, "layer (forward order)")


# The signal-propagation figure's panels (Brock et al. 2021, Fig. 1): forward statistics of the
# block outputs, then the backward ones of their gradients.
SPP_PANELS = {
    "forward (block output)": {"spp/mean_sq": "avg channel squared mean", "spp/var": "avg channel variance",
                               "spp/branch_var": "residual branch: avg channel variance"},
    "backward (output gradient)": {"spp/grad_mean_rms": "gradient: sqrt(avg channel squared mean)",
                                   "spp/grad_std": "gradient: sqrt(avg channel variance)",
                                   "spp/grad_branch_std": "branch gradient: sqrt(avg channel variance)"},
}
