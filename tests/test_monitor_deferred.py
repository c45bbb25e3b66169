"""Recorded values read a step late, as on a GPU (where the copy to the host lands while the
next step runs): the same numbers as read at once, the non-finite stop one step late but naming
the step and layer where it started, and no update with a non-finite gradient applied.

On the CPU the values are there at once; ``late`` makes every recorded step's copy "land" only
when the next optimizer step starts, which runs the callback's deferred path exactly as a GPU
does. The GPU test itself (no sync inside a step) is tests/test_monitor_gpu.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from skipstudy.monitor import GradientFlowMonitor
from skipstudy.monitor import taps as monitor_taps
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
