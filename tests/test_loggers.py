"""Loggers from the command line (``logger=[tensorboard,csv,mlflow,wandb]``): one real training
writes every scalar, the gradient monitor's included, to each; read back with each tool's own
reader (pandas for the CSV, MLflow's client, W&B's offline run files) and compared with the
run's TensorBoard events."""

from __future__ import annotations

import json
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST
from skipstudy.analysis.logs import is_monitor_tag, load_run
from skipstudy.train import train

pytest.importorskip("mlflow", reason="mlflow is a dev extra")
pytest.importorskip("wandb", reason="wandb is a dev extra")

def _readme_line() -> str:
    from test_readme import readme_commands

    return next(c for c in readme_commands() if c.startswith("python -m skipstudy.train 'logger=["))


# The README's line: python -m skipstudy.train 'logger=[tensorboard,csv,mlflow,wandb]'
ALL = shlex.split(_readme_line())[3]
RUN = [*FAST, "model=mini", "dataset.image_size=16", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One training with all four loggers, offline: W&B in offline mode, MLflow's file store."""
    from conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("loggers")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONFIG_DIR", str(tmp / "wandb-config"))
    mp.setenv("WANDB_CACHE_DIR", str(tmp / "wandb-cache"))
    try:
        cfg = compose_cfg([*RUN, ALL], tmp)
        run_dir = Path(cfg.hydra.runtime.output_dir)
        train(cfg, run_dir)
    finally:
        mp.undo()
    run = load_run(run_dir)
    monitor_tags = [t for t in run.scalars if is_monitor_tag(t)]
    assert len(monitor_tags) > 20  # per-layer norms, RMS, activations, block splits
    return run, monitor_tags, cfg


def _check(series: dict[str, pd.Series], run, tags: list[str]) -> None:
    """Each tag's values by step equal the TensorBoard copy (float32) to its precision."""
    for tag in tags:
        tb = run.scalars[tag]
        assert tag in series, tag
        got = series[tag].dropna().sort_index()
        assert got.index.tolist() == tb.steps.tolist(), tag
        np.testing.assert_allclose(got.to_numpy(np.float64), tb.values, rtol=1e-6, err_msg=tag)


def test_csv_gets_every_scalar(logged):
    run, monitor_tags, _ = logged
    table = pd.read_csv(run.path / "csv" / "metrics.csv")
    series = {tag: table.set_index("step")[tag] for tag in table.columns if tag not in ("step", "epoch")}
    _check(series, run, [*monitor_tags, "train/loss", "val/acc"])
    assert (run.path / "csv" / "hparams.yaml").is_file()


def test_mlflow_file_store_gets_every_scalar_and_the_config(logged):
    from mlflow.tracking import MlflowClient

    run, monitor_tags, cfg = logged
    store = Path(cfg.paths.log_dir) / "mlruns"
    client = MlflowClient(store.resolve().as_uri())
    experiment = client.get_experiment_by_name(cfg.name)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["model.skip"] == "True" and found.data.params["seed"] == "0"
    series = {}
    for tag in [*monitor_tags, "train/loss", "val/acc"]:
        history = client.get_metric_history(found.info.run_id, tag)
        series[tag] = pd.Series([m.value for m in history], index=[m.step for m in history])
    _check(series, run, [*monitor_tags, "train/loss", "val/acc"])
    assert "hparams/grad_decay_slope" in found.data.metrics  # the end-of-fit summary numbers too


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): W&B's header, then LevelDB's
    log format (32 KiB blocks; each piece a 7-byte header: CRC, length, FULL/FIRST/MIDDLE/LAST),
    each record one ``wandb_internal_pb2.Record``. This wandb release reads them only in its Go
    core, so the test reads the file as `wandb sync` would."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer
            pos += left
            continue
        piece = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + piece) & 0xFFFFFFFF == crc
        pos += 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(records) -> dict[str, pd.Series]:
    """Each logged key's values by ``trainer/global_step`` (WandbLogger's step key)."""
    rows: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for tag, value in items.items():
                rows.setdefault(tag, {})[int(items["trainer/global_step"])] = value
    return {tag: pd.Series(values, dtype=np.float64) for tag, values in rows.items()}


def test_wandb_offline_run_gets_every_scalar_and_the_config(logged):
    run, monitor_tags, _ = logged
    (offline,) = (run.path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(offline)
    config: dict[str, str] = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: item.value_json for item in record.config.update})
    series = _wandb_history(records)
    _check(series, run, [*monitor_tags, "train/loss", "val/acc"])
    assert json.loads(config["model.skip"]) is True and "overrides" in config


def test_tensorboard_stays_the_run_record(logged):
    run, _, _ = logged
    assert run.histograms and (run.path / "grad_stats.json").is_file()  # histograms and figures: TensorBoard only
    assert [p.name for p in run.path.glob("events.out.tfevents.*")]


def test_readme_logger_line(logged):
    """The README's logger line composes the four loggers; the fixture trained with it (shortened)."""
    run, _, cfg = logged
    assert ALL == "logger=[tensorboard,csv,mlflow,wandb]"
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow", "wandb"]
    assert (run.path / "csv" / "metrics.csv").is_file() and list((run.path / "wandb").glob("offline-run-*"))
    assert list((Path(cfg.paths.log_dir) / "mlruns").glob("*/*/metrics"))


@pytest.mark.slow  # a real 2-job sweep in one process (Hydra's basic launcher)
def test_each_job_of_a_sweep_is_its_own_wandb_and_mlflow_run(tmp_path, monkeypatch):
    import subprocess

    from conftest import PYTHON, cli_env
    from mlflow.tracking import MlflowClient

    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wcache")}
    proc = subprocess.run([PYTHON, "-m", "skipstudy.train", "-m", "model.skip=true,false", *RUN,
                           "logger=[tensorboard,mlflow,wandb]", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.parent for p in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    ids = set()
    for job in jobs:
        (offline,) = job.glob("wandb/offline-run-*/run-*.wandb")
        steps = _wandb_history(_wandb_records(offline))["grad_norm/total"].index.tolist()
        assert steps == [0, 1, 2]  # this job's three steps only, not the other job's too
        ids.add(offline.parent.name)
    assert len(ids) == 2
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as a reader of the file store must (README)
    client = MlflowClient((tmp_path / "logs" / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(job.name for job in jobs)


@pytest.mark.slow  # a real run and its resume, two processes
def test_a_resumed_run_keeps_its_earlier_csv_rows(tmp_path):
    import subprocess

    from conftest import PYTHON, cli_env

    run_dir = tmp_path / "run"
    first = subprocess.run([PYTHON, "-m", "skipstudy.train", *RUN, "logger=[tensorboard,csv]",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([PYTHON, "-m", "skipstudy.train", f"resume={run_dir}", "trainer.max_epochs=2"],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    before = pd.read_csv(run_dir / "csv" / "metrics.csv")
    after = pd.read_csv(run_dir / "csv" / "resume-1" / "metrics.csv")
    assert sorted(before["train/loss"].dropna().index.map(before["step"])) == [0, 1, 2]
    assert sorted(after["train/loss"].dropna().index.map(after["step"])) == [3, 4, 5]
    run = load_run(run_dir)  # TensorBoard holds the whole run, as the two CSV files together do
    both = pd.concat([before, after]).set_index("step")["train/loss"].dropna().sort_index()
    np.testing.assert_allclose(both.to_numpy(), run.scalars["train/loss"].values, rtol=1e-6)
