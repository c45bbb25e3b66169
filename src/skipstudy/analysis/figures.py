"""The report's figures: each returns a Figure on its own Agg canvas (no pyplot: the training
callback draws them too), or None when no run has its data. Colour is a setting, solid lines
skip nets, dashed their plain twins; non-finite values are gaps, not zeros."""

from __future__ import annotations

import math
from collections.abc import Iterable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skipstudy.analysis.canvas import legend, new_figure, no_data, run_title, short, suptitle
from skipstudy.analysis.histograms import HistogramGrid, histogram_small_multiples
from skipstudy.analysis.logs import Run, final_train_loss, final_val_acc
from skipstudy.monitor.writers import mark_zeros

SKIP_STYLE = {True: "-", False: "--", None: ":"}
NO_VAL = " (validation off, or the runs ended before their first validation)"
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


def run_styles(runs: list[Run]) -> dict[int, dict]:
    """Line style by ``id(run)``. Skip and plain twins of one setting share a colour."""
    palette = matplotlib.colormaps["tab10"].colors
    settings = [tuple(o for o in run.group if not o.startswith("model.skip=")) for run in runs]
    order = list(dict.fromkeys(settings))
    return {id(run): {"color": palette[order.index(s) % len(palette)], "linestyle": SKIP_STYLE[run.skip],
                      "label": short(run.label) + (" (diverged)" if run.diverged else "")}
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


def layer_profiles(runs: list[Run], title: str, ylabels: dict[str, str], linear: tuple[str, ...] = (),
                   relative_depth: bool = False) -> Figure | None:
    """Each quantity (a row) against layer depth at the first, middle and last epoch (columns):
    the layers by name in one merged forward order, or with ``relative_depth`` each run's own
    index / (its layers - 1), so a 20-layer and a 110-layer net span the same axis."""
    quantities = list(ylabels)
    runs = [r for r in runs if any(r.layer_series(q) for q in quantities)]
    if not runs:
        return None
    epochs = {id(r): sorted({e for q in quantities for s in r.layer_series(q).values() for e in r.epoch_at(s.steps)})
              for r in runs}
    ncols = min(3, max(len(e) for e in epochs.values()))
    columns = {1: ["last"], 2: ["first", "last"], 3: ["first", "middle", "last"]}[ncols]
    order = merged_layer_order(r.units(quantities[0]) for r in runs)
    pos = {name: i for i, name in enumerate(order)}
    styles = run_styles(runs)
    width = 6.0 if relative_depth else max(4.0, min(0.2 * len(order) + 2.5, 9.0))
    fig = new_figure(max(width * ncols, 6.5), 3.2 * len(quantities) + 1.8 + 0.18 * math.ceil(len(runs) / 2))
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
                own = run.units(q)
                x = np.array([own.index(n) / max(1, len(own) - 1) if relative_depth else pos[n] for n in profile])
                raw = np.array(list(profile.values()), dtype=np.float64)
                y = np.where(np.isfinite(raw), raw, np.nan) if q in linear else _positive(raw)
                (line,) = ax.plot(x, y, marker="o", ms=3, lw=1.3, **styles[id(run)])
                if q not in linear:
                    mark_zeros(ax, x, raw, line.get_color())
                if not run.diverged:
                    healthy.append(y)
            if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
                no_data(ax, f"no {q} values at this epoch" + (" (plain nets have no shortcut part)"
                                                              if q in ("grad_split/ratio", "grad_split/cos") else ""))
            elif q not in linear:
                _fit_y(ax, healthy, log=True)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(f"{column} epoch" + (f" ({picked.pop()})" if len(picked) == 1 else ""), fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabels[q])
            if row == len(quantities) - 1 and relative_depth:
                ax.set_xticks(np.linspace(0, 1, 5))
                ax.set_xlabel("relative depth: layer index / (layers - 1)")
            elif row == len(quantities) - 1:
                step = max(1, math.ceil(len(order) / 40))
                ax.set_xticks(np.arange(len(order))[::step], order[::step], rotation=90, fontsize=7)
                ax.set_xlabel("layer (forward order)")
    suptitle(fig, title)
    legend(fig, axes)
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
            healthy_axes.append(ax)
            healthy += [_positive(s.values) for s in series.values()]
        if run.nonfinite_steps:
            ax.axvline(run.nonfinite_steps[0], color="red", lw=1, ls=":")
            ax.annotate("non-finite", (run.nonfinite_steps[0], 1), xycoords=("data", "axes fraction"),
                        color="red", fontsize=7, ha="right", va="top", rotation=90)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=run_title(run), xlabel="global step", ylabel=f"{quantity} (L2)")
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
    suptitle(fig, "Per-layer output-gradient norm over training (every recorded step)")
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
        if not ax.get_lines():
            no_data(ax, f"no {tag} logged" + (NO_VAL if tag.startswith("val/") else ""))
        elif "loss" in tag:
            _fit_y(ax, healthy)
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("global step")
    suptitle(fig, "Training curves (val: once per epoch, at the epoch's last step)")
    legend(fig, axes)
    return fig


def depth_sweep(runs: list[Run]) -> Figure | None:
    """Final train loss and val error against depth (He et al. 2016, Fig. 6), a line per
    setting and skip/plain; seeds of one depth and setting are averaged."""
    runs = [r for r in runs if r.depth is not None and r.has_data]
    if not runs:
        return None
    styles = run_styles(runs)
    lines: dict[tuple, list[Run]] = {}
    for run in runs:
        lines.setdefault(tuple(o for o in run.group if not o.startswith("model.depth=")) + (run.skip,), []).append(run)
    fig = new_figure(10.0, 4.2 + 0.18 * math.ceil(len(lines) / 2))
    axes = fig.subplots(1, 2)
    healthy = []
    for members in lines.values():
        # The mean over a depth's seeds leaves a diverged seed's NaN out (NaN when all diverged).
        points = pd.DataFrame({"depth": [r.depth for r in members], "loss": [final_train_loss(r) for r in members],
                               "err": [1.0 - final_val_acc(r) for r in members]}).groupby("depth").mean()
        depths, loss = points.index.to_numpy(), _positive(points["loss"])
        run = members[0]
        group = [o for o in run.group if not o.startswith(("model.depth=", "model.skip="))]
        kind = {True: "skip", False: "plain", None: "?"}[run.skip]
        style = styles[id(run)] | {"label": short(f"{kind} | {', '.join(group)}" if len(lines) > 2 and group else kind)}
        axes[0].plot(depths, loss, marker="o", **style)
        axes[1].plot(depths, 100 * points["err"].to_numpy(), marker="o", **style)
        healthy.append(loss)
    _fit_y(axes[0], healthy)
    for ax, what in zip(axes, ("train/loss", "val/acc")):
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
            no_data(ax, f"no {what} logged" + (NO_VAL if what == "val/acc" else ""))
    axes[0].set_ylabel("final train loss")
    axes[1].set_ylabel("final val error (%)")
    for ax in axes:
        ax.set_xlabel("depth (weighted layers)")
        ax.set_xticks(sorted({r.depth for r in runs}))
        ax.grid(True, alpha=0.3)
    suptitle(fig, "Depth sweep: skip vs plain (He et al. 2016, Fig. 6)")
    legend(fig, axes)
    return fig


def run_figures(runs: list[Run], relative_depth: bool = False) -> dict[str, Figure]:
    figs = {stem: layer_profiles(runs, *spec, relative_depth=relative_depth) for stem, spec in PROFILES.items()}
    figs |= {"grad_norm_steps": gradient_norm_over_steps(runs),
             "grad_hist_epochs": histogram_small_multiples(HistogramGrid(runs), runs),
             "training_curves": training_curves(runs), "depth_sweep": depth_sweep(runs)}
    return {k: v for k, v in figs.items() if v is not None}
