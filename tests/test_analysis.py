"""Runs and sweeps in pandas (``skipstudy.analysis.load_runs`` / ``load_grad_stats``), checked
against the event files read by tbparse directly and against the monitor's own export."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tbparse import SummaryReader

from conftest import PYTHON, REPO, cli_env
from skipstudy.analysis import load_grad_stats, load_runs

# Two epochs of two steps: a first and a last epoch to tell apart.
SWEEP_ARGS = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "dataset.num_train=32",
              "dataset.num_val=16", "dataset.batch_size=8", "dataset.image_size=16"]


@pytest.fixture(scope="module")
def depth_sweep(tmp_path_factory) -> Path:
    """A real `-m` sweep: CIFAR ResNet depth 8 and 14, each with and without skips."""
    root = tmp_path_factory.mktemp("frames")
    out = root / "sweep"
    proc = subprocess.run([PYTHON, "-m", "skipstudy.train", "-m", "model=cifar_resnet", "model.depth=14,8",
                           "model.skip=true,false", *SWEEP_ARGS, f"hydra.sweep.dir={out}"], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _events(run_dir: Path) -> pd.DataFrame:
    # Lightning writes `epoch` again with each log call of a step: one (tag, step), one value.
    return SummaryReader(str(run_dir)).scalars.drop_duplicates(["tag", "step"], keep="last")


def test_one_run_is_a_tidy_table_of_its_event_file(session_run):
    run_dir = session_run[0]
    df = load_runs(run_dir)
    # An in-process run has no overrides: the table is the run and its scalars.
    assert list(df.columns) == ["run", "path", "step", "epoch", "tag", "value"]
    assert set(df.path) == {str(run_dir.resolve())}
    reference = _events(run_dir)
    assert len(df) == len(reference)
    merged = df.merge(reference, on=["tag", "step"], suffixes=("", "_tb"))
    assert len(merged) == len(df)
    np.testing.assert_array_equal(merged.value.to_numpy(), merged.value_tb.to_numpy())
    epochs = df[df.tag == "epoch"]
    assert (epochs.value.astype(int) == epochs.epoch).all()


def test_a_run_without_hydra_files_reads_its_config_from_the_hparams(session_run, tmp_path):
    """In-process runs (notebooks) have no .hydra/: the run's options come from the flattened
    config train.py wrote as HParams, nested again."""
    from skipstudy.analysis.logs import load_run

    run_dir, _, cfg = session_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for event_file in run_dir.glob("events.out.tfevents.*"):
        shutil.copy(event_file, bare)
    run = load_run(bare)
    model = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]
    assert run.config["model"] == model and run.skip is bool(cfg.model.skip)
    assert run.option("dataset.batch_size") == cfg.dataset.batch_size and run.option("no.such.key", 3) == 3


def test_grad_stats_are_the_monitor_export_and_its_tensorboard_copy(session_run, tmp_path):
    run_dir = session_run[0]
    export = json.loads((run_dir / "grad_stats.json").read_text())
    stats = load_grad_stats(run_dir)
    assert list(stats.columns) == ["step", "epoch", *export["series"]]
    assert stats.step.tolist() == export["step"] and stats.epoch.tolist() == export["epoch"]
    for tag, values in export["series"].items():
        np.testing.assert_array_equal(stats[tag].to_numpy(), np.array(values, dtype=np.float64))
    # Without the export (monitor.export=none) the same table comes from TensorBoard's float32 copy.
    bare = tmp_path / "run"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("grad_stats.json", "checkpoints"))
    from_tb = load_grad_stats(bare)
    # A series the monitor never wrote (a plain block's shortcut part) is all null in the export
    # and absent from TensorBoard.
    written = [tag for tag, values in export["series"].items() if any(v is not None for v in values)]
    assert len(written) < len(export["series"]) and sorted(from_tb.columns[2:]) == sorted(written)
    assert from_tb.step.tolist() == export["step"] and from_tb.epoch.tolist() == export["epoch"]
    for tag in written:
        np.testing.assert_allclose(from_tb[tag].to_numpy(), stats[tag].to_numpy(), rtol=1e-6)


@pytest.mark.slow  # a real 4-job sweep
def test_a_sweep_has_its_overrides_as_typed_columns(depth_sweep):
    df = load_runs(depth_sweep)
    keys = [o.split("=")[0] for o in ["model=", "model.depth=", "model.skip=", *SWEEP_ARGS]]
    assert list(df.columns) == ["run", "path", *keys, "step", "epoch", "tag", "value"]
    assert (df["trainer.max_epochs"] == 2).all() and (df["dataset.image_size"] == 16).all()
    assert df["model.depth"].dtype == np.int64 and df["model.skip"].dtype == bool
    runs = df.drop_duplicates("run")
    assert sorted(zip(runs["model.depth"], runs["model.skip"])) == [(8, False), (8, True), (14, False), (14, True)]
    for run_dir in (depth_sweep / name for name in runs.run):
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        mine = df[df.run == run_dir.name]
        assert f"model.depth={mine['model.depth'].iloc[0]}" in overrides
        reference = _events(run_dir)
        loss = reference[reference.tag == "train/loss"].sort_values("step")
        np.testing.assert_array_equal(mine[mine.tag == "train/loss"].value.to_numpy(), loss.value.to_numpy())


def _snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### A sweep in pandas", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow  # a real 4-job sweep
def test_readme_pandas_snippet_compares_depths(depth_sweep):
    code = _snippet()
    assert len([line for line in code.splitlines() if line.strip()]) < 10
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("logs/default/multirun_<time>", str(depth_sweep)), namespace)
    table = namespace["last"].groupby(["model.depth", "model.skip"]).value.median().unstack()
    assert table.index.tolist() == [8, 14] and table.columns.tolist() == [False, True]  # numbers sort as numbers
    # The same medians from each run's own export (float64; TensorBoard keeps float32).
    for run_dir in (p.parent.parent for p in depth_sweep.glob("*/.hydra/overrides.yaml")):
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        given = dict(o.split("=", 1) for o in overrides)
        depth, skip = int(given["model.depth"]), yaml.safe_load(given["model.skip"])
        export = json.loads((run_dir / "grad_stats.json").read_text())
        last = np.array(export["epoch"]) == 1
        expected = np.median(np.array(export["series"]["grad_rms/output/conv1"])[last])
        assert table.loc[depth, skip] == pytest.approx(expected, rel=1e-6)
    printed = out.getvalue()
    assert "model.skip" in printed and "grad_decay/slope" in printed


def _hparams_order(run_dir: Path) -> list[str]:
    """The HParams tab's column order for this run, as TensorBoard's backend sorts it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/experiment"])
    backend_context._sort_and_reduce_to_hparams_limit(data.experiment)
    return [info.name for info in data.experiment.hparam_infos]


def test_hparams_of_a_single_run_lead_with_the_model(session_run):
    order = _hparams_order(session_run[0])
    lead = ["model._target_", "model.init", "model.norm", "model.skip", "overrides"]
    assert order[:len(lead)] == lead
    assert len(order) > 40 and "checkpoint.monitor" in order  # the rest kept, after them


@pytest.mark.slow  # a real 4-job sweep
def test_hparams_of_a_sweep_lead_with_its_varied_keys_and_the_model(depth_sweep):
    for run_dir in (p.parent.parent for p in depth_sweep.glob("*/.hydra/overrides.yaml")):
        order = _hparams_order(run_dir)
        # The swept keys (model.depth, model.skip) are model keys here; with seed=0,1 seed would lead too.
        assert order[:7] == ["model._target_", "model.depth", "model.init", "model.norm", "model.shortcut",
                             "model.skip", "overrides"], order[:8]
        assert order.index("checkpoint.monitor") > order.index("model.skip")


def test_sweep_keys_come_from_the_command_line_and_the_preset(tmp_path):
    """The keys a sweep varies, read from its multirun.yaml (saved here from a composed config as
    Hydra saves it): a preset's hydra.sweeper.params and a command-line sweep."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from skipstudy.launchers.hparams import hparams_summaries, lead_keys, sweep_keys

    cfg = compose_cfg(["experiment=he2016_depth", "optimizer.lr=0.1"], tmp_path)
    doc = OmegaConf.to_container(cfg, resolve=False)
    doc["hydra"]["overrides"]["task"] += ["seed=0,1", "optimizer.momentum=range(1,3)"]
    OmegaConf.save(OmegaConf.create(doc), tmp_path / "multirun.yaml")
    varied = sweep_keys(tmp_path / "job0")
    assert sorted(varied) == ["model.depth", "model.skip", "optimizer.momentum", "seed"]
    hparams = {"checkpoint.monitor": "val/acc", "model.depth": 20, "model.skip": True, "model.init": "default",
               "optimizer.momentum": 1, "overrides": "x", "seed": 0, "trainer.max_epochs": 3}
    lead = lead_keys(hparams, varied)
    assert set(lead) == set(hparams) - {"checkpoint.monitor", "trainer.max_epochs"}
    summaries = hparams_summaries(hparams, {"val/acc": 0.0}, lead)
    from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(summaries[0].value[0].metadata.plugin_data.content)
    backend_context._sort_and_reduce_to_hparams_limit(data.experiment)
    assert [i.name for i in data.experiment.hparam_infos] == [
        "model.depth", "model.init", "model.skip", "optimizer.momentum", "overrides", "seed",
        "checkpoint.monitor", "trainer.max_epochs"]
    assert sweep_keys(tmp_path / "elsewhere" / "run") == []  # a single run: no sweep file
