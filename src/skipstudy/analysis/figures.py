"""The report's figures: each returns a Figure on its own Agg canvas (no pyplot: the training
callback draws them too), or None when no run has its data. Colour is a setting, solid lines
skip nets, dashed their plain twins; non-finite values are gaps, not zeros."""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skipstudy.analysis.logs import HIST_QUANTITY, Histogram, Run, final_train_loss, final_val_acc
from skipstudy.monitor.writers import figure_rgb, mark_zeros

SKIP_STYLE = {True: "-", False: "--", None: ":"}
# Per-layer (or per-block) figures: stem -> (title, {quantity: y label}, quantities on a linear axis).
PROFILES = {
    "gradient_flow": ("Gradient flow: gradient w.r.t. each layer's output (median over the epoch's steps)",
                      {"grad_rms/output": "output-gradient RMS", "grad_norm/output": "output-gradient L2 norm"}, ()),
    "activation_std": ("Forward activation std per layer (median over the epoch's steps)",
                       {"act/std": "std of the layer's output"}, ()),
    "grad_split": ("Gradient split at each block's input: shortcut part vs residual-branch part "
                   "(median over the epoch's steps)",
                   {"grad_split/ratio": "||shortcut part|| / ||branch part||", "grad_split/branch": "||branch part||",
                    "grad_split/cos": "cos(shortcut part, branch part)"}, ("grad_split/cos",)),
    # Brock et al. 2021
    "signal_propagation": ("Signal propagation per residual block (median over the epoch's steps)",
                           {"spp/var": "avg channel variance", "spp/mean_sq": "avg channel squared mean",
                            "spp/branch_var": "branch: avg channel var",
                            "spp/grad_std": "gradient: sqrt(avg channel var)"}, ()),
}


def new_figure(width: float, height: float, **kwargs) -> Figure:
    # Constrained layout keeps long titles, colour bars and the outside legend apart.
    fig = Figure(figsize=(width, height), **({"layout": "constrained"} | kwargs))
    FigureCanvasAgg(fig)
    return fig


def _short(label: str, n: int = 60) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _title(run: Run, width: int = 48) -> str:
    kind = {True: " [skip]", False: " [plain]", None: ""}[run.skip] + (" [diverged]" if run.diverged else "")
    return textwrap.fill(_short(run.label) + kind, width)


def run_styles(runs: list[Run]) -> dict[int, dict]:
    """Line style by ``id(run)``. Skip and plain twins of one setting share a colour."""
    palette = matplotlib.colormaps["tab10"].colors
    settings = [tuple(o for o in run.group if not o.startswith("model.skip=")) for run in runs]
    order = list(dict.fromkeys(settings))
    return {id(run): {"color": palette[order.index(s) % len(palette)], "linestyle": SKIP_STYLE[run.skip],
                      "label": _short(run.label) + (" (diverged)" if run.diverged else "")}
            for run, s in zip(runs, settings)}


def merged_layer_order(layer_lists: Iterable[list[str]]) -> list[str]:
    """One forward order for several runs' layers: a layer only some runs have (a projection
    shortcut, a deeper net's extra blocks) goes right after its predecessor in its own run."""
    merged: list[str] = []
    for layers in layer_lists:
        cursor = 0
        for name in layers:
            if name not in merged:
                merged.insert(cursor, name)
            cursor = merged.index(name) + 1
    return merged


def _positive(values) -> np.ndarray:
    """For a log axis: non-finite and non-positive become gaps (``mark_zeros`` draws exact 0s)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _legend(fig: Figure, axes) -> None:
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(2, len(seen)),
                   fontsize=8, frameon=False)


def _fit_y(ax, healthy: list[np.ndarray], log: bool = False) -> None:
    """Limits from the runs that did not diverge, so one that blew up to 1e20 leaves the panel
    instead of flattening the rest. Log when asked or over more than ~1.5 decades (log ticks
    say little over a narrow range)."""
    values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in healthy] or [np.zeros(0)])
    if not values.size:
        ax.set_yscale("log")
        return
    lo, hi = float(values.min()), float(values.max())
    if log or hi / lo >= 30:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.5, hi * 1.5)
    else:
        pad = 0.08 * (hi - lo) or 0.1 * hi
        ax.set_ylim(lo - pad, hi + pad)


def layer_profiles(runs: list[Run], title: str, ylabels: dict[str, str], linear: tuple[str, ...] = ()) -> Figure | None:
    """Each quantity (a row) against layer depth at the first, middle and last epoch (columns)."""
    quantities = list(ylabels)
    runs = [r for r in runs if any(r.layer_series(q) for q in quantities)]
    if not runs:
        return None
    epochs = {id(r): sorted(set().union(*(r.epochs_of(q) for q in quantities))) for r in runs}
    ncols = min(3, max(len(e) for e in epochs.values()))
    columns = {1: ["last"], 2: ["first", "last"], 3: ["first", "middle", "last"]}[ncols]
    order = merged_layer_order(r.units(quantities[0]) for r in runs)
    pos = {name: i for i, name in enumerate(order)}
    styles = run_styles(runs)
    fig = new_figure(max(4.0, min(0.2 * len(order) + 2.5, 9.0)) * ncols,
                     3.2 * len(quantities) + 1.8 + 0.18 * math.ceil(len(runs) / 2))
    axes = fig.subplots(len(quantities), ncols, squeeze=False, sharex=True)
    for row, q in enumerate(quantities):
        for col, column in enumerate(columns):
            ax, picked, healthy = axes[row][col], set(), []
            for run in runs:
                e = epochs[id(run)]
                epoch = e[{"first": 0, "middle": len(e) // 2, "last": -1}[column]]
                picked.add(epoch)
                if not (profile := run.layer_profile(q, epoch)):
                    continue  # a plain twin has no shortcut part
                x = np.array([pos[name] for name in profile])
                raw = np.array(list(profile.values()), dtype=np.float64)
                y = np.where(np.isfinite(raw), raw, np.nan) if q in linear else _positive(raw)
                (line,) = ax.plot(x, y, marker="o", ms=3, lw=1.3, **styles[id(run)])
                if q not in linear:
                    mark_zeros(ax, x, raw, line.get_color())
                if not run.diverged:
                    healthy.append(y)
            if q not in linear:
                _fit_y(ax, healthy, log=True)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(f"{column} epoch" + (f" ({picked.pop()})" if len(picked) == 1 else ""), fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabels[q])
            if row == len(quantities) - 1:
                step = max(1, math.ceil(len(order) / 40))
                ax.set_xticks(np.arange(len(order))[::step], order[::step], rotation=90, fontsize=7)
                ax.set_xlabel("layer (forward order)")
    fig.suptitle(title)
    _legend(fig, axes)
    return fig


def gradient_norm_over_steps(runs: list[Run], quantity: str = "grad_norm/output") -> Figure | None:
    """Each layer's gradient norm at every recorded step, a panel per run; runs that did not
    diverge share a y range."""
    runs = [r for r in runs if r.layer_series(quantity)]
    if not runs:
        return None
    ncols = min(3, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig = new_figure(5.0 * ncols + 0.8, 3.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = matplotlib.colormaps["viridis"]
    many = any(len(r.layer_series(quantity)) > 12 for r in runs)
    healthy_axes, healthy = [], []
    for ax, run in zip(axes, runs):
        series = run.layer_series(quantity)
        for j, (layer, s) in enumerate(series.items()):
            color = cmap(0.9 * j / max(1, len(series) - 1))
            ax.plot(s.steps, _positive(s.values), lw=0.9, color=color, label=layer)
            mark_zeros(ax, s.steps, s.values, color, label=None)
            if not run.diverged:
                healthy.append(_positive(s.values))
        if not run.diverged:
            healthy_axes.append(ax)
        if run.nonfinite_steps:
            ax.axvline(run.nonfinite_steps[0], color="red", lw=1, ls=":")
            ax.annotate("non-finite", (run.nonfinite_steps[0], 1), xycoords=("data", "axes fraction"),
                        color="red", fontsize=7, ha="right", va="top", rotation=90)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=_title(run), xlabel="global step", ylabel=f"{quantity} (L2)")
        ax.title.set_fontsize(8)
        ax.grid(True, alpha=0.3)
        if not many:
            ax.legend(fontsize=6, ncol=2, frameon=False)
    for ax in healthy_axes:
        _fit_y(ax, healthy, log=True)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    if many:
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 0.9))
        fig.colorbar(sm, ax=axes, fraction=0.03, pad=0.01).set_ticks([0, 0.9], labels=["first layer", "last layer"])
    fig.suptitle("Per-layer output-gradient norm over training (every recorded step)")
    return fig


class HistogramGrid:
    """Shared bins for every run's output-gradient histograms (over log10|g|), so GIF frames
    and panels share one x axis: buckets are re-binned by centre onto a grid as fine as the
    finest bucket seen (the monitor's fixed 0.1-decade bins map one to one)."""

    def __init__(self, runs: list[Run]) -> None:
        self.per_run: dict[int, dict[int, dict[str, list[Histogram]]]] = {}  # id(run) -> {epoch: {layer: [...]}}
        for run in runs:
            by_epoch: dict[int, dict[str, list[Histogram]]] = {}
            for layer in run.layers:
                for h in run.histograms.get(f"{HIST_QUANTITY}/{layer}", []):
                    by_epoch.setdefault(int(run.epoch_at([h.step])[0]), {}).setdefault(layer, []).append(h)
            self.per_run[id(run)] = dict(sorted(by_epoch.items()))
        hists = [h for by_epoch in self.per_run.values() for layers in by_epoch.values() for hs in layers.values()
                 for h in hs]
        if not hists:
            self.edges = np.zeros(0)
            return
        widths = np.concatenate([np.diff(h.edges) for h in hists])
        width = float(np.min(widths[widths > 0])) if np.any(widths > 0) else 0.1
        lo, hi = min(h.edges[0] for h in hists), max(h.edges[-1] for h in hists)
        self.edges = lo + width * np.arange(max(1, math.ceil((hi - lo) / width - 1e-6)) + 1)

    def epochs(self, run: Run) -> list[int]:
        return list(self.per_run.get(id(run), {}))

    def layers(self, run: Run) -> list[str]:
        seen = {layer for by_layer in self.per_run.get(id(run), {}).values() for layer in by_layer}
        return [layer for layer in run.layers if layer in seen]

    def fractions(self, run: Run, epoch: int) -> np.ma.MaskedArray:
        """``[layers, bins]``: each layer's fraction of elements per bin (masked where empty)."""
        by_layer = self.per_run[id(run)].get(epoch, {})
        out = np.full((len(self.layers(run)), self.edges.size - 1), np.nan)
        for i, layer in enumerate(self.layers(run)):
            if hists := by_layer.get(layer):  # a layer's histograms within an epoch are added up
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
        ax.set_title(f"{_title(run, 70)}\nepoch {epoch}", fontsize=9)
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
        sub.suptitle(_title(run, 1000), fontsize=9, x=0.02, ha="left")
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
    fig.suptitle("Histogram of log10|gradient w.r.t. layer output| per layer (rows: layers, forward order)")
    return fig


def training_curves(runs: list[Run]) -> Figure | None:
    panels = [("train/loss", "train loss"), ("val/loss", "val loss"), ("train/acc", "train accuracy"),
              ("val/acc", "val accuracy")]
    runs = [r for r in runs if any(r.series(tag) is not None for tag, _ in panels)]
    if not runs:
        return None
    styles = run_styles(runs)
    fig = new_figure(11.0, 7.5 + 0.18 * math.ceil(len(runs) / 2))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (tag, name) in zip(axes.ravel(), panels):
        healthy = []
        for run in runs:
            if (s := run.series(tag)) is None:
                continue
            y = _positive(s.values) if "loss" in tag else np.where(np.isfinite(s.values), s.values, np.nan)
            ax.plot(s.steps, y, lw=1.0, marker="o" if tag.startswith("val/") else None, ms=3, **styles[id(run)])
            if not run.diverged:
                healthy.append(y)
        if "loss" in tag:
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


def depth_sweep(runs: list[Run]) -> Figure | None:
    """Final train loss and val error against depth (He et al. 2016, Fig. 6), a line per
    setting and skip/plain; seeds of one depth and setting are averaged."""
    runs = [r for r in runs if r.depth is not None and r.has_data]
    if not runs:
        return None
    styles = run_styles(runs)
    lines: dict[tuple, dict] = {}
    for run in runs:
        key = tuple(o for o in run.group if not o.startswith("model.depth=")) + (("skip", run.skip),)
        line = lines.setdefault(key, {"style": dict(styles[id(run)]), "points": {}, "run": run})
        line["points"].setdefault(run.depth, []).append((final_train_loss(run), 1.0 - final_val_acc(run)))
    fig = new_figure(10.0, 4.2 + 0.18 * math.ceil(len(lines) / 2))
    axes = fig.subplots(1, 2)
    healthy = []
    for line in lines.values():
        depths = sorted(line["points"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (diverged) points
            loss, err = np.array([np.nanmean(line["points"][d], axis=0) for d in depths]).T
        run = line["run"]
        group = [o for o in run.group if not o.startswith(("model.depth=", "model.skip="))]
        kind = {True: "skip", False: "plain", None: "?"}[run.skip]
        line["style"]["label"] = _short(kind + (" | " + ", ".join(group) if len(lines) > 2 and group else ""))
        axes[0].plot(depths, _positive(loss), marker="o", **line["style"])
        axes[1].plot(depths, 100 * err, marker="o", **line["style"])
        healthy.append(_positive(loss))
    _fit_y(axes[0], healthy)
    axes[0].set_ylabel("final train loss")
    axes[1].set_ylabel("final val error (%)")
    for ax in axes:
        ax.set_xlabel("depth (weighted layers)")
        ax.set_xticks(sorted({r.depth for r in runs}))
        ax.grid(True, alpha=0.3)
    fig.suptitle("Depth sweep: skip vs plain (He et al. 2016, Fig. 6)")
    _legend(fig, axes)
    return fig


def run_figures(runs: list[Run]) -> dict[str, Figure]:
    figs = {stem: layer_profiles(runs, *spec) for stem, spec in PROFILES.items()}
    figs |= {"grad_norm_steps": gradient_norm_over_steps(runs),
             "grad_hist_epochs": histogram_small_multiples(HistogramGrid(runs), runs),
             "training_curves": training_curves(runs), "depth_sweep": depth_sweep(runs)}
    return {k: v for k, v in figs.items() if v is not None}
