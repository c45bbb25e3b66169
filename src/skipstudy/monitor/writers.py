"""Where the monitor's host-side numbers go: TensorBoard, a JSON/CSV export, a figure.

Everything here receives numpy arrays that are already on the host; nothing touches the
device. Only rank 0 constructs writers (the callback checks ``trainer.is_global_zero``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def run_dir(trainer: Any) -> Path:
    """The run directory: ``trainer.log_dir`` (== the Hydra output dir in skipstudy), else
    ``trainer.default_root_dir``. A collective under DDP: call it on every rank."""
    return Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir)


def find_summary_writer(trainer: Any):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or None without one."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def other_loggers(trainer: Any) -> list:
    """The trainer's loggers that are not TensorBoard (CSVLogger, W&B...): the monitor's
    scalars reach them through Lightning's ``Logger.log_metrics``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg for lg in getattr(trainer, "loggers", []) or [] if not isinstance(lg, TensorBoardLogger)]


class TensorBoardWriter:
    """Scalars, histograms and images into the run's TensorBoard event file."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary

            self._summary_cls = Summary
            self._file_writer = writer._get_file_writer()
        except (ImportError, AttributeError):  # tensorboardX or another writer: one call per tag
            self._summary_cls = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """All of a step's scalars as one event (one protobuf, not one ``add_scalar`` per tag:
        hundreds of tags per step would otherwise cost milliseconds of Python per step)."""
        if self._summary_cls is None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            return
        Summary = self._summary_cls
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._file_writer.add_summary(summary, step)

    def histogram_raw(self, tag: str, edges: np.ndarray, counts: np.ndarray, s1: float, s2: float, step: int) -> None:
        """A histogram from device-binned counts; ``edges`` has one more entry than ``counts``."""
        nonzero = np.flatnonzero(counts)
        if nonzero.size == 0:
            return
        first, last = nonzero[0], nonzero[-1]
        self.writer.add_histogram_raw(
            tag,
            min=float(edges[first]),
            max=float(edges[last + 1]),
            num=float(counts.sum()),
            sum=float(s1),
            sum_squares=float(s2),
            bucket_limits=[float(e) for e in edges[first + 1 : last + 2]],
            bucket_counts=[float(c) for c in counts[first : last + 1]],
            global_step=step,
        )

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if values.size:
            self.writer.add_histogram(tag, values, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()


class SeriesExport:
    """The recorded series as ``<run>/grad_stats.json`` or ``<run>/grad_stats.csv``.

    JSON: ``{"layers": [...forward order], "blocks": [...residual blocks], "step": [...],
    "epoch": [...], "series": {tag:
    [value per recorded step]}, "nonfinite_steps": [...], "diverged_at": {"step", "layer"} or
    null}``; missing and non-finite values are ``null``. CSV: one row per recorded step,
    columns ``step, epoch`` and one per tag (empty cell: missing or non-finite); rows are
    appended, so a long run's CSV costs nothing to flush.
    """

    def __init__(self, path: Path, fmt: str, layers: list[str], tags: list[str], blocks: list[str] | None = None) -> None:
        self.path = path
        self.fmt = fmt
        self.layers = layers
        self.blocks = blocks or []
        self.tags = tags
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.rows: list[np.ndarray] = []
        self.nonfinite_steps: list[int] = []
        self.diverged_at: tuple[int, str] | None = None
        self._csv_written = 0

    def keep_earlier(self, before: int) -> None:
        """On resume into the same run directory: take over the existing file's rows for steps
        before ``before`` (if it tracked the same layers and tags), so the export stays whole."""
        if not self.path.is_file():
            return
        try:
            if self.fmt == "json":
                doc = json.loads(self.path.read_text())
                if doc.get("layers") != self.layers or set(doc.get("series", {})) != set(self.tags):
                    return
                for i, (step, epoch) in enumerate(zip(doc["step"], doc["epoch"])):
                    if step < before:
                        row = [doc["series"][tag][i] for tag in self.tags]
                        self.append(step, epoch, np.array([np.nan if v is None else v for v in row], np.float64))
                self.nonfinite_steps = [s for s in doc.get("nonfinite_steps", []) if s < before]
            else:
                with self.path.open(newline="") as f:
                    rows = list(csv.reader(f))
                if not rows or rows[0] != ["step", "epoch", *self.tags]:
                    return
                for r in rows[1:]:
                    if int(r[0]) < before:
                        self.append(int(r[0]), int(r[1]), np.array([float(v) if v else np.nan for v in r[2:]]))
                self._csv_written = 0  # the next flush rewrites the file: earlier rows, then new ones
        except (OSError, ValueError, KeyError, IndexError):
            return  # an unreadable old export is replaced, not merged

    def append(self, step: int, epoch: int, row: np.ndarray) -> None:
        self.steps.append(step)
        self.epochs.append(epoch)
        # float64: a norm of 1e-40 (float32 subnormal) or a relative difference of 1e-9
        # survives into the export; TensorBoard's scalars are float32 regardless.
        self.rows.append(row.astype(np.float64))

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "csv":
            self._flush_csv()
        else:
            self._flush_json()

    def _flush_json(self) -> None:
        table = np.stack(self.rows) if self.rows else np.zeros((0, len(self.tags)), np.float64)
        series = {tag: [_finite_or_none(v) for v in table[:, j].tolist()] for j, tag in enumerate(self.tags)}
        doc = {
            "layers": self.layers,
            "blocks": self.blocks,
            "step": self.steps,
            "epoch": self.epochs,
            "series": series,
            "nonfinite_steps": self.nonfinite_steps,
            "diverged_at": None if self.diverged_at is None
            else {"step": self.diverged_at[0], "layer": self.diverged_at[1]},
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, allow_nan=False))
        os.replace(tmp, self.path)  # a reader never sees half a file

    def _flush_csv(self) -> None:
        new = self.rows[self._csv_written :]
        mode = "a" if self._csv_written else "w"
        with self.path.open(mode, newline="") as f:
            out = csv.writer(f)
            if not self._csv_written:
                out.writerow(["step", "epoch", *self.tags])
            for i, row in enumerate(new, start=self._csv_written):
                out.writerow([self.steps[i], self.epochs[i], *(("" if not math.isfinite(v) else repr(v)) for v in row.tolist())])
        self._csv_written = len(self.rows)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def mark_zeros(ax, x, values, color, label: str | None = "exactly 0 (at the axis floor)") -> None:
    """Draw the points where ``values`` is exactly 0 as down-triangles on the bottom edge of a
    log-y ``ax`` (a log axis has no 0, and a gap would read as "not recorded"). The markers
    sit at the axis floor whatever limits the axis gets later (y in axes coordinates)."""
    from matplotlib.transforms import blended_transform_factory

    values = np.asarray(values, dtype=np.float64)
    zero = values == 0
    if not zero.any():
        return
    ax.plot(np.asarray(x)[zero], np.zeros(int(zero.sum())), ls="none", marker="v", ms=6, color=color,
            transform=blended_transform_factory(ax.transData, ax.transAxes), clip_on=False, label=label)


def gradient_flow_figure(layers: list[str], out_norms: np.ndarray, weight_norms: np.ndarray, title: str):
    """Gradient norm against layer depth (forward order), output and weight gradients, log y.

    ``out_norms`` and ``weight_norms`` are ``[steps, layers]``; the line is the median over
    the steps, the band spans the 10th to 90th percentile. A median of exactly 0 is drawn as
    a marker on the axis floor (:func:`mark_zeros`). Returns a matplotlib Figure drawn on an
    Agg canvas (no pyplot, no global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depth = np.arange(1, len(layers) + 1)
    fig = Figure(figsize=(max(6.0, 0.18 * len(layers) + 3), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for data, label, color in ((out_norms, "output gradient", "tab:blue"), (weight_norms, "weight gradient", "tab:orange")):
        data = np.where(np.isfinite(data), data, np.nan)  # zeros stay: a median can be 0
        if data.size == 0 or np.all(np.isnan(data)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: layers without weights
            med = np.nanmedian(data, axis=0)
            lo, hi = np.nanpercentile(data, [10, 90], axis=0)
        ax.plot(depth, np.where(med > 0, med, np.nan), marker="o", ms=3, color=color, label=f"{label} norm (median)")
        mark_zeros(ax, depth, med, color, label=f"{label} norm exactly 0 (axis floor)")
        if data.shape[0] > 1:
            ax.fill_between(depth, np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan), color=color, alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("L2 norm")
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_xticks(depth[::step], [layers[i] for i in range(0, len(layers), step)], rotation=90, fontsize=7)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_rgb(fig) -> np.ndarray:
    """The figure rendered to an ``[H, W, 3]`` uint8 array (for ``add_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# Panels of the signal-propagation figure: forward statistics of the block outputs, then the
# backward ones of their gradients (Brock et al. 2021, Fig. 1).
SPP_PANELS = ("spp/mean_sq", "spp/var", "spp/branch_var", "spp/grad_mean_rms", "spp/grad_std", "spp/grad_branch_std")
_SPP_LABELS = {
    "spp/mean_sq": "avg channel squared mean",
    "spp/var": "avg channel variance",
    "spp/branch_var": "residual branch: avg channel variance",
    "spp/grad_mean_rms": "gradient: sqrt(avg channel squared mean)",
    "spp/grad_std": "gradient: sqrt(avg channel variance)",
    "spp/grad_branch_std": "branch gradient: sqrt(avg channel variance)",
}


def signal_propagation_figure(blocks: list[str], data: dict[str, np.ndarray], title: str):
    """Signal-propagation plot: each ``spp/*`` quantity (``[steps, blocks]``) against block
    depth, median over the steps, log y; forward statistics left, backward right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depth = np.arange(1, len(blocks) + 1)
    fig = Figure(figsize=(max(9.0, 0.25 * len(blocks) + 6), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, names, label in ((axes[0], SPP_PANELS[:3], "forward (block output)"),
                             (axes[1], SPP_PANELS[3:], "backward (output gradient)")):
        for name in names:
            values = data.get(name)
            if values is None or values.size == 0:
                continue
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(values, axis=0)
            if np.all(np.isnan(med)):
                continue
            ax.plot(depth, med, marker="o", ms=3, label=_SPP_LABELS[name])
        ax.set_yscale("log")
        ax.set_xlabel("residual block (forward order)")
        ax.set_title(label, fontsize=9)
        step = max(1, math.ceil(len(blocks) / 30))
        ax.set_xticks(depth[::step], [blocks[i] for i in range(0, len(blocks), step)], rotation=90, fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
