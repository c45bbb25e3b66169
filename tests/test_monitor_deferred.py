"""Recorded values read a step late, as on a GPU (where the copy to the host lands while the
next step runs): the same numbers as read at once, the non-finite stop one step late but naming
the step and layer where it started, and no update with a non-finite gradient applied.

On the CPU the values are there at once; ``late`` makes every recorded step's copy "land" only
when the next optimizer step starts, which runs the callback's deferred path exactly as a GPU
does. The GPU test itself (no sync inside a step) is tests/test_monitor_gpu.py."""

from __future__ import annotations

import json
import logging
from functools import partial

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from skipstudy.monitor import GradientFlowMonitor
from skipstudy.monitor import taps as monitor_taps
from skipstudy.runs.module import LitClassifier
from conftest import force_accelerator_path
from test_monitor import ArmAt, Lit, PoisonGrad, TinyNet, events, fit, make_data


class StepClock(Callback):
    """The running optimizer step, for ``late``."""

    now = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepClock.now = trainer.global_step


@pytest.fixture
def late(monkeypatch):
    """A recorded step's values reach the host when the next step starts, not before."""
    monkeypatch.setattr(monitor_taps.PendingStep, "ready", lambda self: self.step < StepClock.now)
    StepClock.now = 0
    return StepClock()


def run(tmp_path, clock=None, **kw):
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(**kw)
    fit(tmp_path, TinyNet(), monitor, data=make_data(32), max_steps=5, callbacks=[clock] if clock else [])
    return monitor


def test_values_read_a_step_late_equal_the_values_read_at_once(tmp_path, late):
    at_once = run(tmp_path / "now", hist_every_n_epochs=1)
    deferred = run(tmp_path / "late", late, hist_every_n_epochs=1)
    assert deferred.series.steps == at_once.series.steps == [0, 1, 2, 3, 4]
    assert deferred.series.tags == at_once.series.tags
    for a, b in zip(at_once.series.rows, deferred.series.rows):
        assert np.array_equal(a, b, equal_nan=True)  # bitwise: the same sums, only read later
    for tag in ("grad_norm/output/conv2", "act/std/conv1", "grad_norm/total"):
        now = [(e.step, e.value) for e in events(tmp_path / "now").Scalars(tag)]
        assert [(e.step, e.value) for e in events(tmp_path / "late").Scalars(tag)] == now
    hist = events(tmp_path / "late").Histograms("grad_hist/output/conv1")
    assert [h.step for h in hist] == [0] and hist[0].histogram_value.num > 0


class FailAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("failed at the start of a step")


def test_a_failed_run_keeps_the_steps_whose_values_had_landed(tmp_path, late):
    """Read late (as on a GPU), step 2's values land as step 3 starts and fails: they are a whole
    step's and are written. (on_nonfinite=warn: stop would read each step before its update.)"""
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(on_nonfinite="warn")
    with pytest.raises(RuntimeError, match="failed at the start"):
        fit(tmp_path, TinyNet(), monitor, data=make_data(32), max_steps=6, callbacks=[late, FailAt(3)])
    assert monitor.series.steps == [0, 1, 2]
    assert [e.step for e in events(tmp_path).Scalars("grad_norm/total")] == [0, 1, 2]


class FusedLit(Lit):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, fused=True)


@pytest.mark.parametrize("fused", [True, False])
def test_a_late_stop_names_the_step_and_layer_and_applies_no_poisoned_update(tmp_path, late, caplog, fused, monkeypatch):
    """NaN enters the backward pass at step 2. Read late, the monitor learns it at step 3: it
    names step 2 and conv2 and stops there. A fused optimizer skipped step 2's update itself
    (device-side found_inf); any other optimizer had the values read before its update. Either
    way the weights are those before step 2."""
    import test_monitor

    if fused:
        monkeypatch.setattr(test_monitor, "Lit", FusedLit)
    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    monitor = GradientFlowMonitor()
    with caplog.at_level(logging.ERROR, logger="skipstudy.monitor.callback"):
        trainer = test_monitor.fit(tmp_path, net, monitor, data=make_data(32), max_steps=6, callbacks=[late, arm])
    assert bool(trainer.optimizers[0].defaults["fused"]) is fused
    assert monitor.diverged_at == (2, "conv2")
    assert any(r.getMessage().startswith("non-finite gradient at step 2, first layer conv2") for r in caplog.records)
    # fused: read one step late, at step 3, whose update is dropped too; else read at step 2
    assert trainer.global_step == (4 if fused else 3)
    for before, after in zip(arm.params_before, trainer.lightning_module.parameters()):
        assert torch.equal(before, after)
    assert not hasattr(trainer.optimizers[0], "found_inf")  # no flag left for a later update
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    assert doc["diverged_at"] == {"step": 2, "layer": "conv2"} and doc["nonfinite_steps"] == [2]
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("train/diverged")] == [(2, 1.0)]


@pytest.mark.parametrize("schedule", [None, dict(every_n_steps=5, hist_every_n_epochs=0)], ids=["monitor_off", "sparse"])
@pytest.mark.parametrize("fused", [True, False])
def test_the_divergence_guard_read_late_stops_at_the_step_and_layer_and_applies_no_poisoned_update(
        tmp_path, late, caplog, fused, schedule):
    """The steps the monitor does not record (all with monitor=off; 1-4 of every 5th): the guard's
    flags read a step late, as on a GPU. A fused optimizer skipped step 2's update itself
    (device-side found_inf) and the stop comes at step 3, naming step 2 and conv2; any other
    optimizer had the flags read before its update. Either way the weights are those before step 2
    and train/diverged is written at step 2."""
    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    monitor = GradientFlowMonitor(**schedule) if schedule is not None else None
    guard = DivergenceGuard("stop", monitor)
    lit = (FusedLit if fused else Lit)(net)
    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="", version=""), accelerator="cpu", devices=1,
                        max_steps=6, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, log_every_n_steps=1,
                        callbacks=[late, arm, guard] + ([monitor] if monitor is not None else []))
    if monitor is not None:
        monitor.resolve(net)
    with caplog.at_level(logging.ERROR, logger="skipstudy.runs.stopping"):
        trainer.fit(lit, DataLoader(make_data(32), batch_size=4))
    assert bool(trainer.optimizers[0].defaults["fused"]) is fused
    assert guard.verdict == (2, "conv2") and guard.nonfinite_steps == [2]
    assert any(r.getMessage().startswith("non-finite gradient at step 2, first layer conv2") for r in caplog.records)
    assert trainer.global_step == (4 if fused else 3)  # fused: step 3's update dropped as well
    for before, after in zip(arm.params_before, lit.parameters()):
        assert torch.equal(before, after)
    assert not hasattr(trainer.optimizers[0], "found_inf")  # no flag left for a later update
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("train/diverged")] == [(2, 1.0)]


def test_the_divergence_guard_flags_read_late_reach_the_end_of_training(tmp_path, late):
    """NaN at the last step: its flags, read late, are read when training ends, and the run is
    marked diverged there (the fused kernel skipped the update)."""
    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(3, lambda net: setattr(poison, "armed", True))
    guard = DivergenceGuard("stop", None)
    lit = FusedLit(net)
    trainer = L.Trainer(logger=False, accelerator="cpu", devices=1, max_steps=4, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[late, arm, guard])
    trainer.fit(lit, DataLoader(make_data(32), batch_size=4))
    assert guard.verdict == (3, "conv2") and trainer.global_step == 4
    for before, after in zip(arm.params_before, lit.parameters()):
        assert torch.equal(before, after)


def test_a_checkpoint_reads_the_divergence_guards_flags_first(tmp_path, late):
    """A checkpoint after step 2 (NaN, fused SGD, flags read late) reads the step's flags before
    it is written: the stop comes there, and last.ckpt holds the weights before step 2."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    guard = DivergenceGuard("stop", None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(logger=False, accelerator="cpu", devices=1, max_steps=6, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[late, arm, guard, ckpt])
    lit = FusedLit(net)
    trainer.fit(lit, DataLoader(make_data(32), batch_size=4))
    assert guard.verdict == (2, "conv2") and trainer.global_step == 3
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for before, (name, _) in zip(arm.params_before, lit.named_parameters()):
        assert torch.equal(before, last[name]), name


# ----------------------------------------------------------------------------- LitClassifier's per-step scalars

STEP_TAGS = ("train/loss", "train/acc", "train/lr")


def train_classifier(run, monitor=None, callbacks=(), log_every: int = 1, progress_bar: bool = False) -> L.Trainer:
    """LitClassifier on TinyNet, 6 steps over two epochs (4 batches each), a learning rate that
    halves every step, TensorBoard and CSV loggers."""
    torch.manual_seed(0)
    net = TinyNet()
    lit = LitClassifier(net, 3, partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                        partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), scheduler_interval="step")
    if monitor is not None:
        monitor.resolve(net)
    loggers = [TensorBoardLogger(str(run), name="", version=""), CSVLogger(str(run), name="", version="")]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=log_every, logger=loggers,
                        enable_progress_bar=progress_bar, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[c for c in (monitor, *callbacks) if c is not None])
    trainer.fit(lit, DataLoader(make_data(16), batch_size=4))
    return trainer


def step_series(run) -> dict[str, list]:
    """Each per-step tag's (step, value) pairs from the event files (float32) and from the CSV
    (the Python floats the loggers got), plus the epoch tags; sorted, duplicates kept."""
    acc = events(run)
    out = {tag: sorted((e.step, e.value) for e in acc.Scalars(tag))
           for tag in (*STEP_TAGS, "epoch", "train/loss_epoch", "train/acc_epoch")}
    table = pd.read_csv(run / "metrics.csv")
    for tag in STEP_TAGS:
        rows = table[table[tag].notna()]
        out["csv " + tag] = sorted(zip(rows["step"].tolist(), rows[tag].tolist()))
    return out


@pytest.mark.parametrize("log_every", [1, 2])
def test_the_per_step_loss_accuracy_and_lr_reach_every_logger_as_with_the_monitor_off(tmp_path, late, log_every):
    """On the steps the monitor records, LitClassifier's train/loss, train/acc and train/lr go in
    the monitor's copy instead of through self.log: read at once, read a step late (as on a GPU),
    or every other step recorded, every logger gets the same values at the same steps, once
    each, as with the monitor off (bitwise: TensorBoard's float32 and the CSV's float64)."""
    off = train_classifier(tmp_path / "off", log_every=log_every)
    want = step_series(tmp_path / "off")
    logged = list(range(6)) if log_every == 1 else [1, 3, 5]
    for tag in STEP_TAGS:
        assert [s for s, _ in want[tag]] == logged, tag
    assert len(set(v for _, v in want["train/lr"])) == len(logged)  # the schedule moves it every step
    runs = {"at once": (GradientFlowMonitor(), ()), "late": (GradientFlowMonitor(), (late,)),
            "every other step": (GradientFlowMonitor(every_n_steps=2), ())}
    for name, (monitor, callbacks) in runs.items():
        trainer = train_classifier(tmp_path / name, monitor, callbacks, log_every=log_every)
        assert monitor.series.steps == ([0, 2, 4] if name == "every other step" else list(range(6)))
        got = step_series(tmp_path / name)
        for tag, series in want.items():
            assert got[tag] == series, (name, tag)
        for tag in STEP_TAGS:  # what trainer.fit leaves for callbacks and train() returns
            assert torch.equal(trainer.callback_metrics[tag], off.callback_metrics[tag]), (name, tag)


class HostReads(Callback):
    """``aten._local_scalar_dense`` calls (``.item()``, ``float(t)``, ``bool(t)``: a host-device
    sync each on a GPU) from each step's start to the next's, so Lightning's logging after
    ``on_train_batch_end`` is counted with its step."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self.per_step.append(0)
        target, counts = torch.ops.aten._local_scalar_dense.default, self.per_step

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[-1] += func is target
                return func(*args, **(kwargs or {}))

        self._mode = Count()
        self._mode.__enter__()

    def _close(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_train_epoch_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()


@pytest.mark.parametrize("monitor, reads", [(None, [3] * 6), ({}, [0] * 6), ({"every_n_steps": 2}, [0] * 6)])
def test_host_reads_per_step_through_lightnings_logging(tmp_path, monkeypatch, monitor, reads):
    """trainer.log_every_n_steps=1 (shipped) with the progress bar: with the monitor off Lightning
    reads the loss, accuracy and learning rate (3) every step; with it none, whether it records the
    step or not. The monitor's sums take their accelerator path (on the CPU they read CPU values,
    which is no sync). Printed for docs/benchmarks.md (pytest -s)."""
    force_accelerator_path(monkeypatch)
    count = HostReads()
    train_classifier(tmp_path, monitor if monitor is None else GradientFlowMonitor(**monitor), [count],
                     progress_bar=True)
    print(f"host reads per step, monitor={monitor}: {count.per_step}")
    assert count.per_step == reads
