"""The report reads well for any sweep: no text outside a figure's canvas (matplotlib's own
renderer extents) for a run of one epoch or three, a panel without data says so in words,
tables show only the overrides that differ (typed, in natural order), and depth profiles can
be drawn against relative depth. scripts/report_screenshots.py shows the same in a browser."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, cli_env
from figure_checks import outside_canvas, silent_empty_panels
from skipstudy.analysis.figures import layer_profiles, run_figures
from skipstudy.analysis.logs import read_runs
from skipstudy.report import build_report

SMALL = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "dataset.num_val=16", "dataset.batch_size=8",
         "dataset.image_size=16"]
# The one-epoch sweep: three steps, validation off.
ONE_EPOCH = ["trainer.max_steps=3", "trainer.limit_val_batches=0", "dataset.num_train=64", *SMALL]
THREE_EPOCHS = ["trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                "dataset.num_train=32", *SMALL]


def check_figures(runs) -> None:
    for relative in (False, True):
        figures = run_figures(runs, relative_depth=relative)
        assert {"gradient_flow", "training_curves"} <= set(figures)
        for stem, fig in figures.items():
            assert not outside_canvas(fig), (stem, relative, outside_canvas(fig))
            assert not silent_empty_panels(fig), (stem, relative, silent_empty_panels(fig))


def test_one_run_figures_keep_their_text_inside(session_run):
    runs, _ = read_runs([session_run[0]])
    check_figures(runs)


def test_relative_depth_puts_each_net_on_zero_to_one(session_run):
    runs, _ = read_runs([session_run[0]])
    fig = layer_profiles(runs, "t", {"grad_rms/output": "rms"}, relative_depth=True)
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() and not ln.get_label().startswith("_")]
    x = np.asarray(line.get_xdata(), dtype=float)
    n = len(runs[0].layers)
    np.testing.assert_allclose(x, np.arange(n) / (n - 1))
    assert fig.axes[0].get_xlabel().startswith("relative depth")


def test_a_figure_with_a_long_title_and_legend_is_wrapped_not_cut(session_run):
    """A label as long as a sweep's (many overrides) still fits the narrow one-epoch figure."""
    runs, _ = read_runs([session_run[0]])
    runs[0].label = ", ".join(f"model.option_{i}=value_{i}" for i in range(12))
    fig = layer_profiles(runs, "A title much longer than the figure is wide, " * 4, {"grad_rms/output": "rms"})
    assert fig.get_size_inches()[0] < 8 and not outside_canvas(fig)


def _sweep(root: Path, name: str, args: list[str]) -> Path:
    out = root / name
    proc = subprocess.run([PYTHON, "-m", "skipstudy.train", "-m", "model=cifar_resnet", "model.depth=14,8",
                           "model.skip=true,false", *args, f"hydra.sweep.dir={out}"], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layout")
    return {"one": _sweep(root, "one", ONE_EPOCH), "three": _sweep(root, "three", THREE_EPOCHS)}


@pytest.mark.slow  # two real 4-job sweeps
@pytest.mark.parametrize("length", ["one", "three"])
def test_sweep_figures_keep_their_text_inside_and_name_empty_panels(sweeps, length):
    runs, _ = read_runs([sweeps[length]])
    assert len(runs) == 4
    check_figures(runs)
    if length == "one":  # validation off: the val panels say so
        texts = [t.get_text() for ax in run_figures(runs)["training_curves"].axes for t in ax.texts]
        assert any("no val/loss logged" in t for t in texts)


@pytest.mark.slow  # two real 4-job sweeps
def test_tables_show_the_varying_overrides_typed_and_in_natural_order(sweeps, tmp_path):
    report = build_report([sweeps["three"]], tmp_path / "report")
    assert report.keys == ["model.depth", "model.skip"]
    with open(report.out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.depth"], r["model.skip"]) for r in rows] == [("8", "false"), ("8", "true"), ("14", "false"),
                                                                    ("14", "true")]
    assert rows[0]["overrides"].startswith("model=cifar_resnet model.depth=8")  # the CSV keeps every override
    header = (report.out / "summary.md").read_text().splitlines()[0]
    assert header.startswith("| model.depth | model.skip | epochs |") and "trainer." not in header
    assert "| overrides |" not in header and header.rstrip().endswith("| run |")
    html = (report.out / "index.html").read_text()
    assert "<th>model.depth</th><th>model.skip</th><th>epochs</th>" in html
    assert html.index('<td class="num">8</td>') < html.index('<td class="num">14</td>')
    slopes = (report.out / "decay_slope.md").read_text()
    assert "`model.depth=8, model.skip=False`" in slopes and "trainer." not in slopes
