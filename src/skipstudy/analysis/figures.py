"""Figure functions of the comparison report: each takes loaded :class:`~skipstudy.analysis.logs.Run`
objects and returns a matplotlib ``Figure`` (or None when the runs hold no data for it).

Figures are drawn on their own Agg canvas, never through pyplot, so nothing here needs a
display or touches global state, and the training callback can call them in-process.

Conventions shared by all figures: one colour per group of runs (runs with the same
overrides), solid lines for nets with skip connections and dashed lines for their plain
twins (``model.skip=false``), so the primary contrast reads the same everywhere. Layers are
placed in forward order; runs with different tracked layers are aligned by layer name.
Non-finite values (a diverged run) are left out of lines rather than drawn as zeros.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from skipstudy.analysis.logs import Run
from skipstudy.monitor.writers import mark_zeros

SKIP_STYLE = {True: "-", False: "--", None: ":"}
MAX_LABEL = 60


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A Figure on its own Agg canvas (no pyplot)."""
    # Constrained layout keeps long titles, colour bars and the outside legend apart.
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered to an ``[H, W, 3]`` uint8 array (TensorBoard images, GIF frames)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _kind(run: Run) -> str:
    return {True: " [skip]", False: " [plain]", None: ""}[run.skip] + (" [diverged]" if run.diverged else "")


def _panel_title(run: Run, width: int = 48) -> str:
    return textwrap.fill(_short(run.label) + _kind(run), width)


def run_styles(runs: list[Run]) -> dict[int, dict]:
    """Line style per run (keyed by ``id(run)``): colour by group, dash by ``model.skip``."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    # Skip and plain twins of the same setting share a colour, so a colour is one setting
    # and the dash tells skip from plain.
    keys = []
    for run in runs:
        key = tuple(o for o in run.group if not o.startswith("model.skip="))
        if key not in keys:
            keys.append(key)
    styles = {}
    for run in runs:
        key = tuple(o for o in run.group if not o.startswith("model.skip="))
        color = palette[keys.index(key) % len(palette)]
        label = _short(run.label) + (" (diverged)" if run.diverged else "")
        styles[id(run)] = {"color": color, "linestyle": SKIP_STYLE[run.skip], "label": label}
    return styles


def merged_layer_order(layer_lists: Iterable[list[str]]) -> list[str]:
    """One forward order for several runs' layer lists, aligned by name.

    A layer only some runs track (the projection shortcut of a residual block, the extra
    blocks of a deeper net) goes right after the layer that precedes it in its own run.
    """
    merged: list[str] = []
    for layers in layer_lists:
        cursor = 0
        for name in layers:
            if name in merged:
                cursor = merged.index(name) + 1
            else:
                merged.insert(cursor, name)
                cursor += 1
    return merged


def _layer_axis(ax, order: list[str]) -> None:
    positions = np.arange(len(order))
    step = max(1, math.ceil(len(order) / 40))
    ax.set_xticks(positions[::step], [order[i] for i in range(0, len(order), step)], rotation=90, fontsize=7)
    ax.set_xlabel("layer (forward order)")


def _epoch_picks(epochs: list[int], n: int) -> list[int]:
    """First, middle and last of ``epochs`` (fewer when there are fewer epochs)."""
    if not epochs:
        return []
    picks = [epochs[0], epochs[len(epochs) // 2], epochs[-1]]
    if n == 1:
        return [epochs[-1]]
    if n == 2:
        return [epochs[0], epochs[-1]]
    return picks


def _positive(values: np.ndarray) -> np.ndarray:
    """Values usable on a log axis; non-finite and non-positive become NaN (gaps). Exact
    zeros are drawn apart, on the axis floor (``mark_zeros``)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _legend(fig: Figure, axes) -> None:
    """One legend for the whole figure, below the panels (labels deduplicated)."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(2, len(seen)), fontsize=8, frameon=False)


def _focus_log_ylim(ax, healthy: list[np.ndarray]) -> None:
    """Fit a log y axis to the runs that did not diverge, so one run that blew up to 1e20
    does not flatten every other line; the diverged line leaves the top of the panel."""
    values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in healthy]) if healthy else np.zeros(0)
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        ax.set_ylim(lo / 2.0, hi * 2.0)


def _fit_y(ax, healthy: list[np.ndarray]) -> None:
    """Log y when the runs that did not diverge span more than ~1.5 decades (a loss falling
    from 2.3 to 0.01), linear otherwise (log tick labels like 2x10^0 say little over a
    narrow range); limits fitted to those runs, so a diverged run leaves the panel."""
    values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in healthy]) if healthy else np.zeros(0)
    if not values.size:
        ax.set_yscale("log")
        return
    lo, hi = float(values.min()), float(values.max())
    if hi / lo >= 30:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.5, hi * 1.5)
    else:
        pad = 0.08 * (hi - lo) or 0.1 * hi
        ax.set_yscale("linear")
        ax.set_ylim(lo - pad, hi + pad)


def layer_profiles(runs: list[Run], quantities: tuple[str, ...], title: str, ylabels: dict[str, str] | None = None,
                   linear: tuple[str, ...] = ()) -> Figure | None:
    """Per-layer values against layer depth at the first, middle and last epoch.

    One row per quantity (e.g. ``grad_rms/output`` and ``grad_norm/output``), one column
    per epoch pick, one line per run; each point is the median over that epoch's recorded
    steps. Log y axis, except for the quantities in ``linear`` (e.g. a cosine). Per-block
    quantities are drawn against block depth. Returns None when no run recorded any of
    ``quantities``.
    """
    runs = [r for r in runs if any(r.layer_series(q) for q in quantities)]
    if not runs:
        return None
    epochs = {id(r): sorted(set().union(*(r.epochs_of(q) for q in quantities))) for r in runs}
    ncols = min(3, max(len(e) for e in epochs.values()))
    order = merged_layer_order(r.units(quantities[0]) for r in runs)
    pos = {name: i for i, name in enumerate(order)}
    styles = run_styles(runs)
    col_names = {1: ["last epoch"], 2: ["first epoch", "last epoch"], 3: ["first epoch", "middle epoch", "last epoch"]}[ncols]

    width = max(4.0, min(0.2 * len(order) + 2.5, 9.0)) * ncols
    fig = new_figure(width, 3.2 * len(quantities) + 1.8 + 0.18 * math.ceil(len(runs) / 2))
    axes = fig.subplots(len(quantities), ncols, squeeze=False, sharex=True)
    for row, q in enumerate(quantities):
        for col in range(ncols):
            ax = axes[row][col]
            picked = set()
            healthy: list[np.ndarray] = []
            for run in runs:
                picks = _epoch_picks(epochs[id(run)], ncols)
                if col >= len(picks):
                    continue
                epoch = picks[col]
                picked.add(epoch)
                profile = run.layer_profile(q, epoch)
                if not profile:
                    continue
                x = np.array([pos[name] for name in profile])
                raw = np.array(list(profile.values()), dtype=np.float64)
                if q in linear:
                    y = np.where(np.isfinite(raw), raw, np.nan)
                    ax.plot(x, y, marker="o", ms=3, lw=1.3, **styles[id(run)])
                else:
                    y = _positive(raw)
                    (line,) = ax.plot(x, y, marker="o", ms=3, lw=1.3, **styles[id(run)])
                    mark_zeros(ax, x, raw, line.get_color())
                if not run.diverged:
                    healthy.append(y)
            if q not in linear:
                ax.set_yscale("log")
                _focus_log_ylim(ax, healthy)
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                suffix = f" ({picked.pop()})" if len(picked) == 1 else ""
                ax.set_title(col_names[col] + suffix, fontsize=10)
            if col == 0:
                ax.set_ylabel((ylabels or {}).get(q, q))
            if row == len(quantities) - 1:
                _layer_axis(ax, order)
    fig.suptitle(title)
    _legend(fig, axes)
    return fig


def gradient_flow(runs: list[Run]) -> Figure | None:
    """Figure 1: output-gradient RMS and norm per layer against depth, first/middle/last epoch."""
    return layer_profiles(
        runs,
        ("grad_rms/output", "grad_norm/output"),
        "Gradient flow: gradient w.r.t. each layer's output (median over the epoch's steps)",
        {"grad_rms/output": "output-gradient RMS", "grad_norm/output": "output-gradient L2 norm"},
    )


def activation_std(runs: list[Run]) -> Figure | None:
    """Figure 6: forward activation std per layer against depth, first/middle/last epoch."""
    return layer_profiles(
        runs,
        ("act/std",),
        "Forward activation std per layer (median over the epoch's steps)",
        {"act/std": "std of the layer's output"},
    )


def gradient_split(runs: list[Run]) -> Figure | None:
    """Per residual block: how the input gradient divides between shortcut and branch."""
    return layer_profiles(
        runs,
        ("grad_split/ratio", "grad_split/branch", "grad_split/cos"),
        "Gradient split at each block's input: shortcut part vs residual-branch part (median over the epoch's steps)",
        {"grad_split/ratio": "||shortcut part|| / ||branch part||", "grad_split/branch": "||branch part||",
         "grad_split/cos": "cos(shortcut part, branch part)"},
        linear=("grad_split/cos",),
    )


def signal_propagation(runs: list[Run]) -> Figure | None:
    """Signal-propagation plot (Brock et al. 2021): channel statistics per block against depth."""
    return layer_profiles(
        runs,
        ("spp/var", "spp/mean_sq", "spp/branch_var", "spp/grad_std"),
        "Signal propagation per residual block (median over the epoch's steps)",
        {"spp/var": "avg channel variance", "spp/mean_sq": "avg channel squared mean",
         "spp/branch_var": "branch: avg channel var", "spp/grad_std": "gradient: sqrt(avg channel var)"},
    )


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def gradient_norm_over_steps(runs: list[Run], quantity: str = "grad_norm/output") -> Figure | None:
    """Figure 2: each layer's gradient norm at every recorded step, one panel per run.

    Lines are coloured by depth (dark: first layer, light: last), log y axis. Runs that did
    not diverge share one y range so they compare directly; a diverged run gets its own,
    with its first non-finite step marked in red.
    """
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in runs if r.layer_series(quantity)]
    if not runs:
        return None
    nrows, ncols = _grid(len(runs))
    fig = new_figure(5.0 * ncols + 0.8, 3.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    many = any(len(r.layer_series(quantity)) > 12 for r in runs)
    healthy_axes, healthy_values = [], []
    for i, run in enumerate(runs):
        ax = axes[i // ncols][i % ncols]
        series = run.layer_series(quantity)
        n = max(1, len(series) - 1)
        for j, (layer, s) in enumerate(series.items()):
            y = _positive(s.values)
            ax.plot(s.steps, y, lw=0.9, color=cmap(0.9 * j / n), label=layer)
            mark_zeros(ax, s.steps, s.values, cmap(0.9 * j / n), label=None)
            if not run.diverged:
                healthy_values.append(y)
        if not run.diverged:
            healthy_axes.append(ax)
        if run.nonfinite_steps:
            ax.axvline(run.nonfinite_steps[0], color="red", lw=1, ls=":")
            ax.annotate("non-finite", (run.nonfinite_steps[0], 1), xycoords=("data", "axes fraction"),
                        color="red", fontsize=7, ha="right", va="top", rotation=90)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_panel_title(run), fontsize=8)
        ax.set_xlabel("global step")
        ax.grid(True, which="major", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(f"{quantity} (L2)")
        if not many:
            ax.legend(fontsize=6, ncol=2, frameon=False)
    for ax in healthy_axes:
        _focus_log_ylim(ax, healthy_values)
    for k in range(len(runs), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if many:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 0.9))
        cbar = fig.colorbar(sm, ax=axes, fraction=0.03, pad=0.01)
        cbar.set_ticks([0, 0.9], labels=["first layer", "last layer"])
    fig.suptitle("Per-layer output-gradient norm over training (every recorded step)")
    return fig


# ---------------------------------------------------------------------- histograms


class HistogramGrid:
    """Shared bins for every run's ``grad_hist/output`` histograms, so GIF frames and panels
    of different runs and epochs have the same x axis and colour scale.

    Histograms over log10|g| are re-binned by bucket centre onto a grid as fine as the
    finest bucket seen (the monitor's fixed 0.1-decade bins map one to one).
    """

    def __init__(self, runs: list[Run]) -> None:
        self.per_run = {id(r): r.histograms_by_epoch() for r in runs}
        hists = [h for by_epoch in self.per_run.values() for layers in by_epoch.values() for h in layers.values()]
        if not hists:
            self.edges = np.zeros(0)
            return
        widths = np.concatenate([np.diff(h.edges) for h in hists])
        width = float(np.min(widths[widths > 0])) if np.any(widths > 0) else 0.1
        lo = min(float(h.edges[0]) for h in hists)
        hi = max(float(h.edges[-1]) for h in hists)
        n = max(1, int(math.ceil((hi - lo) / width - 1e-6)))
        self.edges = lo + width * np.arange(n + 1)

    def fractions(self, run: Run, epoch: int, layers: list[str]) -> np.ndarray:
        """``[layers, bins]``: fraction of each layer's binned elements per bin (NaN rows for
        layers without a histogram in that epoch)."""
        by_layer = self.per_run.get(id(run), {}).get(epoch, {})
        out = np.full((len(layers), self.edges.size - 1), np.nan)
        for i, layer in enumerate(layers):
            h = by_layer.get(layer)
            if h is None:
                continue
            centres = 0.5 * (h.edges[:-1] + h.edges[1:])
            counts, _ = np.histogram(np.clip(centres, self.edges[0], self.edges[-1]), bins=self.edges, weights=h.counts)
            total = counts.sum()
            if total > 0:
                out[i] = counts / total
        return out

    def epochs(self, run: Run) -> list[int]:
        return list(self.per_run.get(id(run), {}))

    def layers(self, run: Run) -> list[str]:
        seen = {layer for by_layer in self.per_run.get(id(run), {}).values() for layer in by_layer}
        return [layer for layer in run.layers if layer in seen] or sorted(seen)


def _hist_norm() -> LogNorm:
    # Fixed limits (not autoscaled) so every frame and panel shares one colour scale.
    return LogNorm(vmin=1e-4, vmax=1.0)


def _draw_histogram_panel(ax, grid: HistogramGrid, run: Run, epoch: int, title: str):
    layers = grid.layers(run)
    frac = grid.fractions(run, epoch, layers)
    masked = np.ma.masked_where(~np.isfinite(frac) | (frac <= 0), frac)
    mesh = ax.pcolormesh(grid.edges, np.arange(len(layers) + 1), masked, cmap="magma", norm=_hist_norm(), shading="flat")
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers if len(layers) <= 30 else [""] * len(layers), fontsize=6)
    # First layer at the top: depth grows downwards, as in a network diagram. (set_ylim, not
    # invert_yaxis: the latter toggles, and toggles twice on shared axes.)
    ax.set_ylim(len(layers), 0)
    ax.set_xlabel("log10 |gradient w.r.t. layer output|", fontsize=8)
    ax.set_title(title, fontsize=9)
    return mesh


def histogram_frames(grid: HistogramGrid, run: Run):
    """Yield ``(epoch, rgb)`` GIF frames of ``run``: per-layer histogram of log10|output
    gradient| at each epoch as a heat map (rows: layers in forward order; colour: fraction
    of the layer's elements).

    One figure is drawn per run and only its data and title change between frames: the
    frames line up exactly, and a long run's GIF costs one layout, not one per epoch.
    """
    epochs = grid.epochs(run)
    if not epochs:
        return
    layers = grid.layers(run)
    height = max(3.0, 0.22 * len(layers) + 1.8)
    fig = Figure(figsize=(7.0, height), dpi=80)
    FigureCanvasAgg(fig)
    label_room = min(0.45, 0.02 + 0.0125 * max((len(name) for name in layers), default=4))
    fig.subplots_adjust(left=label_room, right=0.83, bottom=0.9 / height, top=1 - 0.75 / height)
    ax = fig.add_subplot()
    mesh = _draw_histogram_panel(ax, grid, run, epochs[0], "")
    cax = fig.add_axes((0.86, 0.9 / height, 0.025, 1 - 1.65 / height))
    fig.colorbar(mesh, cax=cax, label="fraction of elements")
    title = _panel_title(run, 70)
    for epoch in epochs:
        frac = grid.fractions(run, epoch, layers)
        mesh.set_array(np.ma.masked_where(~np.isfinite(frac) | (frac <= 0), frac))
        ax.set_title(f"{title}\nepoch {epoch}", fontsize=9)
        yield epoch, figure_rgb(fig)


def write_histogram_gif(grid: HistogramGrid, run: Run, path: str | Path, frame_ms: int = 700) -> int:
    """Write the animated histogram of ``run`` to ``path``, one frame per epoch that has
    histograms; returns the number of frames (0: nothing written)."""
    from PIL import Image

    frames = [Image.fromarray(rgb) for _, rgb in histogram_frames(grid, run)]
    if not frames:
        return 0
    # One shared palette keeps colours steady from frame to frame. Each frame's title names
    # its epoch, so Pillow never merges two frames as duplicates: frames == epochs.
    palette = frames[0].quantize(colors=255)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, disposal=1)
    return len(frames)


def histogram_small_multiples(grid: HistogramGrid, runs: list[Run], max_epochs: int = 6) -> Figure | None:
    """The GIF's data as one static figure: a row per run, a column per epoch (all epochs,
    or ``max_epochs`` evenly spaced ones including the first and last)."""
    runs = [r for r in runs if grid.epochs(r)]
    if not runs:
        return None
    all_epochs = sorted({e for r in runs for e in grid.epochs(r)})
    if len(all_epochs) > max_epochs:
        idx = np.unique(np.linspace(0, len(all_epochs) - 1, max_epochs).round().astype(int))
        all_epochs = [all_epochs[i] for i in idx]
    heights = [0.13 * len(grid.layers(r)) + 1.3 for r in runs]
    ncols = len(all_epochs)
    fig = new_figure(2.6 * ncols + 3.0, sum(heights) + 0.8)
    subfigs = fig.subfigures(len(runs), 1, squeeze=False, height_ratios=heights)[:, 0]
    mesh = None
    for i, (run, sub) in enumerate(zip(runs, subfigs)):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        sub.suptitle(_short(run.label) + _kind(run), fontsize=9, x=0.02, ha="left")
        for j, epoch in enumerate(all_epochs):
            ax = axes[j]
            if epoch not in grid.epochs(run):
                ax.set_visible(False)
                continue
            mesh = _draw_histogram_panel(ax, grid, run, epoch, f"epoch {epoch}")
            if j > 0:
                ax.set_yticklabels([])
            if i < len(runs) - 1:
                ax.set_xlabel("")
    if mesh is not None:
        fig.colorbar(mesh, ax=list(subfigs[-1].axes), fraction=0.05, label="fraction")
    fig.suptitle("Histogram of log10|gradient w.r.t. layer output| per layer (rows: layers, forward order)")
    return fig


# ---------------------------------------------------------------------- training curves


def training_curves(runs: list[Run]) -> Figure | None:
    """Figure 4: train and validation loss (log y) and accuracy per run against global step.

    The loss axes are fitted to the runs that did not diverge; a diverged run's loss
    leaves the top of the panel.
    """
    from matplotlib.ticker import MaxNLocator

    panels = [("train/loss", "train loss", True), ("val/loss", "val loss", True),
              ("train/acc", "train accuracy", False), ("val/acc", "val accuracy", False)]
    runs = [r for r in runs if any(r.series(tag) is not None for tag, _, _ in panels)]
    if not runs:
        return None
    styles = run_styles(runs)
    fig = new_figure(11.0, 7.5 + 0.18 * math.ceil(len(runs) / 2))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (tag, name, log_y) in zip(axes.ravel(), panels):
        healthy = []
        for run in runs:
            s = run.series(tag)
            if s is None or not s.steps.size:
                continue
            y = _positive(s.values) if log_y else np.where(np.isfinite(s.values), s.values, np.nan)
            marker = "o" if tag.startswith("val/") else None
            ax.plot(s.steps, y, lw=1.0, marker=marker, ms=3, **styles[id(run)])
            if not run.diverged:
                healthy.append(y)
        if log_y:
            _fit_y(ax, healthy)
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("global step")
    fig.suptitle("Training curves (val: once per epoch, at the epoch's last step)")
    _legend(fig, axes)
    return fig


def final_train_loss(run: Run) -> float:
    """The last epoch-mean training loss (``train/loss_epoch``), else the last per-step one."""
    for tag in ("train/loss_epoch", "train/loss"):
        s = run.series(tag)
        if s is not None and s.values.size:
            return s.last()
    return math.nan


def final_val_acc(run: Run) -> float:
    """The last validation accuracy (NaN without one)."""
    s = run.series("val/acc")
    return s.last() if s is not None and s.values.size else math.nan


def depth_sweep(runs: list[Run]) -> Figure | None:
    """Figure 5 (after He et al. 2016, Fig. 6): final train loss and final val error against
    depth, one line per setting, solid for skip and dashed for plain. Runs with the same
    depth and setting (seeds) are averaged. Returns None without at least one run whose
    depth is known (``model.depth`` or a ``resnetNN`` builder)."""
    runs = [r for r in runs if r.depth is not None and r.has_data]
    if not runs:
        return None
    styles = run_styles(runs)
    lines: dict[tuple, dict] = {}
    for run in runs:
        key = tuple(o for o in run.group if not o.startswith("model.depth=")) + (("skip", run.skip),)
        line = lines.setdefault(key, {"style": styles[id(run)], "points": {}, "run": run})
        line["points"].setdefault(run.depth, []).append((final_train_loss(run), 1.0 - final_val_acc(run)))
    fig = new_figure(10.0, 4.2 + 0.18 * math.ceil(len(lines) / 2))
    axes = fig.subplots(1, 2)
    healthy: list[np.ndarray] = []
    for line in lines.values():
        depths = sorted(line["points"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (diverged) points
            loss = [np.nanmean([p[0] for p in line["points"][d]]) for d in depths]
            err = [np.nanmean([p[1] for p in line["points"][d]]) for d in depths]
        style = dict(line["style"])
        run = line["run"]
        group = [o for o in run.group if not o.startswith(("model.depth=", "model.skip="))]
        kind = {True: "skip", False: "plain", None: "?"}[run.skip]
        style["label"] = _short(kind + (" | " + ", ".join(group) if len(lines) > 2 and group else ""))
        axes[0].plot(depths, _positive(loss), marker="o", **style)
        healthy.append(_positive(loss))
        axes[1].plot(depths, 100 * np.asarray(err, dtype=float), marker="o", **style)
    _fit_y(axes[0], healthy)
    axes[0].set_ylabel("final train loss")
    axes[1].set_ylabel("final val error (%)")
    all_depths = sorted({r.depth for r in runs})
    for ax in axes:
        ax.set_xlabel("depth (weighted layers)")
        ax.set_xticks(all_depths)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Depth sweep: skip vs plain (He et al. 2016, Fig. 6)")
    _legend(fig, axes)
    return fig


def run_figures(runs: list[Run]) -> dict[str, Figure]:
    """The static figures for ``runs`` by file stem (those with data only); the GIFs are
    written separately with :func:`write_histogram_gif`."""
    grid = HistogramGrid(runs)
    figs = {
        "gradient_flow": gradient_flow(runs),
        "grad_norm_steps": gradient_norm_over_steps(runs),
        "grad_hist_epochs": histogram_small_multiples(grid, runs),
        "training_curves": training_curves(runs),
        "depth_sweep": depth_sweep(runs),
        "activation_std": activation_std(runs),
        "grad_split": gradient_split(runs),
        "signal_propagation": signal_propagation(runs),
    }
    return {k: v for k, v in figs.items() if v is not None}


__all__ = [
    "HistogramGrid",
    "activation_std",
    "depth_sweep",
    "figure_rgb",
    "final_train_loss",
    "final_val_acc",
    "gradient_flow",
    "gradient_norm_over_steps",
    "gradient_split",
    "signal_propagation",
    "histogram_frames",
    "histogram_small_multiples",
    "layer_profiles",
    "merged_layer_order",
    "new_figure",
    "run_figures",
    "training_curves",
    "write_histogram_gif",
]
