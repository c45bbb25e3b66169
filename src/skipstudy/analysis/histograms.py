"""The output-gradient histograms of the report: one grid of bins shared by every run, a GIF
per run (a frame per epoch) and the small multiples (a row per run, a column per epoch)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from skipstudy.analysis.canvas import new_figure, run_title, suptitle
from skipstudy.analysis.logs import HIST_QUANTITY, Histogram, Run
from skipstudy.monitor.writers import figure_rgb


def _hists(run: Run, layer: str) -> list[Histogram]:
    return run.histograms.get(f"{HIST_QUANTITY}/{layer}", [])


class HistogramGrid:
    """Shared bins for every run's output-gradient histograms (over log10|g|), so GIF frames
    and panels share one x axis: buckets are re-binned by centre onto a grid as fine as the
    finest bucket seen (the monitor's fixed 0.1-decade bins map one to one)."""

    def __init__(self, runs: list[Run]) -> None:
        hists = [h for run in runs for layer in run.layers for h in _hists(run, layer)]
        if not hists:
            self.edges = np.zeros(0)
            return
        widths = np.concatenate([np.diff(h.edges) for h in hists])
        width = float(np.min(widths[widths > 0])) if np.any(widths > 0) else 0.1
        lo, hi = min(h.edges[0] for h in hists), max(h.edges[-1] for h in hists)
        self.edges = lo + width * np.arange(max(1, math.ceil((hi - lo) / width - 1e-6)) + 1)

    @staticmethod
    def epochs(run: Run) -> list[int]:
        return sorted({int(e) for layer in run.layers for e in run.epoch_at([h.step for h in _hists(run, layer)])})

    @staticmethod
    def layers(run: Run) -> list[str]:
        return [layer for layer in run.layers if _hists(run, layer)]

    def fractions(self, run: Run, epoch: int) -> np.ma.MaskedArray:
        """``[layers, bins]``: each layer's fraction of elements per bin (masked where empty)."""
        layers = self.layers(run)
        out = np.full((len(layers), self.edges.size - 1), np.nan)
        for i, layer in enumerate(layers):
            # A layer's histograms within an epoch are added up.
            if hists := [h for h in _hists(run, layer) if run.epoch_at([h.step])[0] == epoch]:
                centres = np.concatenate([0.5 * (h.edges[:-1] + h.edges[1:]) for h in hists])
                counts, _ = np.histogram(np.clip(centres, self.edges[0], self.edges[-1]), bins=self.edges,
                                         weights=np.concatenate([h.counts for h in hists]))
                out[i] = counts / counts.sum() if counts.sum() > 0 else np.nan
        return np.ma.masked_where(~np.isfinite(out) | (out <= 0), out)

    def panel(self, ax, run: Run, epoch: int, title: str):
        layers = self.layers(run)
        # Fixed colour limits, so every frame and panel shares one scale.
        mesh = ax.pcolormesh(self.edges, np.arange(len(layers) + 1), self.fractions(run, epoch), cmap="magma",
                             norm=LogNorm(vmin=1e-4, vmax=1.0), shading="flat")
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers if len(layers) <= 30 else [""] * len(layers), fontsize=6)
        ax.set_ylim(len(layers), 0)  # first layer on top (set_ylim: invert_yaxis toggles on shared axes)
        ax.set_xlabel("log10 |gradient w.r.t. layer output|", fontsize=8)
        ax.set_title(title, fontsize=9)
        return mesh


def write_histogram_gif(grid: HistogramGrid, run: Run, path: str | Path, frame_ms: int = 700) -> int:
    """One heat-map frame per epoch; returns the number of frames. One figure whose data and
    title change, so frames line up and a long run costs one layout."""
    from PIL import Image

    epochs, layers = grid.epochs(run), grid.layers(run)
    if not epochs:
        return 0
    height = max(3.0, 0.22 * len(layers) + 1.8)
    fig = new_figure(7.0, height, layout=None, dpi=80)
    label_room = min(0.45, 0.02 + 0.0125 * max(len(name) for name in layers))
    fig.subplots_adjust(left=label_room, right=0.83, bottom=0.9 / height, top=1 - 0.75 / height)
    ax = fig.add_subplot()
    mesh = grid.panel(ax, run, epochs[0], "")
    fig.colorbar(mesh, cax=fig.add_axes((0.86, 0.9 / height, 0.025, 1 - 1.65 / height)), label="fraction of elements")
    frames = []
    for epoch in epochs:
        mesh.set_array(grid.fractions(run, epoch))
        ax.set_title(f"{run_title(run, 70)}\nepoch {epoch}", fontsize=9)
        frames.append(Image.fromarray(figure_rgb(fig)))
    # One palette keeps colours steady; each title names its epoch, so Pillow merges no frames.
    palette = frames[0].quantize(colors=255)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, disposal=1)
    return len(frames)


def histogram_small_multiples(grid: HistogramGrid, runs: list[Run], max_epochs: int = 6) -> Figure | None:
    """The GIFs as one figure: a row per run, a column per epoch (at most ``max_epochs``)."""
    runs = [r for r in runs if grid.epochs(r)]
    if not runs:
        return None
    epochs = sorted({e for r in runs for e in grid.epochs(r)})
    if len(epochs) > max_epochs:
        epochs = [epochs[i] for i in np.unique(np.linspace(0, len(epochs) - 1, max_epochs).round().astype(int))]
    heights = [0.13 * len(grid.layers(r)) + 1.3 for r in runs]
    fig = new_figure(2.6 * len(epochs) + 3.0, sum(heights) + 0.8)
    subfigs = fig.subfigures(len(runs), 1, squeeze=False, height_ratios=heights)[:, 0]
    for i, (run, sub) in enumerate(zip(runs, subfigs)):
        suptitle(sub, run_title(run, 1000), fontsize=9, x=0.02, ha="left")
        for j, (ax, epoch) in enumerate(zip(sub.subplots(1, len(epochs), squeeze=False)[0], epochs)):
            if epoch not in grid.epochs(run):
                ax.set_visible(False)
                continue
            mesh = grid.panel(ax, run, epoch, f"epoch {epoch}")
            if j > 0:
                ax.set_yticklabels([])
            if i < len(runs) - 1:
                ax.set_xlabel("")
    fig.colorbar(mesh, ax=list(subfigs[-1].axes), fraction=0.05, label="fraction")
    suptitle(fig, "Histogram of log10|gradient w.r.t. layer output| per layer (rows: layers, forward order)")
    return fig
