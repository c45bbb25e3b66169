"""GradientFlowMonitor: every quantity against an independent autograd computation, through a
real Lightning Trainer on the CPU with tiny nets and deterministic batches."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.monitor import GradientFlowMonitor
from skipstudy.monitor import callback as monitor_callback
from skipstudy.monitor import taps as monitor_taps
from skipstudy.monitor.callback import on_log_schedule
from skipstudy.monitor.layers import select_layers

REL = 1e-5  # the bound on relative error against the independent computation


# ----------------------------------------------------------------------------- fixtures


class TinyNet(nn.Module):
    """conv1-bn1-relu (in place on the BN output), a residual block whose first conv is followed
    directly by an in-place ReLU (so conv2's own output is overwritten), and a classifier.
    ``fc`` is registered first so registration order differs from forward order."""

    def __init__(self, bn: bool = True, poison: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.poison = poison if poison is not None else nn.Identity()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.conv2(x))  # in place on conv2's output
        out = self.conv3(self.poison(out))
        out = self.relu(out + x)
        return self.fc(out.mean((2, 3)))


class Lit(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n: int = 16, seed: int = 0, size: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


def fit(tmp_path: Path, net: nn.Module, monitor: GradientFlowMonitor, data=None, batch_size: int = 4,
        val_data=None, callbacks=(), **trainer_kw) -> L.Trainer:
    data = data if data is not None else make_data()
    kw = dict(
        accelerator="cpu", devices=1, max_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    if val_data is None:
        kw["limit_val_batches"] = 0
    kw.update(trainer_kw)
    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path), name="", version=""),
                        callbacks=[monitor, *callbacks], **kw)
    monitor.resolve(net)
    val = DataLoader(val_data, batch_size=batch_size) if val_data is not None else None
    trainer.fit(Lit(net), DataLoader(data, batch_size=batch_size), val)
    return trainer


def recorded(monitor: GradientFlowMonitor, step: int) -> dict[str, float]:
    i = monitor.series.steps.index(step)
    return dict(zip(monitor.series.tags, monitor.series.rows[i].astype(float)))


def reference(net: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every quantity by hand: autograd.grad w.r.t. the retained outputs of an out-of-place copy
    (the gradient w.r.t. each output as the layer produced it), parameters' .grad for weights."""
    net = copy.deepcopy(net).train()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    modules = dict(net.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outputs[n].append(o)) for n in layers]
    loss = F.cross_entropy(net(x), y)
    for h in handles:
        h.remove()
    flat = [o for n in layers for o in outputs[n]]
    grads = iter(torch.autograd.grad(loss, flat, retain_graph=True))
    loss.backward()
    ref: dict[str, float] = {}
    for n in layers:
        g = torch.cat([next(grads).double().flatten() for _ in outputs[n]])
        a = torch.cat([o.detach().double().flatten() for o in outputs[n]])
        ref[f"grad_norm/output/{n}"] = g.norm().item()
        ref[f"grad_rms/output/{n}"] = (g.norm() / math.sqrt(g.numel())).item()
        ref[f"act/mean/{n}"] = a.mean().item()
        ref[f"act/std/{n}"] = a.std(correction=0).item()
        ref[f"act/zero_frac/{n}"] = (a == 0).double().mean().item()
        w = getattr(modules[n], "weight", None)
        if isinstance(w, nn.Parameter):
            ref[f"grad_norm/weight/{n}"] = w.grad.double().norm().item()
            ref[f"grad_rms/weight/{n}"] = (w.grad.double().norm() / math.sqrt(w.numel())).item()
    ref["grad_norm/total"] = torch.cat([p.grad.double().flatten() for p in net.parameters()]).norm().item()
    return ref


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = REL) -> None:
    """Relative error < ``rel``; a mean is compared in units of its std (a BN output's mean
    is zero up to rounding, where a relative error says nothing)."""

    def tol(tag: str) -> float:
        std = want.get(tag.replace("act/mean/", "act/std/"), 0.0) if tag.startswith("act/mean/") else 0.0
        return rel * std + 1e-12

    bad = {k: (got.get(k), v) for k, v in want.items()
           if k not in got or not math.isclose(got[k], v, rel_tol=rel, abs_tol=tol(k))}
    assert not bad, f"{len(bad)} of {len(want)} values differ: {bad}"


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------- quantities


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
@pytest.mark.parametrize("layers", [None, ["conv1", "bn1", "relu", "conv2", "conv3", "fc"]])
def test_every_quantity_matches_autograd(tmp_path, layers):
    """Step 0 through a real Trainer equals the hand computation, rel err < 1e-5, for conv/linear
    (default), a BN output that an in-place ReLU overwrites, and a ReLU module called twice."""
    torch.manual_seed(0)
    net = TinyNet()
    data = make_data()
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    names = layers or ["conv1", "conv2", "conv3", "fc"]
    want = reference(net, names, x, y)
    monitor = GradientFlowMonitor(layers=layers)
    fit(tmp_path, net, monitor, data=data)
    assert monitor.layer_names == names  # forward order, although fc is registered first
    assert_close(recorded(monitor, 0), want)
    got = recorded(monitor, 0)
    if layers:
        assert 0.2 < got["act/zero_frac/relu"] < 0.8  # post-ReLU outputs do have zeros
        assert "grad_norm/weight/relu" not in want and math.isnan(got["grad_norm/weight/relu"])


def test_a_new_quantity_is_a_statistic_and_a_quantity(tmp_path, monkeypatch):
    """A per-layer quantity from a new hook-side statistic, declared in one place: the mean
    absolute output gradient, against autograd; and one from an existing statistic."""
    from skipstudy.monitor import quantities
    from skipstudy.monitor.sums import count

    monkeypatch.setattr(quantities, "STATISTICS", dict(quantities.STATISTICS))
    monkeypatch.setattr(quantities, "QUANTITIES", dict(quantities.QUANTITIES))

    @quantities.statistic("out_abs", site="output_grad", width=2)
    def out_abs(g):
        return torch.stack((count(g), g.abs().sum(dtype=torch.float64)))

    @quantities.quantity("grad_mean_abs/output", needs="out_abs")
    def grad_mean_abs(s):
        return s["out_abs"][:, 1] / s["out_abs"][:, 0] * s.out_grad_scale

    @quantities.quantity("grad_sq/output", needs="output")
    def grad_sq_output(s):
        return s["output"][:, 1] * s.out_grad_scale ** 2

    torch.manual_seed(0)
    net = TinyNet()
    data = make_data()
    twin, logits = copy.deepcopy(net), []
    twin.fc.register_forward_hook(lambda m, a, o: logits.append(o))
    g = torch.autograd.grad(F.cross_entropy(twin(data.tensors[0][:4]), data.tensors[1][:4]), logits[0])[0]
    monitor = GradientFlowMonitor(layers=["fc"])
    fit(tmp_path, net, monitor, data=data)
    got = recorded(monitor, 0)
    assert math.isclose(got["grad_mean_abs/output/fc"], g.double().abs().mean().item(), rel_tol=REL)
    assert math.isclose(got["grad_sq/output/fc"], got["grad_norm/output/fc"] ** 2, rel_tol=1e-6)
    assert {"grad_sq/output/fc", "grad_mean_abs/output/fc"} <= set(events(tmp_path).Tags()["scalars"])


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_inplace_relu_gives_gradient_wrt_layer_output_before_the_inplace_op(tmp_path):
    """conv2's output is overwritten by ReLU(inplace=True): the recorded gradient is the one
    w.r.t. the pre-ReLU output (what autograd.grad gives on an out-of-place twin), not the
    post-ReLU one."""
    torch.manual_seed(1)
    net = TinyNet(bn=False)
    data = make_data()
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    monitor = GradientFlowMonitor(layers=["conv2"])
    want = reference(net, ["conv2"], x, y)["grad_norm/output/conv2"]
    # The gradient w.r.t. the post-ReLU tensor differs (it is not masked by the ReLU).
    twin = copy.deepcopy(net)
    post = []
    twin.relu.register_forward_hook(lambda m, a, o: post.append(o))
    loss = F.cross_entropy(twin(x), y)
    post_grad = torch.autograd.grad(loss, post[1])[0].norm().item()
    assert not math.isclose(post_grad, want, rel_tol=1e-3)
    fit(tmp_path, net, monitor, data=data)
    assert math.isclose(recorded(monitor, 0)["grad_norm/output/conv2"], want, rel_tol=REL)


def test_event_file_holds_the_tags_and_the_exported_values(tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    monitor = GradientFlowMonitor()
    fit(tmp_path, net, monitor, data=make_data(8), max_steps=-1, max_epochs=2)
    layers = ["conv1", "conv2", "conv3", "fc"]
    acc = events(tmp_path)
    tags = acc.Tags()
    per_layer = ["grad_norm/output", "grad_norm/weight", "grad_rms/output", "grad_rms/weight",
                 "act/mean", "act/std", "act/zero_frac"]
    want_scalars = {f"{q}/{n}" for q in per_layer for n in layers} | {"grad_norm/total"}
    assert want_scalars <= set(tags["scalars"])
    want_hists = {f"grad_hist/output/{n}" for n in layers}
    want_hists |= {f"grad_norm_dist/{k}/{n}" for k in ("output", "weight") for n in layers}
    assert want_hists <= set(tags["histograms"])
    assert "figures/gradient_flow" in tags["images"]
    # grad_hist once per epoch at the epoch's first step; scalars at every step (global_step).
    assert [e.step for e in acc.Histograms("grad_hist/output/conv1")] == [0, 2]
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [0, 1, 2, 3]
    assert len(acc.Images("figures/gradient_flow")) == 2
    assert (tmp_path / "figures" / "gradient_flow_epoch0.png").is_file()
    assert (tmp_path / "figures" / "gradient_flow_epoch1.png").is_file()
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    assert doc["layers"] == layers and doc["step"] == [0, 1, 2, 3] and doc["epoch"] == [0, 0, 1, 1]
    assert doc["diverged_at"] is None
    for tag in ("grad_norm/output/conv2", "grad_rms/weight/fc", "act/std/conv1", "grad_norm/total"):
        tb = [e.value for e in acc.Scalars(tag)]
        assert np.allclose(tb, doc["series"][tag], rtol=1e-6), tag


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_output_gradient_histogram_counts_the_elements(tmp_path):
    """grad_hist/output: device-binned log10|g| of the step's output gradient; zeros left out."""
    torch.manual_seed(0)
    net = TinyNet()
    data = make_data()
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    out = []
    twin.conv2.register_forward_hook(lambda m, a, o: out.append(o))
    g = torch.autograd.grad(F.cross_entropy(twin(x), y), out[0])[0].flatten().double()
    logs = torch.log10(g[g != 0].abs()).numpy()
    fit(tmp_path, net, GradientFlowMonitor(layers=["conv2"]), data=data)
    (h,) = events(tmp_path).Histograms("grad_hist/output/conv2")
    hv = h.histogram_value
    assert hv.num == len(logs) < g.numel()  # inactive ReLU units give exact zeros
    assert math.isclose(hv.sum, logs.sum(), rel_tol=1e-6)
    assert hv.min <= logs.min() and hv.max >= logs.max() and hv.max - hv.min < logs.max() - logs.min() + 0.2
    edges = np.asarray([hv.min, *hv.bucket_limit])
    counts, _ = np.histogram(logs, bins=edges)
    assert np.array_equal(counts, np.asarray(hv.bucket))


def test_csv_export(tmp_path):
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(export="csv", activations=False, figure=False)
    fit(tmp_path, TinyNet(), monitor, max_steps=3)
    lines = (tmp_path / "grad_stats.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["step", "epoch"] and "grad_norm/output/conv1" in header
    assert not any(h.startswith("act/") for h in header)
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]
    assert not (tmp_path / "figures").exists() and not (tmp_path / "grad_stats.json").exists()


@pytest.mark.parametrize("export", ["json", "csv"])
def test_resumed_run_continues_the_export(tmp_path, export):
    """Resuming from a checkpoint into the same run directory keeps the earlier rows."""
    torch.manual_seed(0)
    data = make_data(16)
    kw = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              logger=False, default_root_dir=str(tmp_path))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    net = TinyNet()
    first = GradientFlowMonitor(export=export, figure=False)
    L.Trainer(max_steps=2, callbacks=[first, ckpt], **kw).fit(Lit(net), DataLoader(data, batch_size=4))
    second = GradientFlowMonitor(export=export, figure=False)
    L.Trainer(max_steps=4, callbacks=[second], **kw).fit(
        Lit(TinyNet()), DataLoader(data, batch_size=4), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert second.series.steps == [0, 1, 2, 3]
    assert np.allclose(second.series.rows[1], first.series.rows[1], equal_nan=True)
    if export == "json":
        assert json.loads((tmp_path / "grad_stats.json").read_text())["step"] == [0, 1, 2, 3]
    else:
        lines = (tmp_path / "grad_stats.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------- selection and config


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)


def resnet_like() -> nn.Module:
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 2, 3)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        setattr(net, stage, nn.Sequential(Block(), Block()))
    net.fc = nn.Linear(2, 10)
    return net


def test_layer_selection_by_name_and_glob():
    net = resnet_like()
    default = select_layers(net, None)
    assert default[0] == "conv1" and default[-1] == "fc" and len(default) == 1 + 4 * 2 * 2 + 1
    assert select_layers(net, ["fc", "conv1", "layer2.1.conv2"]) == ["conv1", "layer2.1.conv2", "fc"]
    assert select_layers(net, ["layer3.*.conv*"]) == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]
    # Globs pick weighted layers only; an exact name may be any module.
    assert select_layers(net, ["layer1.0.*"]) == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    assert select_layers(net, ["layer1.0.relu"]) == ["layer1.0.relu"]
    assert select_layers(net, "fc") == ["fc"]


def test_unknown_layer_name_lists_the_closest_names():
    net = resnet_like()
    with pytest.raises(ConfigError) as err:
        GradientFlowMonitor(layers=["conv1", "layer9.0.conv1"]).resolve(net)
    msg = str(err.value)
    assert msg.startswith("monitor.layers: 'layer9.0.conv1' matches no module; closest: ")
    closest = msg.split("closest: ")[1].split(", ")
    assert len(closest) == 3 and all(c.endswith(".0.conv1") and c.startswith("layer") for c in closest)
    with pytest.raises(ConfigError, match=r"'layer7\.\*\.conv\*' matches no module; closest: layer"):
        select_layers(net, ["layer7.*.conv*"])
    with pytest.raises(ConfigError, match="monitor.layers"):
        select_layers(net, [])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"every_n_steps": 0}, "monitor.every_n_steps=0"),
        ({"every_n_steps": 2.5}, "monitor.every_n_steps=2.5"),
        ({"schedule": "sometimes"}, "monitor.schedule='sometimes' is not one of: every, log"),
        ({"on_nonfinite": "ignore"}, "monitor.on_nonfinite='ignore' is not one of: warn, stop"),
        ({"export": "parquet"}, "monitor.export='parquet' is not one of: json, csv, none"),
        ({"hist_every_n_epochs": -1}, "monitor.hist_every_n_epochs=-1"),
        ({"activations": "yes"}, "monitor.activations='yes'"),
    ],
)
def test_bad_config_values_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as err:  # the declared options (monitor/options.py), as the CLI checks them
        config.check_group("monitor", "skipstudy.monitor.GradientFlowMonitor", kwargs)
    assert str(err.value).startswith(key)


def test_conf_yaml_builds_the_monitor_and_off_builds_nothing():
    from hydra.utils import instantiate

    from conftest import group_option

    cfg = group_option("monitor", "default")
    monitor = instantiate(cfg)
    assert isinstance(monitor, GradientFlowMonitor)
    assert (monitor.layers, monitor.every_n_steps, monitor.on_nonfinite) == (None, 1, "stop")
    assert "_target_" not in group_option("monitor", "off")
    # The composed keys are the declared ones, each read by the monitor with its declared default.
    from skipstudy.monitor.options import Monitor

    assert set(cfg) - {"_target_"} == set(Monitor.model_fields)
    assert all(getattr(GradientFlowMonitor(), k) == f.default for k, f in Monitor.model_fields.items())


@pytest.mark.parametrize("how", ["torch.compile(net)", "net.compile()"])
def test_compiled_network_records_the_eager_values(tmp_path, how):
    """Under torch.compile the hooks run at graph breaks on the real outputs: every quantity
    still equals autograd at step 0 (in-place ReLU included) and the eager monitor's rows over
    three steps. aot_eager: Dynamo capture and AOTAutograd as with the default backend, without
    Inductor's C++ code generation (tens of seconds on 2 cores)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = TinyNet()
    data = make_data(12)
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    names = ["conv1", "conv2", "conv3", "fc"]
    want = reference(net, names, x, y)
    eager_net = copy.deepcopy(net)
    if how == "torch.compile(net)":
        compiled = torch.compile(net, backend="aot_eager")
    else:
        net.compile(backend="aot_eager")
        compiled = net
    monitor = GradientFlowMonitor(hist_every_n_epochs=0)
    fit(tmp_path / "compiled", compiled, monitor, data=data, max_steps=3)
    eager = GradientFlowMonitor(hist_every_n_epochs=0)
    fit(tmp_path / "eager", eager_net, eager, data=data, max_steps=3)
    try:
        assert counters["stats"]["unique_graphs"] > 0  # Dynamo did compile graphs
        assert monitor.layer_names == names  # no "_orig_mod." prefix
        assert_close(recorded(monitor, 0), want)
        assert monitor.series.steps == eager.series.steps == [0, 1, 2]
        for step in (1, 2):
            assert_close(recorded(monitor, step), recorded(eager, step))
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- when


def test_every_n_steps(tmp_path):
    monitor = GradientFlowMonitor(every_n_steps=3, hist_every_n_epochs=0)
    fit(tmp_path, TinyNet(), monitor, data=make_data(32), max_steps=7)
    assert monitor.series.steps == [0, 3, 6]
    assert [e.step for e in events(tmp_path).Scalars("grad_norm/output/conv1")] == [0, 3, 6]


def test_histogram_step_is_recorded_even_off_schedule(tmp_path):
    # 4 steps per epoch, every 3rd step: epoch 1 starts at step 4, which gets the histogram.
    monitor = GradientFlowMonitor(every_n_steps=3)
    fit(tmp_path, TinyNet(), monitor, data=make_data(16), max_steps=-1, max_epochs=2)
    assert monitor.series.steps == [0, 3, 4, 6]
    assert [e.step for e in events(tmp_path).Histograms("grad_hist/output/fc")] == [0, 4]


def test_log_schedule():
    steps = [s for s in range(120) if on_log_schedule(s, 10)]
    assert steps == [0, 1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100]
    assert sum(on_log_schedule(s, 10) for s in range(1, 100_001)) <= 51


# ----------------------------------------------------------------------------- non-finite


class PoisonGrad(nn.Module):
    """Identity forward; in backward, NaN gradients while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x):
        return _Poison.apply(x, self.armed)


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, armed):
        ctx.armed = armed
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g * float("nan") if ctx.armed else g), None


class ArmAt(Callback):
    def __init__(self, batch: int, action) -> None:
        self.batch, self.action = batch, action
        self.params_before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            self.params_before = [p.detach().clone() for p in pl_module.parameters()]
            self.action(pl_module.net)


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_nan_in_backward_stops_names_the_layer_and_keeps_the_last_good_state(tmp_path, caplog):
    """NaN enters the backward pass between conv3 and conv2: conv2's output gradient is the first
    non-finite one in backward order (conv1's follows), so conv2 is named."""
    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    monitor = GradientFlowMonitor()
    with caplog.at_level(logging.ERROR, logger="skipstudy.monitor.callback"):
        trainer = fit(tmp_path, net, monitor, data=make_data(32), max_steps=6, callbacks=[arm, ckpt],
                      enable_checkpointing=True)
    assert monitor.diverged_at == (2, "conv2")
    assert any(r.getMessage().startswith("non-finite gradient at step 2, first layer conv2") for r in caplog.records)
    assert trainer.should_stop and trainer.global_step == 3  # stopped right after the NaN step
    # The NaN step changed no parameter: they are those of the last good step.
    for before, after in zip(arm.params_before, trainer.lightning_module.parameters()):
        assert torch.equal(before, after)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in last.values())
    assert torch.equal(last["net.conv2.weight"], arm.params_before[list(dict(net.named_parameters())).index("conv2.weight")])
    acc = events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/diverged")] == [(2, 1.0)]
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    assert doc["diverged_at"] == {"step": 2, "layer": "conv2"} and doc["nonfinite_steps"] == [2]
    assert doc["series"]["grad_norm/output/conv2"][2] is None
    assert doc["series"]["grad_norm/output/conv3"][2] is not None  # conv3's is still finite


@pytest.mark.parametrize("schedule", [dict(every_n_steps=5), dict(schedule="log", points_per_decade=1)])
def test_sparse_schedule_still_never_applies_a_non_finite_update(tmp_path, caplog, schedule):
    """The NaN step (2) is not a recorded one (every 5th step: 0, 5; log schedule: 0, 1, 10):
    the divergence guard checks it, stops there with the last good weights, and the verdict
    lands in the monitor's export and the event file as with a recorded step."""
    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    monitor = GradientFlowMonitor(hist_every_n_epochs=0, **schedule)
    guard = DivergenceGuard("stop", monitor)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    with caplog.at_level(logging.ERROR, logger="skipstudy.runs.stopping"):
        trainer = fit(tmp_path, net, monitor, data=make_data(32), max_steps=6, callbacks=[arm, guard, ckpt],
                      enable_checkpointing=True)
    assert 2 not in monitor.series.steps
    assert guard.verdict == monitor.diverged_at == (2, "conv2")
    assert trainer.global_step == 3
    assert any(r.getMessage().startswith("non-finite gradient at step 2, first layer conv2") for r in caplog.records)
    for before, after in zip(arm.params_before, trainer.lightning_module.parameters()):
        assert torch.equal(before, after)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in last.values())
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("train/diverged")] == [(2, 1.0)]
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    assert doc["diverged_at"] == {"step": 2, "layer": "conv2"} and doc["nonfinite_steps"] == [2]


def test_warn_with_a_sparse_schedule_adds_no_per_step_check(tmp_path):
    """warn keeps a sparse schedule sync-free: the guard leaves unrecorded steps alone."""
    from skipstudy.runs.stopping import DivergenceGuard

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)
    arm = ArmAt(2, lambda net: setattr(poison, "armed", True))
    monitor = GradientFlowMonitor(every_n_steps=5, hist_every_n_epochs=0, on_nonfinite="warn")
    guard = DivergenceGuard("warn", monitor)
    trainer = fit(tmp_path, net, monitor, data=make_data(32), max_steps=6, callbacks=[arm, guard])
    assert trainer.global_step == 6 and guard.nonfinite_steps == [] and guard.verdict is None
    assert monitor.nonfinite_steps == [5]  # found at the next recorded step


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_nan_in_forward_names_the_first_layer_with_a_non_finite_output(tmp_path):
    """An inf weight in conv2 makes its output non-finite; every gradient is NaN then, but the
    forward pass shows where it began."""
    torch.manual_seed(0)
    net = TinyNet()
    arm = ArmAt(1, lambda net: net.conv2.weight.data.fill_(float("inf")))
    monitor = GradientFlowMonitor()
    fit(tmp_path, net, monitor, max_steps=4, callbacks=[arm])
    assert monitor.diverged_at == (1, "conv2")


def test_warn_mode_goes_on(tmp_path, caplog):
    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)

    class ArmOnce(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            poison.armed = batch_idx == 1

    monitor = GradientFlowMonitor(on_nonfinite="warn")
    with caplog.at_level(logging.WARNING, logger="skipstudy.monitor.callback"):
        trainer = fit(tmp_path, net, monitor, max_steps=3, callbacks=[ArmOnce()])
    assert trainer.global_step == 3 and monitor.diverged_at is None
    # warn only observes: the NaN update at step 1 went through, so step 2 is non-finite too.
    assert monitor.nonfinite_steps == [1, 2]
    assert not all(torch.isfinite(p).all() for p in net.parameters())
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("non-finite gradient")]
    assert [m.split(" (")[0] for m in reports] == ["non-finite gradient at step 1, first layer conv2"]  # once


# ----------------------------------------------------------------------------- precision, accumulation


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_bf16_autocast_values_close_to_fp32(tmp_path):
    data = make_data()
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        monitor = GradientFlowMonitor()
        fit(tmp_path / precision, TinyNet(), monitor, data=data, precision=precision)
        runs[precision] = recorded(monitor, 0)
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    for tag in fp32:
        if tag.startswith(("grad_", "act/std")):
            assert math.isclose(bf16[tag], fp32[tag], rel_tol=3e-2), (tag, bf16[tag], fp32[tag])


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_fp16_gradscaler_output_gradients_are_unscaled(tmp_path):
    """fp16 AMP on the CPU with a GradScaler at scale 1024: output gradients are recorded in
    units of the loss (divided by the scale), like fp32."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = make_data()
    torch.manual_seed(0)
    ref = GradientFlowMonitor()
    fit(tmp_path / "fp32", TinyNet(), ref, data=data)
    torch.manual_seed(0)
    monitor = GradientFlowMonitor()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fit(tmp_path / "fp16", TinyNet(), monitor, data=data, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    got, want = recorded(monitor, 0), recorded(ref, 0)
    for tag in want:
        if tag.startswith("grad_"):
            assert math.isclose(got[tag], want[tag], rel_tol=3e-2), (tag, got[tag], want[tag])


def test_fp16_overflow_is_the_gradscalers_business_not_a_divergence(tmp_path):
    """A step whose fp16 gradients overflow is skipped by the GradScaler (which lowers its
    scale); the monitor does not record it and does not stop training."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    poison = PoisonGrad()
    net = TinyNet(poison=poison)

    class ArmOnce(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            poison.armed = batch_idx == 1

    monitor = GradientFlowMonitor()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = fit(tmp_path, net, monitor, max_steps=3, callbacks=[ArmOnce()],
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == 3 and monitor.diverged_at is None and monitor.nonfinite_steps == []
    assert monitor.overflow_steps == 1 and monitor.series.steps == [0, 2]
    assert scaler.get_scale() < 1024.0
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_gradient_accumulation_records_the_accumulated_gradient_once_per_optimizer_step(tmp_path):
    """Two micro-batches of 4 per optimizer step equal one batch of 8 (no BN, so the two are the
    same loss): weight gradients are the accumulated ones, output gradients those of the
    accumulated loss over both micro-batches' outputs, activations over both."""
    torch.manual_seed(0)
    net = TinyNet(bn=False)
    data = make_data(16)
    names = ["conv1", "conv2", "conv3", "fc"]
    want = reference(net, names, data.tensors[0][:8], data.tensors[1][:8])
    monitor = GradientFlowMonitor()
    trainer = fit(tmp_path, net, monitor, data=data, max_steps=2, accumulate_grad_batches=2)
    assert trainer.global_step == 2 and monitor.series.steps == [0, 1]
    assert_close(recorded(monitor, 0), want)
    assert [e.step for e in events(tmp_path).Scalars("grad_norm/weight/fc")] == [0, 1]


# ----------------------------------------------------------------------------- validation, host syncs


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_nothing_recorded_during_validation(tmp_path, monkeypatch):
    """Sanity-check and in-epoch validation run the tracked layers in eval mode without grad:
    no accumulation, no tensor hook, and step 0 still equals the training-batch reference
    even though validation on 100x larger inputs ran just before it."""
    torch.manual_seed(0)
    net = TinyNet()
    data = make_data(8)
    loud = TensorDataset(data.tensors[0] * 100, data.tensors[1])
    want = reference(net, ["conv1", "conv2", "conv3", "fc"], data.tensors[0][:4], data.tensors[1][:4])
    monitor = GradientFlowMonitor()
    hooks_in_validation = []
    real_register_hook = torch.Tensor.register_hook

    def counting_register_hook(self, hook):
        if spy.validating:
            hooks_in_validation.append(hook)
        return real_register_hook(self, hook)

    class Spy(Callback):
        validating = False
        seen = 0

        def on_validation_start(self, trainer, pl_module):
            Spy.validating = True

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            Spy.seen += 1
            assert all(not l.sums for l in monitor.taps._layers) or trainer.global_step > 0

        def on_validation_end(self, trainer, pl_module):
            Spy.validating = False

    spy = Spy()
    monkeypatch.setattr(torch.Tensor, "register_hook", counting_register_hook)
    fit(tmp_path, net, monitor, data=data, val_data=loud, max_steps=2, num_sanity_val_steps=1,
        val_check_interval=1, callbacks=[spy])
    assert Spy.seen >= 3 and hooks_in_validation == []
    assert monitor.series.steps == [0, 1]
    assert_close(recorded(monitor, 0), want)


class ResidualTiny(nn.Module):
    """A stem conv and one skipstudy BasicBlock with an identity shortcut."""

    def __init__(self) -> None:
        super().__init__()
        from skipstudy.models.blocks import BasicBlock

        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = BasicBlock(4, 4, 1)  # downsample=None: the identity shortcut, as in torchvision
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.conv1(x)).mean((2, 3)))


SYNCING = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__")


@pytest.mark.usefixtures("sums_path")  # CPU and accelerator paths (conftest.py)
def test_one_host_transfer_per_recorded_step(tmp_path, monkeypatch):
    """The monitor's code reads device values on the host only inside ``_to_host``, and calls it
    once per recorded step (histogram and epoch-end steps included). Every Tensor method that
    waits for the device is wrapped; calls from monitor code outside ``_to_host`` are counted.
    ``sums.cpu_value`` is exempt: it reads CPU tensors only (it raises on any other
    device, checked here too), where nothing waits; so is ``LayerTaps._on_host``, which computes
    the quantities from the transferred array (its tensors are checked to be CPU ones)."""
    monitor_dir = str(Path(monitor_callback.__file__).parent)
    stray: list[str] = []
    transfers: list[int] = []

    def from_monitor_outside_to_host() -> str | None:
        frame = inspect.currentframe().f_back.f_back
        where = None
        while frame is not None:
            if frame.f_code.co_name == "_to_host":
                return None
            if frame.f_code.co_name == "cpu_value":
                assert frame.f_locals["t"].device.type == "cpu"
                return None
            if frame.f_code.co_name == "_on_host":
                assert isinstance(frame.f_locals["h"], np.ndarray)
                return None
            if where is None and frame.f_code.co_filename.startswith(monitor_dir):
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            frame = frame.f_back
        return where

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            where = from_monitor_outside_to_host()
            if where:
                stray.append(f"Tensor.{name} at {where}")
            return real(self, *args, **kwargs)

        return wrapped

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and str(target).startswith("cpu"):
            where = from_monitor_outside_to_host()
            if where:
                stray.append(f"Tensor.to(cpu) at {where}")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    real_to_host = monitor_taps._to_host

    def counting_to_host(t):
        transfers.append(t.numel())
        return real_to_host(t)

    monkeypatch.setattr(monitor_taps, "_to_host", counting_to_host)
    monitor = GradientFlowMonitor(every_n_steps=2)
    fit(tmp_path, ResidualTiny(), monitor, data=make_data(16), max_steps=-1, max_epochs=2)
    assert monitor.taps.block_names == ["block"]  # the per-block quantities are in the one transfer too
    assert monitor.series.steps == [0, 2, 4, 6]
    assert len(transfers) == 4
    assert stray == []


# ----------------------------------------------------------------------------- DDP

DDP_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))
"""

DDP_SCRIPT = DDP_NET + r"""
import json, sys, lightning as L, torch.nn.functional as F
from pathlib import Path
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.loggers import TensorBoardLogger
from skipstudy.monitor import GradientFlowMonitor

class Lit(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.first_batch = None
    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if self.first_batch is None:
            self.first_batch = idx.tolist()
        return F.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

out = Path(sys.argv[1])
torch.manual_seed(0)
net = Net()
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8))
init = {k: v.clone() for k, v in net.state_dict().items()}
monitor = GradientFlowMonitor()
monitor.resolve(net)
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False,
                    logger=TensorBoardLogger(str(out / "run"), name="", version=""), callbacks=[monitor])
lit = Lit(net)
trainer.fit(lit, DataLoader(data, batch_size=2))
rank = trainer.global_rank
result = {"rank": rank, "has_series": monitor.series is not None, "first_batch": lit.first_batch}
if monitor.series is not None:
    result.update(steps=monitor.series.steps, row0=dict(zip(monitor.series.tags, monitor.series.rows[0].tolist())))
    torch.save({"init": init, "data": data.tensors}, out / "inputs.pt")
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    """DDP (gloo, 2 processes): weight gradients after all-reduce, output gradients and
    activations over the global batch, written once by rank 0."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["has_series"] and not r1["has_series"]  # only rank 0 writes
    assert r0["steps"] == [0, 1]

    # Reference from the samples each rank's first batch held (Lightning's sampler decides).
    saved = torch.load(tmp_path / "inputs.pt")
    x, y, _ = saved["data"]
    batches = [r0["first_batch"], r1["first_batch"]]
    assert sorted(batches[0] + batches[1]) == sorted(set(batches[0] + batches[1]))
    ns: dict = {}
    exec(DDP_NET, ns)
    names = ["conv1", "conv2", "fc"]
    refs, nets = [], []
    for rank in (0, 1):
        net = ns["Net"]()
        net.load_state_dict(saved["init"])
        idx = batches[rank]
        refs.append(reference(net, names, x[idx], y[idx]))
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        nets.append(net)
    want: dict[str, float] = {}
    for n in names:
        # DDP averages gradients: the optimised loss is the mean of the ranks' losses, so each
        # rank's output gradient enters with a factor 1/2.
        g = (getattr(nets[0], n).weight.grad + getattr(nets[1], n).weight.grad) / 2
        want[f"grad_norm/weight/{n}"] = g.double().norm().item()
        want[f"grad_norm/output/{n}"] = math.hypot(refs[0][f"grad_norm/output/{n}"], refs[1][f"grad_norm/output/{n}"]) / 2
        # Activations over the global batch of 4 (equal halves: the mean of the ranks' means).
        want[f"act/mean/{n}"] = (refs[0][f"act/mean/{n}"] + refs[1][f"act/mean/{n}"]) / 2
    total = torch.cat([((p0.grad + p1.grad) / 2).double().flatten()
                       for p0, p1 in zip(nets[0].parameters(), nets[1].parameters())])
    want["grad_norm/total"] = total.norm().item()
    assert_close(r0["row0"], want)
    acc = events(tmp_path / "run")
    assert [e.step for e in acc.Scalars("grad_norm/weight/conv1")] == [0, 1]
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
