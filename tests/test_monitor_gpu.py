"""On a CUDA GPU: no host-device sync inside a training step from the monitor or skipstudy's
logging (``torch.cuda.set_sync_debug_mode("error")`` raises on any), the float64 reductions
exact over float32's range there too, and the monitor's values on the GPU equal the CPU's.
Skipped without a GPU (tests/conftest.py); ``scripts/gpu_check.sh`` runs them with the GPU
benchmarks."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from skipstudy import models
from skipstudy.monitor import GradientFlowMonitor, LayerTaps
from skipstudy.monitor.sums import activation_sums, channel_sums, norm64, output_grad_sums
from skipstudy.runs.module import LitClassifier

pytestmark = pytest.mark.gpu


@pytest.fixture
def exact_convs():
    """cuDNN's TF32 convolutions would differ from the CPU's by ~1e-3: off for comparisons."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_float64_reductions_on_cuda_are_exact_over_float32s_range(dtype, magnitude):
    g = torch.Generator().manual_seed(0)
    t = ((torch.randn(16, 8, 12, 12, generator=g, dtype=torch.float64) + 0.5) * magnitude).to(dtype)
    t = t.contiguous(memory_format=torch.channels_last)
    ref = t.double()
    assert math.isclose(float(norm64(t.cuda())), float(ref.norm()), rel_tol=1e-12)
    assert math.isclose(float(output_grad_sums(t.cuda())[1]), float(ref.square().sum()), rel_tol=1e-12)
    n, s1, m2, q, nz = activation_sums(t.cuda()).tolist()
    assert math.isclose(s1, float(ref.sum()), rel_tol=1e-12)
    assert math.isclose(m2, float((ref - ref.mean()).square().sum()), rel_tol=1e-10)
    assert nz == float((ref != 0).sum())
    c = channel_sums(t.cuda()).cpu()
    assert torch.allclose(c[3:], ref.sum(dim=(0, 2, 3)), rtol=1e-12, atol=0)


def test_a_recorded_step_issues_no_sync_and_equals_the_cpu(exact_convs):
    """Three steps of a CIFAR ResNet-20 (channels_last) through LayerTaps under sync debug mode
    "error", each step's values read after the next step was queued; the first step's values
    against the same step on the CPU."""
    torch.manual_seed(0)
    cpu_net = models.cifar_resnet(10, depth=20).train()
    net = models.cifar_resnet(10, depth=20).train()
    net.load_state_dict(cpu_net.state_dict())
    net = net.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    cpu_taps = LayerTaps(cpu_net)
    with cpu_taps.record(0):
        F.cross_entropy(cpu_net(x), y).backward()
    taps = LayerTaps(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xc, yc = x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()
    pending = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            taps.arm()
            F.cross_entropy(net(xc), yc).backward()
            p = taps.pack(list(net.parameters()))
            p.step = step
            pending.append(p)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    values = [p.read()[0] for p in pending]
    assert set(values[0]) == set(cpu_taps.values)
    # The devices' convolutions (and the layouts') round differently: gradients agree to ~1e-4,
    # quantities that are differences of such (a cosine, channel means) to a small absolute error.
    bad = {tag: (values[0][tag], want) for tag, want in cpu_taps.values.items()
           if not math.isclose(values[0][tag], want, rel_tol=2e-3, abs_tol=1e-4)}
    assert not bad, bad
    assert values[1] != values[0]  # later steps are their own


class SyncGuard(Callback):
    """Sync debug mode "error" from the start of the first training step to the epoch's end, so
    what runs between steps (Lightning's logging of each step's metrics after
    ``on_train_batch_end``, the next batch) is covered too. Put it before the monitor: its
    epoch-end hook turns the mode off before the monitor's waits for the last copies."""

    steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        SyncGuard.steps += 1

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("log_every_n_steps", [1, 50])
@pytest.mark.parametrize("on_nonfinite", ["stop", "warn"])
def test_training_with_the_monitor_at_its_defaults_has_no_sync_in_a_step(tmp_path, on_nonfinite, log_every_n_steps):
    """A real Trainer, bf16, LitClassifier with SGD as shipped (fused=null: fused on CUDA, a device-side found_inf for the stop),
    the monitor at its defaults (every layer every step, activations, blocks, a histogram step),
    batches already on the GPU, log_every_n_steps=1 (shipped: the per-step loss, accuracy and
    learning rate go through the monitor's deferred copy) and 50: no sync from the start of the
    first step to the epoch's end, the monitor recorded every step, and train/loss is in the
    event file at every logged step."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (64,), generator=g).cuda())
    net = models.cifar_resnet(10, depth=20)
    lit = LitClassifier(net, 10, partial(torch.optim.SGD, lr=0.05, momentum=0.9, fused=None), channels_last=True)
    monitor = GradientFlowMonitor(on_nonfinite=on_nonfinite)
    SyncGuard.steps = 0
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6,
                        log_every_n_steps=log_every_n_steps, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[SyncGuard(), monitor])
    trainer.fit(lit, DataLoader(data, batch_size=8))
    assert trainer.optimizers[0].defaults["fused"] is True  # optimizer.fused=null chose it on CUDA
    assert SyncGuard.steps == 6
    assert monitor.series.steps == list(range(6))
    assert all(math.isfinite(v) for v in monitor.series.rows[-1][:10])
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    losses = acc.Scalars("train/loss") if "train/loss" in acc.Tags()["scalars"] else []
    assert [e.step for e in losses] == (list(range(6)) if log_every_n_steps == 1 else [])


@pytest.mark.parametrize("schedule", [dict(every_n_steps=5), None], ids=["sparse", "monitor_off"])
def test_the_divergence_guard_on_unrecorded_steps_adds_no_sync(tmp_path, schedule):
    """The steps the monitor does not record (1-4 with every_n_steps=5; all with monitor=off) are
    the divergence guard's: its flags go to the host without blocking and the fused SGD (shipped
    fused=null) gets a device-side found_inf, so no step syncs. log_every_n_steps=50 keeps
    Lightning's own per-step logging (monitor=off) out of the six steps."""
    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (64,), generator=g).cuda())
    net = models.cifar_resnet(10, depth=20)
    lit = LitClassifier(net, 10, partial(torch.optim.SGD, lr=0.05, momentum=0.9, fused=None), channels_last=True)
    monitor = GradientFlowMonitor(hist_every_n_epochs=0, **schedule) if schedule is not None else None
    guard = DivergenceGuard("stop", monitor)
    SyncGuard.steps = 0
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, log_every_n_steps=50,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[SyncGuard(), guard] + ([monitor] if monitor is not None else []))
    trainer.fit(lit, DataLoader(data, batch_size=8))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert SyncGuard.steps == 6 and trainer.global_step == 6
    assert guard.verdict is None and guard.nonfinite_steps == []
