"""Figure text that stays inside its canvas at any run length: titles wrapped to the figure's
width, one legend with as many columns as fit, a panel without data saying so, on a
constrained-layout Agg figure (no pyplot: the training callback draws them too). The checks
that say so, measured by the renderer, are the tests' (``tests/figure_checks.py``)."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipstudy.analysis.logs import Run


def new_figure(width: float, height: float, **kwargs) -> Figure:
    # Constrained layout keeps long titles, colour bars and the outside legend apart.
    fig = Figure(figsize=(width, height), **({"layout": "constrained"} | kwargs))
    FigureCanvasAgg(fig)
    return fig


def _chars(width_in: float, fontsize: float) -> int:
    """About how many characters of ``fontsize`` fit in ``width_in`` inches (DejaVu Sans
    averages ~0.6 em a character; a little slack for the widest)."""
    return max(12, int(width_in * 72 / (0.62 * fontsize)))


def suptitle(fig, text: str, fontsize: float = 12, **kwargs) -> None:
    """The title of a figure (or of a full-width subfigure), wrapped to its width: constrained
    layout makes room above the panels for every line, but never shortens a line."""
    width = fig.figure.get_size_inches()[0]  # a Figure's .figure is itself
    fig.suptitle(textwrap.fill(text, _chars(width * 0.94, fontsize)), fontsize=fontsize, **kwargs)


def no_data(ax, what: str) -> None:
    """Say in words that a panel has nothing to draw, rather than leave an empty frame."""
    ax.text(0.5, 0.5, textwrap.fill(what, _chars(ax.figure.get_size_inches()[0] * ax.get_position().width * 0.9, 9)),
            transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def short(label: str, n: int = 60) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def run_title(run: Run, width: int = 48) -> str:
    kind = {True: " [skip]", False: " [plain]", None: ""}[run.skip] + (" [diverged]" if run.diverged else "")
    return textwrap.fill(short(run.label) + kind, width)


def legend(fig: Figure, axes) -> None:
    """One legend under the panels, as many columns as fit the figure's width, long labels
    wrapped: constrained layout gives it the height it needs, not the width."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if not seen:
        return
    room = _chars(fig.get_size_inches()[0] * 0.92, 8)
    # Each entry: its text plus ~6 characters of line sample and spacing.
    width = min(max(len(label) for label in seen), room - 6) + 6
    ncol = max(1, min(len(seen), room // width, 4))
    labels = [textwrap.fill(label, max(10, room // ncol - 6)) for label in seen]
    fig.legend(list(seen.values()), labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
