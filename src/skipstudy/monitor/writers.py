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


def write_scalars(writer: Any, values: dict[str, float], step: int) -> None:
    """A step's scalars as one event: one protobuf, not one ``add_scalar`` per tag (hundreds
    of tags a step would cost milliseconds of Python a step)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
    writer._get_file_writer().add_summary(summary, step)


def write_histogram(writer: Any, tag: str, edges: np.ndarray, counts: np.ndarray, s1: float, s2: float,
                    step: int) -> None:
    """A histogram from binned counts; ``edges`` has one more entry than ``counts``."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return
    first, last = nonzero[0], nonzero[-1]
    writer.add_histogram_raw(tag, min=float(edges[first]), max=float(edges[last + 1]), num=float(counts.sum()),
                             sum=float(s1), sum_squares=float(s2),
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
        table = np.stack(self.rows) if self.rows else np.zeros((0, len(self.tags)))
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


def _figure(width: float, columns: int = 1):
    """A Figure on an Agg canvas (no pyplot, no global state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _nan_stats(data: np.ndarray, *percentiles: float) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: layers without weights
        return [np.nanmedian(data, axis=0), *np.nanpercentile(data, list(percentiles), axis=0)]


def _depth_axis(ax, names: list[str], xlabel: str, ticks: int, legend: float) -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    step = max(1, math.ceil(len(names) / ticks))
    ax.set_xticks(np.arange(1, len(names) + 1)[::step], names[::step], rotation=90, fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)


def gradient_flow_figure(layers: list[str], out_norms: np.ndarray, weight_norms: np.ndarray, title: str):
    """Output and weight gradient norms (``[steps, layers]``) against layer depth, log y: the
    median over the steps, a band from the 10th to the 90th percentile, a median of exactly 0
    as a marker on the axis floor (:func:`mark_zeros`)."""
    fig, (ax,) = _figure(max(6.0, 0.18 * len(layers) + 3))
    depth = np.arange(1, len(layers) + 1)
    lines = ((out_norms, "output gradient", "tab:blue"), (weight_norms, "weight gradient", "tab:orange"))
    for data, label, color in lines:
        data = np.where(np.isfinite(data), data, np.nan)  # zeros stay: a median can be 0
        if np.all(np.isnan(data)):
            continue
        med, lo, hi = _nan_stats(data, 10, 90)
        ax.plot(depth, np.where(med > 0, med, np.nan), marker="o", ms=3, color=color, label=f"{label} norm (median)")
        mark_zeros(ax, depth, med, color, label=f"{label} norm exactly 0 (axis floor)")
        if data.shape[0] > 1:
            lo, hi = np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan)
            ax.fill_between(depth, lo, hi, color=color, alpha=0.2, lw=0)
    ax.set_ylabel("L2 norm")
    ax.set_title(title)
    _depth_axis(ax, layers, "layer (forward order)", 40, 8)
    fig.tight_layout()
    return fig


def figure_rgb(fig) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 array (for ``add_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# The signal-propagation figure's panels: forward statistics of the block outputs, then the
# backward ones of their gradients (Brock et al. 2021, Fig. 1).
SPP_PANELS = {
    "spp/mean_sq": "avg channel squared mean",
    "spp/var": "avg channel variance",
    "spp/branch_var": "residual branch: avg channel variance",
    "spp/grad_mean_rms": "gradient: sqrt(avg channel squared mean)",
    "spp/grad_std": "gradient: sqrt(avg channel variance)",
    "spp/grad_branch_std": "branch gradient: sqrt(avg channel variance)",
}


def signal_propagation_figure(blocks: list[str], data: dict[str, np.ndarray], title: str):
    """Each ``spp/*`` quantity (``[steps, blocks]``) against block depth, median over the
    steps, log y; forward statistics left, backward right."""
    fig, axes = _figure(max(9.0, 0.25 * len(blocks) + 6), 2)
    names = list(SPP_PANELS)
    sides = ((axes[0], names[:3], "forward (block output)"), (axes[1], names[3:], "backward (output gradient)"))
    for ax, panel, label in sides:
        for name in panel:
            (med,) = _nan_stats(np.where(np.isfinite(data[name]) & (data[name] > 0), data[name], np.nan))
            if not np.all(np.isnan(med)):
                ax.plot(np.arange(1, len(blocks) + 1), med, marker="o", ms=3, label=SPP_PANELS[name])
        ax.set_title(label, fontsize=9)
        _depth_axis(ax, blocks, "residual block (forward order)", 30, 7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
