"""Per-block quantities (grad_split/*, spp/*) and grad_decay/slope against an independent
computation: autograd.grad through each block's branch and shortcut, re-run apart from the
monitor's aliases, and channel statistics of the retained tensors in float64."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skipstudy.models.blocks import BasicBlock, Block, Bottleneck, make_stage
from skipstudy.monitor import GradientFlowMonitor, LayerTaps
from skipstudy.monitor.layers import find_blocks

REL = 1e-5


class BlockNet(nn.Module):
    """Stem, two identity-shortcut BasicBlocks, a projection (B) BasicBlock, an option-A
    Bottleneck, classifier: every shortcut kind, and the plain twin with ``skip=False``."""

    def __init__(self, skip: bool = True, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = norm(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, 4, 4, 2, 1, skip, "B", norm)
        self.layer2 = make_stage(BasicBlock, 4, 8, 1, 2, skip, "B", norm)
        self.layer3 = make_stage(Bottleneck, 8, 2, 1, 2, skip, "A", norm)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class Lit(L.LightningModule):
    def __init__(self, net: nn.Module, factor: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.factor = factor

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y) * self.factor

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_data(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def fit(tmp_path, net, monitor, data=None, batch_size=4, factor=1.0, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=1, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    args.update(kw)
    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="", version=""), callbacks=[monitor], **args)
    data = data if data is not None else make_data()
    trainer.fit(Lit(net, factor), DataLoader(data, batch_size=batch_size))
    return trainer


def recorded(monitor, step=0) -> dict[str, float]:
    i = monitor.series.steps.index(step)
    return dict(zip(monitor.series.tags, monitor.series.rows[i].astype(float)))


def _branch(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The branch written out from the paper's equations (default init: no scalars)."""
    out = F.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = F.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


def _channel(t: torch.Tensor) -> tuple[float, float]:
    """(mean over channels of channel mean^2, mean over channels of channel variance), float64."""
    t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return t.mean(1).square().mean().item(), t.var(1, correction=0).mean().item()


def reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor, factor: float = 1.0) -> dict[str, float]:
    """Every per-block quantity and the slope, by hand on an out-of-place copy."""
    net = copy.deepcopy(net).train()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    blocks = {n: m for n, m in net.named_modules() if isinstance(m, Block)}
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    ins, outs, exits, louts = {}, {}, {}, {}
    hooks = []
    for n, m in blocks.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: ins.__setitem__(n, a[0])))
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o)))
        hooks.append(m.branch_norms()[-1].register_forward_hook(lambda mod, a, o, n=n: exits.__setitem__(n, o)))
    for n, m in layers.items():
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: louts.__setitem__(n, o)))
    loss = F.cross_entropy(net(x), y) * factor
    for h in hooks:
        h.remove()
    names = list(blocks)
    tensors = [ins[n] for n in names] + [outs[n] for n in names] + [exits[n] for n in names] + list(louts.values())
    grads = torch.autograd.grad(loss, tensors)
    B = len(names)
    g_in, g_out, g_exit, g_layer = grads[:B], grads[B : 2 * B], grads[2 * B : 3 * B], grads[3 * B :]
    ref: dict[str, float] = {}
    for i, n in enumerate(names):
        block = copy.deepcopy(blocks[n])
        xr = ins[n].detach().requires_grad_()
        # dL/ds is the gradient at the branch's end (the addition passes it on unchanged).
        b = torch.autograd.grad(_branch(block, xr), xr, g_exit[i])[0].double()
        if block.shortcut is not None:
            s = torch.autograd.grad(block.shortcut(xr), xr, g_exit[i])[0].double()
            assert torch.allclose(s + b, g_in[i].double(), rtol=1e-5, atol=1e-6 * g_in[i].abs().max().item())
            ref[f"grad_split/shortcut/{n}"] = s.norm().item()
            ref[f"grad_split/ratio/{n}"] = (s.norm() / b.norm()).item()
            ref[f"grad_split/cos/{n}"] = (torch.dot(s.flatten(), b.flatten()) / (s.norm() * b.norm())).item()
        ref[f"grad_split/branch/{n}"] = b.norm().item()
        ref[f"spp/mean_sq/{n}"], ref[f"spp/var/{n}"] = _channel(outs[n].detach())
        ref[f"spp/branch_var/{n}"] = _channel(exits[n].detach())[1]
        mean_sq, var = _channel(g_out[i])
        ref[f"spp/grad_mean_rms/{n}"], ref[f"spp/grad_std/{n}"] = math.sqrt(mean_sq), math.sqrt(var)
        ref[f"spp/grad_branch_std/{n}"] = math.sqrt(_channel(g_exit[i])[1])
    rms = [g.double().norm().item() / math.sqrt(g.numel()) for g in g_layer]
    ref["grad_decay/slope"] = float(np.polyfit(np.arange(len(rms)), np.log10(rms), 1)[0])
    return ref


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = REL) -> None:
    """Relative error < rel; a squared channel mean is compared in units of the variance
    (BN outputs have channel means of zero up to rounding)."""

    def tol(tag: str) -> float:
        if "mean_sq" in tag:
            return rel * want[tag.replace("mean_sq", "var")]
        if "mean_rms" in tag:
            return rel * want[tag.replace("mean_rms", "std")]
        return 0.0

    bad = {k: (got.get(k), v) for k, v in want.items()
           if k not in got or not math.isclose(got[k], v, rel_tol=rel, abs_tol=tol(k))}
    assert not bad, f"{len(bad)} of {len(want)} values differ: {bad}"


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
@pytest.mark.parametrize("factor", [1.0, 1e-30, 1e30])
def test_split_spp_and_slope_match_autograd_at_every_magnitude(tmp_path, factor):
    """BN in train mode, every shortcut kind; the loss scaled so gradients are ~1e-30 (their
    squares underflow float32) and ~1e30 (their squares overflow it)."""
    torch.manual_seed(0)
    net = BlockNet()
    data = make_data()
    want = reference(net, data.tensors[0][:4], data.tensors[1][:4], factor)
    monitor = GradientFlowMonitor(on_nonfinite="warn")
    fit(tmp_path, net, monitor, data=data, factor=factor)
    got = recorded(monitor)
    if factor != 1.0:
        # grad_decay/slope comes from grad_rms/output, whose float32 norms are not yet robust at
        # these magnitudes; the block quantities are.
        want.pop("grad_decay/slope")
    assert_close(got, want)
    assert monitor.taps.block_names == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]
    if factor == 1.0:
        # The split adds up: ||s + b||^2 = ||s||^2 + ||b||^2 + 2 cos ||s|| ||b||, the input gradient.
        for n in monitor.taps.block_names:
            s, b, c = got[f"grad_split/shortcut/{n}"], got[f"grad_split/branch/{n}"], got[f"grad_split/cos/{n}"]
            assert math.isclose(got[f"grad_split/ratio/{n}"], s / b, rel_tol=1e-6)
            assert -1 <= c <= 1
        assert got["grad_decay/slope"] > 0  # gradients grow towards the loss at init


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_plain_blocks_have_only_the_branch_part(tmp_path):
    """A plain twin's blocks: branch norms and spp are written; shortcut, ratio and cos are
    absent from TensorBoard and null in grad_stats.json, never zeros."""
    torch.manual_seed(0)
    net = BlockNet(skip=False)
    data = make_data()
    want = reference(net, data.tensors[0][:4], data.tensors[1][:4])
    monitor = GradientFlowMonitor()
    fit(tmp_path, net, monitor, data=data, max_steps=2)
    assert_close(recorded(monitor), want)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert "grad_split/branch/layer2.0" in scalars and "spp/branch_var/layer3.0" in scalars
    assert not any(t.startswith(("grad_split/shortcut/", "grad_split/ratio/", "grad_split/cos/")) for t in scalars)
    assert "grad_decay/slope" in scalars
    assert "figures/signal_propagation" in acc.Tags()["images"]
    assert (tmp_path / "figures" / "signal_propagation_epoch0.png").is_file()
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    assert doc["blocks"] == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]
    assert doc["series"]["grad_split/cos/layer1.0"] == [None, None]
    assert all(v is not None for v in doc["series"]["grad_split/branch/layer1.0"])


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    """Without BN two micro-batches of 4 are the loss of one batch of 8: the split's norms and
    cosine, and the channel statistics, are those of the whole batch."""
    torch.manual_seed(0)
    net = BlockNet(norm=lambda c: nn.Identity())
    data = make_data(16)
    want = reference(net, data.tensors[0][:8], data.tensors[1][:8])
    want = {k: v for k, v in want.items() if "branch_var" not in k}  # the branch exit is an Identity here
    monitor = GradientFlowMonitor()
    fit(tmp_path, net, monitor, data=data, max_steps=1, accumulate_grad_batches=2)
    assert_close(recorded(monitor), want)


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_layer_taps_on_a_torchvision_resnet_in_a_plain_loop():
    """torchvision's blocks (downsample=None is identity) through LayerTaps, no Lightning:
    the parts add up to the block's input gradient from autograd."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    taps = LayerTaps(model)
    assert [b.has_shortcut for b in find_blocks(model)] == [True] * 8
    grads = {}
    # The block's input gradient from autograd itself, in the same (single) backward pass.
    hook = model.layer2[1].register_forward_pre_hook(
        lambda m, a: a[0].register_hook(lambda g: grads.__setitem__("x", g)) and None)
    with taps.record(step=0):
        F.cross_entropy(model(x), y).backward()
    hook.remove()
    g_in = grads["x"]
    v = taps.values
    s, b, c = v["grad_split/shortcut/layer2.1"], v["grad_split/branch/layer2.1"], v["grad_split/cos/layer2.1"]
    total = g_in.double().norm().item()
    assert math.isclose(math.sqrt(s * s + b * b + 2 * c * s * b), total, rel_tol=1e-5)
    assert "grad_norm/weight/layer4.1.conv2" in v and len([k for k in v if k.startswith("grad_split/cos/")]) == 8
    taps.remove()
    assert not model.layer1[0]._forward_pre_hooks and not model.conv1._forward_hooks


@pytest.mark.slow
def test_compiled_network_records_the_block_quantities_of_eager(tmp_path):
    """torch.compile: the block hooks run at graph breaks on the real tensors, so step 0
    equals the hand computation and later steps equal an eager run's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = BlockNet()
    data = make_data(12)
    want = reference(net, data.tensors[0][:4], data.tensors[1][:4])
    eager_net = copy.deepcopy(net)
    monitor = GradientFlowMonitor(hist_every_n_epochs=0)
    eager = GradientFlowMonitor(hist_every_n_epochs=0)
    try:
        fit(tmp_path / "compiled", torch.compile(net, backend="aot_eager"), monitor, data=data, max_steps=2)
        fit(tmp_path / "eager", eager_net, eager, data=data, max_steps=2)
        assert_close(recorded(monitor, 0), want)
        assert_close(recorded(monitor, 1), recorded(eager, 1), rel=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_amp_block_quantities_close_to_fp32(tmp_path, precision):
    """bf16 autocast, and fp16 with a GradScaler at scale 2**10: gradients are in units of the
    loss (the scale divided out) and close to fp32."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = make_data()
    runs = {}
    for p in ("32-true", precision):
        torch.manual_seed(0)
        monitor = GradientFlowMonitor()
        kw = {"precision": p}
        if p == "16-mixed":
            kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]}
        fit(tmp_path / p, BlockNet(), monitor, data=data, **kw)
        runs[p] = recorded(monitor)
    fp32, amp = runs["32-true"], runs[precision]
    for tag in fp32:
        if tag.startswith(("grad_split/shortcut", "grad_split/branch", "spp/var", "spp/grad_std", "spp/grad_branch_std")):
            assert math.isclose(amp[tag], fp32[tag], rel_tol=5e-2), (tag, amp[tag], fp32[tag])


DDP_SCRIPT = r"""
import json, sys
from pathlib import Path
import lightning as L, torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, sys.argv[2])
from test_monitor_blocks import BlockNet, make_data
from skipstudy.monitor import GradientFlowMonitor
import torch.nn.functional as F

class Lit(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.first = None
    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if self.first is None:
            self.first = idx.tolist()
        return F.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

out = Path(sys.argv[1])
torch.manual_seed(0)
net = BlockNet()
torch.save(net.state_dict(), out / "init.pt")
x, y = make_data().tensors
monitor = GradientFlowMonitor()
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=1, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False,
                    logger=TensorBoardLogger(str(out / "run"), name="", version=""), callbacks=[monitor])
lit = Lit(net)
trainer.fit(lit, DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=2))
row = dict(zip(monitor.series.tags, monitor.series.rows[0].tolist())) if monitor.series is not None else None
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"first": lit.first, "row": row}))
"""


@pytest.mark.slow
def test_ddp_two_processes_sum_the_block_quantities_over_the_global_batch(tmp_path):
    """DDP (gloo, 2 processes, BN per process): the split's squared norms and dot products add
    over the ranks (the global batch), and DDP's averaging halves the gradients."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "ddp.py", str(tmp_path), str(Path(__file__).parent)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    got = ranks[0]["row"]
    net = BlockNet()
    net.load_state_dict(torch.load(tmp_path / "init.pt"))
    x, y = make_data().tensors
    refs = [reference(net, x[r["first"]], y[r["first"]]) for r in ranks]
    want = {}
    for n in ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]:
        s = [ref[f"grad_split/shortcut/{n}"] for ref in refs]
        b = [ref[f"grad_split/branch/{n}"] for ref in refs]
        dot = sum(ref[f"grad_split/cos/{n}"] * si * bi for ref, si, bi in zip(refs, s, b))
        want[f"grad_split/shortcut/{n}"] = math.hypot(*s) / 2
        want[f"grad_split/branch/{n}"] = math.hypot(*b) / 2
        want[f"grad_split/cos/{n}"] = dot / (math.hypot(*s) * math.hypot(*b))
    assert_close(got, want, rel=1e-5)
