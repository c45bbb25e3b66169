"""The comparison report on real logs: tiny real trainings (skip and plain twins, two depths,
one that diverges), then `python -m skipstudy.report` on them, and the training callback."""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import FAST, PYTHON, cli_env
from skipstudy.analysis.figures import merged_layer_order
from skipstudy.analysis.logs import load_run
from skipstudy.report import build_report, main
from skipstudy.train import train

EPOCHS = 3
# The CLI twin of conftest.FAST, smaller images so that two depths x skip/plain take seconds.
TINY = [
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "dataset.num_train=32",
    "dataset.num_val=16",
    "dataset.batch_size=8",
    "dataset.image_size=16",
]
FIGURES = ["gradient_flow", "grad_norm_steps", "grad_hist_epochs", "training_curves", "depth_sweep", "activation_std",
           "grad_split", "signal_propagation"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real `-m` sweep: CIFAR ResNet depth 8 and 14, each with and without skips."""
    root = tmp_path_factory.mktemp("logs")
    out = root / "sweep"
    proc = _cli(["-m", "skipstudy.train", "-m", "model=cifar_resnet", "model.depth=8,14", "model.skip=true,false",
                 *TINY, f"hydra.sweep.dir={out}"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> Path:
    """A real run that diverges: the plain mini net without BatchNorm at lr=1e6. The monitor
    stops it at the first non-finite gradient (monitor.on_nonfinite=stop)."""
    root = tmp_path_factory.mktemp("diverged")
    out = root / "run"
    proc = _cli(["-m", "skipstudy.train", "model=mini", "model.skip=false", "model.norm=none", "optimizer.lr=1e6",
                 *TINY, f"hydra.run.dir={out}"], root)
    # Training may report the divergence by its exit status (3); the logs are what matter here.
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert glob.glob(str(out / "events.out.tfevents.*")), proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    return build_report([sweep], tmp_path_factory.mktemp("report"))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_figure_exists_and_decodes(report):
    for stem in FIGURES:
        path = report.out / f"{stem}.png"
        assert path.is_file(), f"{stem}.png missing; wrote {report.files}"
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and im.width > 200 and im.height > 200
    gifs = sorted(report.out.glob("*.gif"))
    assert len(gifs) == 4
    for gif in gifs:
        with Image.open(gif) as im:
            im.load()
            assert im.format == "GIF"


@pytest.mark.slow  # reads a real multirun sweep of several trainings
def test_block_quantities_and_the_slope_are_in_the_report(report, sweep):
    """The per-block tags reach the report (block order from the export), each run's
    grad_decay_slope is the median of its last epoch's slopes recomputed from the exported
    RMS, and a plain run has no shortcut part."""
    rows = {r["run"]: r for r in _rows(report.out)}
    for run in report.runs:
        stats = json.loads((run.path / "grad_stats.json").read_text())
        assert run.blocks == stats["blocks"] and len(run.blocks) == (3 if "depth=8" in run.name else 6)
        rms = np.array([stats["series"][f"grad_rms/output/{n}"] for n in stats["layers"]], dtype=float)
        last = np.asarray(stats["epoch"]) == max(stats["epoch"])
        slopes = [np.polyfit(np.arange(rms.shape[0]), np.log10(rms[:, k]), 1)[0] for k in np.flatnonzero(last)]
        assert float(rows[run.name]["grad_decay_slope"]) == pytest.approx(float(np.median(slopes)), rel=1e-4)
        has_shortcut = run.series(f"grad_split/shortcut/{run.blocks[-1]}") is not None
        assert has_shortcut == run.skip
    # One seed per setting: a mean and no interval.
    table = (report.out / "decay_slope.md").read_text()
    assert table.count("\n| `") == 4


@pytest.mark.slow  # reads a real multirun sweep of several trainings
def test_slope_across_seeds_has_a_student_t_interval(tmp_path):
    """Three seeds of one setting: the mean and the 95% interval of their grad_decay_slope,
    against numpy and the tabulated t(0.975, 2) = 4.303."""
    from skipstudy.analysis.summary import decay_slope, slope_by_setting

    out = tmp_path / "seeds"
    proc = _cli(["-m", "skipstudy.train", "-m", "model=mini", "seed=0,1,2", *TINY, f"hydra.sweep.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = build_report([out], tmp_path / "report")
    values = np.array([decay_slope(run) for run in report.runs])
    assert values.size == 3 and np.isfinite(values).all() and np.unique(values).size == 3
    (row,) = slope_by_setting(report.runs)
    half = 4.303 * values.std(ddof=1) / np.sqrt(3)
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(values.mean())
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((values.mean() - half, values.mean() + half), rel=1e-3)
    assert "Depth-decay exponent across seeds" in (report.out / "index.html").read_text()


@pytest.mark.slow
def test_gif_has_one_frame_per_epoch(report):
    assert len(report.gif_frames) == 4
    for gif in report.out.glob("*.gif"):
        with Image.open(gif) as im:
            assert im.n_frames == EPOCHS
            frames = []
            for i in range(im.n_frames):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB")))
        # Consecutive frames show different epochs, so no two are the same picture.
        assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))


@pytest.mark.slow
def test_table_has_every_run_with_its_overrides(report, sweep):
    rows = _rows(report.out)
    run_dirs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(rows) == len(run_dirs) == 4
    by_overrides = {r["overrides"]: r for r in rows}
    for run_dir in run_dirs:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        row = by_overrides[" ".join(overrides)]
        assert row["run"] == run_dir.name
        assert row["skip"] == ("true" if "model.skip=True" in overrides else "false")
        assert row["depth"] == ("8" if "model.depth=8" in overrides else "14")
        assert row["epochs"] == str(EPOCHS) and row["steps"] == str(2 * EPOCHS)
        assert row["status"] == "ok" and row["nonfinite_steps"] == "0"
        assert float(row["wall_time_s"]) > 0
        assert 0.0 <= float(row["final_val_acc"]) <= 1.0 and np.isfinite(float(row["final_train_loss"]))

        # Attenuation against an independent source: the monitor's own export.
        stats = json.loads((run_dir / "grad_stats.json").read_text())
        first, last = stats["layers"][0], stats["layers"][-1]
        a = np.array(stats["series"][f"grad_rms/output/{first}"], dtype=float)
        b = np.array(stats["series"][f"grad_rms/output/{last}"], dtype=float)
        in_last_epoch = np.array(stats["epoch"]) == EPOCHS - 1
        assert float(row["grad_attenuation"]) == pytest.approx(np.median(a[in_last_epoch] / b[in_last_epoch]), rel=1e-5)

    md = (report.out / "summary.md").read_text()
    for row in rows:  # the Markdown table: the overrides that differ, and the run's directory
        assert f"| {row['model.depth']} | {row['model.skip']} | {row['epochs']} |" in md and row["run"] in md


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.slow
def test_index_references_only_existing_local_files(report):
    text = (report.out / "index.html").read_text()
    parser = _Refs()
    parser.feed(text)
    assert parser.refs
    for ref in parser.refs:
        assert "://" not in ref and not ref.startswith(("/", "//")), ref
        assert (report.out / ref).is_file(), ref
    assert "http" not in text  # no fonts, scripts or styles from the network
    # Every image written is shown.
    for path in [*report.out.glob("*.png"), *report.out.glob("*.gif")]:
        assert path.name in parser.refs


@pytest.mark.slow
def test_cli_with_a_diverged_run_and_different_tracked_layers(sweep, diverged, tmp_path):
    out = tmp_path / "out"
    proc = _cli(["-m", "skipstudy.report", str(sweep), str(diverged), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = {r["run"].split("/")[-1]: r for r in _rows(out)}
    assert len(rows) == 5
    bad = rows["run"]
    stats = json.loads((diverged / "grad_stats.json").read_text())
    assert stats["diverged_at"] is not None
    assert bad["status"] == f"diverged at step {stats['diverged_at']['step']}"
    assert int(bad["nonfinite_steps"]) == len(stats["nonfinite_steps"]) >= 1
    # The mini net tracks other layers than the CIFAR ResNets; both are in one report.
    assert set(load_run(diverged).layers).isdisjoint({"conv1", "layer1.0.conv1"})
    for stem in FIGURES:
        with Image.open(out / f"{stem}.png") as im:
            im.load()
    assert "diverged" in (out / "index.html").read_text()


@pytest.mark.slow
def test_run_in_progress_and_pending_jobs(sweep, tmp_path):
    """A copy of a run whose event file ends mid-record (as while it is being written), with
    no monitor export yet, beside a job that has not logged anything."""
    src = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))[0]
    run = tmp_path / "sweep" / "running"
    shutil.copytree(src, run)
    (run / "grad_stats.json").unlink()
    (event,) = glob.glob(str(run / "events.out.tfevents.*"))
    data = Path(event).read_bytes()
    Path(event).write_bytes(data[: int(len(data) * 0.6)])
    (tmp_path / "sweep" / "pending" / ".hydra").mkdir(parents=True)

    rep = build_report([tmp_path / "sweep"], tmp_path / "out")
    (row,) = _rows(rep.out)
    assert 0 < int(row["steps"]) < 2 * EPOCHS
    assert row["status"].startswith("partial")
    assert any("pending" in n and "no event files yet" in n for n in rep.notes)
    with Image.open(rep.out / "gradient_flow.png") as im:
        im.load()
    assert load_run(run).layers == load_run(src).layers  # order from the events alone


def test_missing_and_empty_directories_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "does not exist" in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err

    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    assert main([str(tmp_path / "stuff")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_every_declared_layer_and_block_quantity_is_read(tmp_path, monkeypatch):
    """The reader takes its per-layer and per-block quantities from the monitor's registry:
    each declared one alone, and one declared after import, gives the units in written order."""
    from torch.utils.tensorboard import SummaryWriter

    from skipstudy.monitor import QUANTITIES
    from skipstudy.monitor.quantities import Quantity

    monkeypatch.setitem(QUANTITIES, "test_new/block", Quantity("test_new/block", lambda s: None, "split_branch"))
    units = {"layers": ["conv1", "layer1.0.conv1", "fc"], "blocks": ["layer1.0", "layer2.0"]}
    declared = {over: [q.name for q in QUANTITIES.values() if q.over == over] for over in units}
    assert "grad_rms/output" in declared["layers"] and "test_new/block" in declared["blocks"]
    for over, quantities in declared.items():
        for q in quantities:
            run_dir = tmp_path / q.replace("/", "_")
            with SummaryWriter(run_dir) as writer:
                for name in units[over]:
                    writer.add_scalar(f"{q}/{name}", 1.0, 0)
            run = load_run(run_dir)
            assert getattr(run, over) == units[over], q
            assert list(run.layer_series(q)) == units[over], q


def test_merged_layer_order_aligns_runs_by_name():
    plain = ["block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]
    skip = ["block1.conv1", "block1.conv2", "block1.downsample.0", "block2.conv1", "block2.conv2",
            "block2.downsample.0", "fc"]
    assert merged_layer_order([plain, skip]) == skip
    shallow = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "fc"]
    deep = ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1", "fc"]
    assert merged_layer_order([shallow, deep]) == deep


@pytest.mark.slow
def test_callback_writes_figures_and_custom_scalars_layout(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    cfg = make_cfg([*FAST, "model=mini", "trainer.max_epochs=2", "report.figures_to_tensorboard=true"])
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)
    (event,) = glob.glob(str(run_dir / "events.out.tfevents.*"))

    acc = EventAccumulator(event, size_guidance={"images": 0})
    acc.Reload()
    for stem in ("gradient_flow", "grad_norm_steps", "grad_hist_epochs", "training_curves", "activation_std"):
        (img,) = acc.Images(f"report/{stem}")
        with Image.open(io.BytesIO(img.encoded_image_string)) as im:
            im.load()
            assert im.width > 200

    layouts = [layout_pb2.Layout.FromString(v.tensor.string_val[0])
               for ev in EventFileLoader(event).Load() for v in ev.summary.value if v.tag == "custom_scalars__config__"]
    assert len(layouts) == 1
    charts = {c.title: list(c.multiline.tag) for cat in layouts[0].category for c in cat.chart}
    layers = load_run(run_dir).layers
    assert layers[0] == "block1.conv1" and layers[-1] == "fc"
    # One chart per quantity, every tracked layer in it, and each entry matches its one tag.
    scalar_tags = set(acc.Tags()["scalars"])
    for quantity in ("grad_rms/output", "grad_norm/output", "act/std"):
        entries = charts[quantity]
        assert len(entries) == len(layers)
        for entry in entries:
            assert len([t for t in scalar_tags if re.search(entry, t)]) == 1, entry
    assert {"^train/loss$", "^val/loss$"} <= set(charts["loss (train, val)"])


def test_report_option_typos_fail_before_training(make_cfg):
    from skipstudy.errors import ConfigError

    cfg = make_cfg([*FAST, "+report.figures=true"])
    with pytest.raises(ConfigError, match=r"report\.figures is not a key of report; did you mean report\.figures_to_tensorboard"):
        train(cfg, cfg.hydra.runtime.output_dir)
