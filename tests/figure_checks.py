"""What a reader of the report would see cut off or left blank, measured by matplotlib's renderer:
used by tests/test_report_layout.py and scripts/report_screenshots.py."""

from __future__ import annotations

import numpy as np


def outside_canvas(fig) -> list[str]:
    """Every artist of ``fig`` (and of its subfigures) whose drawn extent leaves the canvas, as
    the renderer measures it: what a saved PNG would cut off."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    bad, todo = [], list(fig.get_children())
    while todo:
        artist = todo.pop()
        if hasattr(artist, "subfigs") and artist is not fig:
            todo += artist.get_children()
            continue
        if not artist.get_visible() or not artist.get_in_layout():
            continue
        box = artist.get_tightbbox(renderer)
        if box is None or box.width == 0:
            continue
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            text = getattr(artist, "get_text", lambda: "")() or type(artist).__name__
            bad.append(f"{text[:60]!r} at {np.round(box.extents).tolist()} in {width:.0f}x{height:.0f}")
    return bad


def silent_empty_panels(fig) -> list[str]:
    """Visible panels with nothing drawn and no words saying why."""
    bad = []
    for ax in fig.get_axes():
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        drawn = any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in ax.get_lines())
        drawn = drawn or bool(ax.collections) or bool(ax.images)
        if not drawn and not [t for t in ax.texts if t.get_text().strip()]:
            bad.append(ax.get_title() or ax.get_ylabel() or "untitled panel")
    return bad
