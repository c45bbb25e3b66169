"""Runs survive interruption: kill -9 and resume, SIGTERM, divergence, determinism, output safety.

The CLI tests run ``python -m skipstudy.train`` in a subprocess. A kill at a chosen moment is
made deterministic by a small wrapper script (:data:`KILLER`) that starts the same entry point
and sends the process a real SIGKILL (or SIGTERM) from inside at that moment; the resumed run
is then compared with an uninterrupted one, tag by tag, read with tbparse as the report does.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tbparse import SummaryReader
from torch.utils.data import DataLoader, TensorDataset

from conftest import FAST, PYTHON, cli_env, compose_cfg
from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.runs import dirs, stopping
from skipstudy.runs.resume import STATE_KEY, EpochLoader, RunState, cut_logs, rng_states
from skipstudy.train import train

# 6 steps per epoch, 2 epochs, last.ckpt every 2 steps; the gradient monitor on (its tags
# and export must survive the resume too).
RUN = [
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "dataset.num_train=96",
    "dataset.num_val=32",
    "dataset.batch_size=16",
    "checkpoint.every_n_train_steps=2",
]

# Runs skipstudy.train's entry point and kills its own process at a chosen moment:
# KILL_AT=save: right after last.ckpt of global step >= KILL_STEP is written (before Lightning
# logs that step's train/loss: the narrowest window); KILL_AT=start: as step KILL_STEP starts.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    import skipstudy.train as T

    step, at = int(os.environ["KILL_STEP"]), os.environ["KILL_AT"]
    sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
    if at == "save":
        save = L.Trainer.save_checkpoint
        def save_then_die(self, filepath, *args, **kwargs):
            save(self, filepath, *args, **kwargs)
            if self.global_step >= step and str(filepath).endswith("last.ckpt"):
                os.kill(os.getpid(), sig)
        L.Trainer.save_checkpoint = save_then_die
    else:
        class Die(Callback):
            sent = False
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step >= step and not self.sent:
                    self.sent = True
                    os.kill(os.getpid(), sig)
        build = T.checkpoint_callbacks
        T.checkpoint_callbacks = lambda *a, **k: [Die(), *build(*a, **k)]
    # Under DDP, Lightning starts rank 1 by re-running sys.argv[0]: it must stay this script
    # (so rank 1 dies at the same moment); otherwise the run records the usual entry point.
    if os.environ.get("KILL_KEEP_ARGV0") != "1":
        sys.argv = ["skipstudy.train", *sys.argv[1:]]
    T.main()
    """
)


def cli(args: list[str], cwd: Path, env: dict | None = None, script: Path | None = None):
    cmd = [PYTHON, str(script)] if script else [PYTHON, "-m", "skipstudy.train"]
    return subprocess.run([*cmd, *args], cwd=cwd, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=600)


def scalar_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag -> sorted (step, value) pairs over all event files, each file read
    on its own with tbparse (as skipstudy.analysis does)."""
    out: dict[str, list] = collections.defaultdict(list)
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        df = SummaryReader(str(path)).scalars
        for tag, step, value in zip(df.get("tag", []), df.get("step", []), df.get("value", [])):
            out[tag].append((int(step), float(value)))
    return {tag: sorted(pairs) for tag, pairs in out.items()}


def duplicated_steps(series: dict[str, list]) -> dict[str, list[int]]:
    # Lightning writes its `epoch` scalar with every write of the step, so it repeats by design.
    return {tag: [s for s, n in collections.Counter(s for s, _ in pairs).items() if n > 1]
            for tag, pairs in series.items() if tag != "epoch"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of RUN."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = cli([*RUN, "hydra.run.dir=run"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = scalar_series(resumed), scalar_series(reference)
    assert {t: s for t, s in duplicated_steps(got).items() if s} == {}
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], f"{tag}: resumed {got[tag][:8]} ... vs uninterrupted {want[tag][:8]} ..."
    # The monitor's export continues across the resume, row for row.
    if (reference / "grad_stats.json").exists() or (resumed / "grad_stats.json").exists():
        assert json.loads((resumed / "grad_stats.json").read_text()) == json.loads((reference / "grad_stats.json").read_text())


# ---------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at,kill_step",
    [
        ("save", 4),  # right after a mid-epoch checkpoint, before its step's metrics are written
        ("start", 9),  # mid-epoch 1, three steps after the last checkpoint: they are redone
        ("start", 7),  # early in epoch 1: last.ckpt is epoch 0's end, whose epoch means must not carry over
        ("start", 1),  # before the first checkpoint: the run starts over in its directory
    ],
)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(reference, tmp_path, kill_at, kill_step):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run_dir = tmp_path / "run"
    proc = cli([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, {"KILL_AT": kill_at, "KILL_STEP": str(kill_step)}, killer)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() == (kill_step >= 2)

    # The directory name holds '=' and ','; resume= takes it as it is.
    proc = cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, reference)
    # The run's own config stays in .hydra/; the resume's Hydra files go below it.
    assert (run_dir / ".hydra" / "config.yaml").read_text() == (reference / ".hydra" / "config.yaml").read_text()
    assert list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert [r["from_step"] for r in info["resumes"]] == [None if kill_step < 2 else kill_step - kill_step % 2]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_resumes_exactly(reference, tmp_path):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run_dir = tmp_path / "run"
    env = {"KILL_AT": "start", "KILL_STEP": "3", "KILL_SIGNAL": "SIGTERM"}
    proc = cli([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, env, killer)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Interrupted:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"resume={run_dir}" in lines[0]
    # Stopped at the end of the step during which the signal came (step 3 -> 4 steps done).
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 4
    assert max(s for s, _ in scalar_series(run_dir)["train/loss"]) == 3

    proc = cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_checkpoint_written_before_last_checkpoint_held_pending_metrics_resumes_exactly(tmp_path):
    """Checkpoints of earlier versions kept the metrics Lightning writes after the checkpoint in
    RunState's state, and LastCheckpoint had none: a resume from one still writes them. With
    monitor=off, where Lightning itself logs the per-step loss (with the monitor on, the monitor
    writes it and nothing is pending)."""
    run = [*RUN, "monitor=off"]
    reference = tmp_path / "reference"
    proc = cli([*run, f"hydra.run.dir={reference}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run_dir = tmp_path / "run"
    proc = cli([*run, f"hydra.run.dir={run_dir}"], tmp_path, {"KILL_AT": "save", "KILL_STEP": "4"}, killer)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    (last,) = [k for k in ckpt["callbacks"] if k.startswith("LastCheckpoint")]
    pending = ckpt["callbacks"].pop(last)["pending"]
    assert pending and "train/loss" in pending["metrics"]  # the case: step 4's metrics are not in the log yet
    ckpt["callbacks"][STATE_KEY]["pending"] = pending
    torch.save(ckpt, path)

    proc = cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, reference)


# The same run with DDP on the CPU (gloo): 2 processes x batch 16, 6 steps per epoch. The
# synthetic data set uses a bare shuffled DataLoader, into which Lightning puts its own
# DistributedSampler: the case the resume wrapper must not lose.
DDP_RUN = [*RUN, "trainer=ddp", "trainer.devices=2", "dataset.num_train=192"]


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    proc = cli([*DDP_RUN, f"hydra.run.dir={reference}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [s for s, _ in scalar_series(reference)["train/loss"]]
    assert steps == list(range(12))  # 2 epochs of 6 steps: each rank saw half of each epoch

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run_dir = tmp_path / "run"
    env = {"KILL_AT": "save", "KILL_STEP": "4", "KILL_KEEP_ARGV0": "1"}  # mid-epoch 0, both ranks
    proc = cli([*DDP_RUN, f"hydra.run.dir={run_dir}"], tmp_path, env, killer)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, mmap=True)["global_step"] == 4

    proc = cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_readme_resume_commands(reference, tmp_path):
    """README: `resume=$RUN` of a finished run changes nothing; `resume=$RUN trainer.max_epochs=N`
    trains it on, in the same run, each step once."""
    import shutil

    run_dir = tmp_path / "logs" / "default" / "dataset.batch_size=16,trainer.max_epochs=2" / "2025-01-01_00-00-00_000001"
    shutil.copytree(reference, run_dir)
    proc = cli([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert scalar_series(run_dir) == scalar_series(reference)

    proc = cli([f"resume={run_dir}", "trainer.max_epochs=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = scalar_series(run_dir), scalar_series(reference)
    assert {t: s for t, s in duplicated_steps(got).items() if s} == {}
    assert [s for s, _ in got["train/loss"]] == list(range(18))
    assert got["train/loss"][:12] == want["train/loss"]
    assert [s for s, _ in got["val/acc"]] == [5, 11, 17]


class SignalAt(Callback):
    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig, self.sent = step, sig, False

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_last_ckpt_and_restores_handlers(tmp_path, monkeypatch, caplog, sig):
    import skipstudy.train as T

    build = T.checkpoint_callbacks
    monkeypatch.setattr(T, "checkpoint_callbacks", lambda *a, **k: [SignalAt(2, sig), *build(*a, **k)])
    cfg = compose_cfg([*FAST, "trainer.limit_train_batches=5", "monitor=off"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(stopping.Interrupted) as info:
        train(cfg, run_dir)
    assert info.value.exit_code == 128 + sig
    assert info.value.step == 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert ckpt["global_step"] == 3
    assert {s: signal.getsignal(s) for s in before} == before
    # Lightning keeps the training loader's state (the epoch's RNG states) with its loops; a
    # mid-epoch checkpoint without it (another tool's) resumes with a warning.
    (loader_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert set(loader_state["epoch_rng"]) >= {"torch", "numpy", "python"}
    caplog.clear()
    caplog.set_level(logging.WARNING, "skipstudy.runs.resume")
    RunState(run_dir).on_load_checkpoint(None, None, ckpt)
    assert "data position" not in caplog.text
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    RunState(run_dir).on_load_checkpoint(None, None, ckpt)
    assert "without the data position" in caplog.text


def test_signal_under_gradient_accumulation_stops_after_a_step_not_mid_accumulation(tmp_path, monkeypatch):
    import skipstudy.train as T

    build = T.checkpoint_callbacks
    monkeypatch.setattr(T, "checkpoint_callbacks", lambda *a, **k: [SignalAt(2, signal.SIGTERM), *build(*a, **k)])
    cfg = compose_cfg([*FAST, "trainer.limit_train_batches=8", "dataset.num_train=160",
                       "trainer.accumulate_grad_batches=2", "monitor=off"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    with pytest.raises(stopping.Interrupted) as info:
        train(cfg, run_dir)
    # The signal comes before batch 4, which only accumulates; batch 5 steps, then it stops.
    assert info.value.step == 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert ckpt["global_step"] == 3
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 6  # of 8


class SignalAtTrainStart(Callback):
    """SIGTERM after Lightning installed its handler and before skipstudy's (callbacks run before
    the checkpoint callbacks): what a preemption during set-up meets."""

    def on_train_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_set_up_stops_before_training(tmp_path, monkeypatch):
    import skipstudy.train as T

    build = T.checkpoint_callbacks
    monkeypatch.setattr(T, "checkpoint_callbacks", lambda *a, **k: [SignalAtTrainStart(), *build(*a, **k)])
    cfg = compose_cfg([*FAST, "monitor=off"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    with pytest.raises(stopping.Interrupted, match=rf"SIGTERM received: stopped after step 0; no checkpoint yet.*"
                                                   rf"resume={run_dir}") as info:
        train(cfg, run_dir)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "train/loss" not in scalar_series(run_dir)  # not a step trained


# ---------------------------------------------------------------------------- reproducibility


@pytest.mark.slow  # three trainings
def test_same_command_and_seed_give_bitwise_identical_metrics(tmp_path):
    overrides = [*FAST, "trainer.limit_train_batches=4", "optimizer=adam"]
    series = []
    for name in ("a", "b"):
        cfg = compose_cfg(overrides, tmp_path / name)
        train(cfg, cfg.hydra.runtime.output_dir)
        series.append(scalar_series(Path(cfg.hydra.runtime.output_dir)))
    assert series[0]["train/loss"] and series[0] == series[1]
    # A different seed changes them (the comparison can fail).
    cfg = compose_cfg([*overrides, "seed=1"], tmp_path / "c")
    train(cfg, cfg.hydra.runtime.output_dir)
    assert scalar_series(Path(cfg.hydra.runtime.output_dir))["train/loss"] != series[0]["train/loss"]


@pytest.mark.gpu
def test_deterministic_gpu_runs_are_identical(tmp_path):
    overrides = [*FAST, "trainer.accelerator=gpu", "trainer.deterministic=true", "trainer.limit_train_batches=4",
                 "model=cifar_resnet", "model.depth=20", "dataset.batch_size=32"]
    series = []
    for name in ("a", "b"):
        cfg = compose_cfg(overrides, tmp_path / name)
        train(cfg, cfg.hydra.runtime.output_dir)  # monitor on: its histograms must run deterministically too
        series.append(scalar_series(Path(cfg.hydra.runtime.output_dir)))
    assert torch.are_deterministic_algorithms_enabled()
    assert series[0]["train/loss"] and series[0] == series[1]


@pytest.mark.gpu
def test_gpu_out_of_memory_names_the_batch_size(tmp_path):
    cfg = compose_cfg(["trainer.accelerator=gpu", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                       "trainer.limit_val_batches=0", "monitor=off", "model=resnet50", "dataset.image_size=224",
                       "dataset.num_train=4096", "dataset.num_val=8", "dataset.batch_size=4096"], tmp_path)
    with pytest.raises(ConfigError, match=r"GPU out of memory at dataset\.batch_size=4096.*dataset\.batch_size=2048"):
        train(cfg, cfg.hydra.runtime.output_dir)


# ---------------------------------------------------------------------------- divergence


DIVERGE = [*FAST, "trainer.limit_train_batches=6", "model.skip=false", "model.norm=none", "optimizer.lr=1e8"]


def test_divergence_stops_with_one_line_naming_step_and_layer(tmp_path):
    proc = cli([*DIVERGE, "monitor=off", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == stopping.EXIT_DIVERGED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "non-finite" in line]
    assert len(lines) == 1, proc.stderr
    step = int(lines[0].split("at step ")[1].split(",")[0])
    assert "first layer fc" in lines[0]  # monitor off: the non-finite gradient nearest the loss
    series = scalar_series(tmp_path / "run")
    # Marked in the metrics at the step it stopped, logs flushed up to it, nothing trained after.
    assert series["train/diverged"] == [(step, 1.0)]
    assert max(s for s, _ in series["train/loss"]) == step
    assert series["hparams/diverged"][-1][1] == 1.0


def test_divergence_with_the_monitor_names_its_first_layer(tmp_path):
    cfg = compose_cfg(DIVERGE, tmp_path)
    with pytest.raises(stopping.Diverged) as info:
        train(cfg, cfg.hydra.runtime.output_dir)
    from hydra.utils import instantiate

    net = instantiate(cfg.model, num_classes=10, in_channels=3)
    assert info.value.layer in dict(net.named_modules())
    assert f"step {info.value.step}, first layer {info.value.layer}" in str(info.value)


def test_on_nonfinite_warn_trains_on(tmp_path):
    cfg = compose_cfg([*DIVERGE, "monitor=off", "monitor.on_nonfinite=warn"], tmp_path)
    train(cfg, cfg.hydra.runtime.output_dir)  # no Diverged
    assert len(scalar_series(Path(cfg.hydra.runtime.output_dir))["train/loss"]) == 6


# ---------------------------------------------------------------------------- output safety


def test_a_new_run_never_writes_into_an_existing_run(tmp_path):
    cfg = compose_cfg([*FAST, "monitor=off"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    train(cfg, run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    sizes = {p.name: p.stat().st_size for p in run_dir.glob("events.out.tfevents.*")}
    with pytest.raises(ConfigError, match=r"already holds a run.*resume="):
        train(cfg, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert {p.name: p.stat().st_size for p in run_dir.glob("events.out.tfevents.*")} == sizes


def test_two_claims_on_one_directory_one_wins(tmp_path):
    dirs.claim(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run|just taken"):
        dirs.claim(tmp_path / "run")


@pytest.mark.slow
def test_two_jobs_started_together_get_different_directories(tmp_path):
    args = [PYTHON, "-m", "skipstudy.train", *FAST, "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
            "monitor=off"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    dirs = {p.parent for p in (tmp_path / "logs").rglob("run_info.json")}
    assert len(dirs) == 2


# ---------------------------------------------------------------------------- resume pieces


def fake_run(tmp_path: Path, overrides=()) -> Path:
    """A run directory as Hydra leaves it (config only), named like a real one."""
    cfg = compose_cfg([*FAST, *overrides], tmp_path)
    run_dir = tmp_path / "logs" / "default" / "model.skip=false,optimizer=adam" / "2025-01-01_00-00-00_000001"
    (run_dir / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(task, run_dir / ".hydra" / "config.yaml")
    return run_dir


def test_resume_reloads_the_runs_config_and_takes_only_harmless_overrides(tmp_path):
    run_dir = fake_run(tmp_path, ["model.skip=false", "optimizer=adam"])
    fresh = compose_cfg([f"resume='{run_dir}'"], tmp_path / "fresh")
    cfg = dirs.resume_config(fresh, [f"resume='{run_dir}'", "trainer.max_epochs=7", "+trainer.max_time=null"])
    assert cfg.model.skip is False and cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.trainer.max_epochs == 7 and cfg.resume == str(run_dir)
    for bad, key in (("model.skip=true", "model.skip"), ("optimizer=sgd", "optimizer"), ("seed=3", "seed")):
        with pytest.raises(ConfigError, match=rf"{key} would change what it trains.*drop resume="):
            dirs.resume_config(fresh, [bad])
    with pytest.raises(ConfigError, match="trainer.max_epoch is not a key"):
        config.check(dirs.resume_config(fresh, ["trainer.max_epoch=3"]))  # train() checks it first


def test_resume_refuses_what_is_not_a_run_directory(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    run_dir = fake_run(tmp_path / "inner")
    for value, problem in ((tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is a file"),
                           (tmp_path, "is not a run directory")):
        with pytest.raises(ConfigError, match=rf"resume={value}: {problem}"):
            dirs.check_run_dir(str(value))
    with pytest.raises(ConfigError, match=str(run_dir)):  # lists the run directories below it
        dirs.check_run_dir(str(tmp_path))
    assert dirs.check_run_dir(str(run_dir)) == run_dir.resolve()


def test_resume_argument_is_quoted_for_hydra():
    assert dirs.quote_path(["resume=logs/a/m=1,n=2/t", "x=1", "resume=null", "resume='q'"], "resume") == [
        "resume='logs/a/m=1,n=2/t'", "x=1", "resume=null", "resume='q'"]


def test_cut_logs_truncates_event_files_to_the_checkpoint(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(5):
        writer.add_scalar("train/loss", float(step), step)
    writer.flush()
    event_file = next(tmp_path.glob("events.out.tfevents.*"))
    sizes = {event_file.name: event_file.stat().st_size}
    for step in range(5, 9):  # written after the checkpoint
        writer.add_scalar("train/loss", float(step), step)
    writer.close()
    (tmp_path / "events.out.tfevents.999.host.1.0").write_bytes(event_file.read_bytes())  # a later resume's file
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 5, "callbacks": {STATE_KEY: {"event_files": sizes}}}, ckpt)

    assert cut_logs(tmp_path, ckpt) == 5
    assert scalar_series(tmp_path)["train/loss"] == [(s, float(s)) for s in range(5)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

    # A checkpoint without the record: events of its step and later are dropped instead.
    torch.save({"global_step": 3}, ckpt)
    assert cut_logs(tmp_path, ckpt) == 3
    assert scalar_series(tmp_path)["train/loss"] == [(s, float(s)) for s in range(3)]


def test_epoch_loader_replays_the_epoch_and_skips_done_batches():
    data = TensorDataset(torch.arange(40).float())
    torch.manual_seed(0)
    loader = EpochLoader(DataLoader(data, batch_size=4, shuffle=True), lambda: 3)
    full = [b[0].tolist() for b in loader]  # draws the shuffle from the global RNG
    state = loader.state_dict()  # what Lightning keeps in the checkpoint for a stateful loader
    after_epoch = torch.get_rng_state()

    # Resumed after 3 batches: same order, the first 3 batches skipped, global RNG untouched.
    torch.manual_seed(123)
    checkpoint_rng = rng_states()
    resumed = EpochLoader(DataLoader(data, batch_size=4, shuffle=True), lambda: 3)
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == full[3:]
    assert torch.equal(torch.get_rng_state(), checkpoint_rng["torch"])
    assert not torch.equal(after_epoch, checkpoint_rng["torch"])
    # The next pass is a new epoch, whole; so is a pass of a loader whose state was not restored.
    assert len([b for b in resumed]) == 10
    assert len([b for b in EpochLoader(DataLoader(data, batch_size=4, shuffle=True), lambda: 3)]) == 10


def test_training_batches_asked_for_mid_run_are_a_whole_epoch(tmp_path, monkeypatch):
    """A probe asking the data module for training batches mid-run gets the whole epoch: only the
    loader whose state Lightning restored skips the batches already done."""
    import skipstudy.train as T

    seen = []

    class AskForBatches(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            loader = trainer.datamodule.train_dataloader()
            seen.append(len(list(loader)))
            assert isinstance(trainer.train_dataloader, EpochLoader)
            assert trainer.fit_loop.epoch_loop.batch_progress.current.ready == 3  # skipped, were it restored

    build = T.checkpoint_callbacks
    monkeypatch.setattr(T, "checkpoint_callbacks", lambda *a, **k: [AskForBatches(), *build(*a, **k)])
    cfg = compose_cfg([*FAST, "monitor=off"], tmp_path)
    train(cfg, cfg.hydra.runtime.output_dir)
    assert seen == [6]  # 96 samples / 16, not limited and not skipped


def test_a_checkpoint_holds_every_logged_step_when_the_copies_land_late(tmp_path, monkeypatch):
    """As on a slow GPU: the monitor's copies (its statistics and the per-step train/loss) land
    only when waited for. A SIGTERM checkpoint at step 3 must still record event files that hold
    steps 0-2 of both, so a resume cut back to it keeps them (they are written before the sizes
    are taken)."""
    import skipstudy.train as T
    from skipstudy.monitor import taps as monitor_taps

    monkeypatch.setattr(monitor_taps.PendingStep, "ready", lambda self: False)
    build = T.checkpoint_callbacks
    monkeypatch.setattr(T, "checkpoint_callbacks", lambda *a, **k: [SignalAt(2, signal.SIGTERM), *build(*a, **k)])
    cfg = compose_cfg([*FAST, "trainer.limit_train_batches=5"], tmp_path)
    run_dir = Path(cfg.hydra.runtime.output_dir)
    with pytest.raises(stopping.Interrupted):
        train(cfg, run_dir)
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    assert cut_logs(cut, cut / "checkpoints" / "last.ckpt") == 3
    series = scalar_series(cut)
    for tag in ("train/loss", "train/acc", "train/lr", "grad_norm/total"):
        assert [s for s, _ in series[tag]] == [0, 1, 2], tag
