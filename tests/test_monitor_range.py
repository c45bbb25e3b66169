"""The monitor's numbers where gradients vanish or explode: every norm, RMS, total norm,
activation statistic and histogram bin against a float64 computation on the same values,
for elements from 1e-30 to 1e30 (float32, bf16) and over fp16's whole range, and exact zeros.

A float32 accumulator loses both ends: the squares of elements near 1e-25 underflow (the
norm reads 0) and of elements near 1e25 overflow (the norm reads inf); the one-pass variance
E[y^2] - mean^2 loses every digit when |mean| >> std.

Every value test runs twice (the ``sums_path`` fixture, tests/conftest.py): through the CPU
paths and through the accelerator path forced on CPU tensors, which a GPU run takes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from skipstudy.monitor import GradientFlowMonitor
from skipstudy.monitor.quantities import StepTensors
from skipstudy.monitor.sums import (HistogramBins, activation_parts, activation_sums, channel_parts, channel_sums,
                                   log_abs_histogram, output_grad_parts, output_grad_sums)
from conftest import force_accelerator_path
from test_monitor import REL, TinyNet, assert_close, events, fit, make_data, recorded, reference

# (dtype, magnitude): float32 and bf16 share float32's exponent range; fp16 spans 6e-8..65504.
MAGNITUDES = [(dt, m) for dt in (torch.float32, torch.bfloat16) for m in (1e-30, 1e-20, 1.0, 1e20, 1e30)] + [
    (torch.float16, m) for m in (1e-6, 1.0, 1e3)
]


def sample(shape, magnitude, dtype, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def rel_err(got, want) -> float:
    return abs(float(got) / float(want) - 1)


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype,magnitude", MAGNITUDES, ids=str)
@pytest.mark.parametrize("shape,channels_last", [((5, 7, 9, 3), False), ((4, 16, 8, 8), True), ((33,), False)])
def test_output_gradient_sum_of_squares_matches_float64(dtype, magnitude, shape, channels_last):
    g = sample(shape, magnitude, dtype, channels_last=channels_last)
    numel, sq = output_grad_sums(g).tolist()
    assert numel == g.numel()
    want = g.double().square().sum()
    assert rel_err(sq, want) < REL, (sq, float(want))
    if dtype != torch.float16 and magnitude in (1e-30, 1e30):
        # What the monitor logged before: 0 or inf instead of the norm.
        plain = float(torch.linalg.vector_norm(g, dtype=torch.float32))
        assert plain == 0.0 or math.isinf(plain)


@pytest.mark.usefixtures("sums_path")
def test_sum_of_squares_of_a_large_tensor_and_of_mixed_magnitudes():
    # 2M elements: one float32 accumulator drifts by ~3e-5 here, more than the bound.
    big = sample((128, 16, 32, 32), 1.0, torch.float32, channels_last=True)
    assert rel_err(output_grad_sums(big)[1], big.double().square().sum()) < 1e-6
    # One layer whose elements span 1e-38 (subnormal range of squares) to 1e-20.
    mixed = torch.logspace(-38, -20, 1000, dtype=torch.float64).to(torch.float32)
    assert rel_err(output_grad_sums(mixed)[1], mixed.double().square().sum()) < REL
    # Exact zeros give exactly 0, and a non-finite element a non-finite sum.
    assert output_grad_sums(torch.zeros(3, 4)).tolist() == [12.0, 0.0]
    assert math.isinf(output_grad_sums(torch.tensor([1.0, float("inf")]))[1])
    assert math.isnan(output_grad_sums(torch.tensor([1.0, float("nan")]))[1])


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype,magnitude", MAGNITUDES + [(torch.float32, 1e-40), (torch.float64, 1e-150),
                                                          (torch.float64, 1e150)], ids=str)
def test_activation_and_channel_sums_match_float64(dtype, magnitude):
    """Every element of activation_sums and channel_sums against float64 sums of the same
    values, float32 subnormals (1e-40) and float64 layers far beyond float32's range (whose
    sums of squares float64 still holds: the float64 path is the scaled one on both paths); a layer
    whose mean is 3 std from zero, so that the centred M2 is tested, not only sum(y^2)."""
    y = sample((4, 8, 6, 5), magnitude, dtype, seed=5, channels_last=True)
    y = (y.double() + 3 * magnitude).to(dtype)
    ref = y.double()
    n, s1, m2, q, nz = activation_sums(y).tolist()
    assert (n, nz) == (y.numel(), float(torch.count_nonzero(y)))
    assert rel_err(s1, ref.sum()) < REL
    assert rel_err(q, ref.sum() ** 2 / y.numel()) < REL
    assert rel_err(m2, (ref - ref.mean()).square().sum()) < REL
    c = channel_sums(y)
    assert c[:2].tolist() == [y.numel() / y.shape[1], y.numel()]
    assert rel_err(c[2], ref.square().sum()) < REL
    per_channel = ref.sum(dim=(0, 2, 3))
    assert torch.allclose(c[3:], per_channel, rtol=REL, atol=0), (c[3:], per_channel)


@pytest.mark.usefixtures("sums_path")
def test_zero_and_non_finite_layers():
    """An all-zero layer gives exact zeros (zero_frac 1, std 0); one inf or NaN element makes
    the layer's mean and its gradient norm non-finite, as the divergence check needs."""
    z = torch.zeros(2, 3, 4, 4)
    assert activation_sums(z).tolist() == [96.0, 0.0, 0.0, 0.0, 0.0]
    assert channel_sums(z).tolist() == [32.0, 96.0, 0.0, 0.0, 0.0, 0.0]
    assert output_grad_sums(z).tolist() == [96.0, 0.0]
    for bad in (float("inf"), float("nan")):
        y = torch.ones(2, 3, 4, 4)
        y[1, 2, 3, 0] = bad
        s = step_of([[y]])
        assert not math.isfinite(float(s.value("act/mean")[0]))
        assert not math.isfinite(float(output_grad_sums(y)[1]))
        assert not math.isfinite(float(channel_sums(y)[2]))


def test_accelerator_path_is_exact_from_the_smallest_subnormal_to_float32_max(monkeypatch):
    """The accelerator path squares in float64 inside the reduction: 1.4e-45 (whose square,
    2e-90, is far below float32) and 3e38 (whose square, 9e76, is far above it) are summed
    exactly, as are their sums (n * 3e38 overflows float32); bf16 and fp16 likewise."""
    force_accelerator_path(monkeypatch)
    tiny = torch.full((3, 1000), 1.4e-45)
    tiny[1] = 0.0
    tiny[2, ::2] = 2.8e-45
    huge = torch.linspace(-3.0e38, 3.0e38, 999, dtype=torch.float64).to(torch.float32).reshape(3, 333)
    assert torch.isfinite(huge).all()
    def close(got, want) -> bool:  # exact where the float64 value is 0 (a constant layer's M2)
        return rel_err(got, want) < 1e-12 if want else got == 0.0

    fp16 = torch.tensor([6e-8, 6e-8, 1e-7, 0.0], dtype=torch.float16), torch.tensor([6e4, -6e4, 3e4, 1.0]).half()
    for t in (tiny, huge, huge.to(torch.bfloat16), *fp16):
        ref = t.double()
        assert close(float(output_grad_sums(t)[1]), ref.square().sum())
        n, s1, m2, _, nz = activation_sums(t).tolist()
        assert close(s1, ref.sum()) and close(m2, (ref - ref.mean()).square().sum())
        assert nz == float((ref != 0).sum())


def test_accelerator_path_issues_few_ops_and_reads_nothing_on_the_host(monkeypatch):
    """What the accelerator path is for: per tensor a handful of ATen ops (each a kernel launch
    on a GPU), against 18 and 34 on the CPU paths, and no host read. The hooks take the parts
    (one op for an output gradient, four for an activation, two for a block's channel sums);
    the assembled vectors cost a few more, which the hot path pays once per step, not per tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops(fn, t):
        Count.n = 0
        with Count():
            fn(t)
        return Count.n

    y = sample((4, 8, 6, 6), 1e-30, torch.float32, channels_last=True)
    cpu = [ops(fn, y) for fn in (output_grad_sums, activation_sums)]

    force_accelerator_path(monkeypatch)
    fast = [ops(output_grad_sums, y), ops(activation_sums, y), ops(channel_sums, y)]
    assert fast[0] < cpu[0] / 3 and fast[1] < cpu[1] / 2, (fast, cpu)
    parts = [ops(output_grad_parts, y), ops(activation_parts, y), ops(channel_parts, y)]
    assert parts == [1, 4, 2], parts


def step_of(acts: list[torch.Tensor] | None = None, weights=None) -> StepTensors:
    act = torch.stack([sum(activation_sums(y) for y in group) for group in acts]) if acts else torch.zeros(1, 5)
    return StepTensors({"activation": act}, weight_grads=weights or [], weight_numel=torch.zeros(0),
                       all_grads=weights or [])


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1.0), (torch.float32, 1e-30), (torch.float32, 1e30),
                                             (torch.bfloat16, 1e-30), (torch.float16, 1e-3)], ids=str)
def test_activation_std_matches_float64_when_the_mean_dwarfs_the_std(dtype, magnitude, offset):
    """act/std of a layer with |mean| = offset * std, over two micro-batches with different
    means, against the float64 std of all their elements."""
    a = sample((4, 8, 16, 16), magnitude, torch.float64, seed=1) + offset * magnitude
    b = sample((4, 8, 16, 16), magnitude, torch.float64, seed=2) * 0.5 + offset * magnitude * 1.001
    a, b = a.to(dtype), b.to(dtype)
    whole = torch.cat([a.flatten(), b.flatten()]).double()
    if whole.std(correction=0) == 0:
        pytest.skip("the dtype cannot hold this spread at this offset")
    for group in ([a], [a, b]):
        s = step_of([group])
        ref = torch.cat([t.flatten() for t in group]).double()
        assert rel_err(s.value("act/std")[0], ref.std(correction=0)) < REL
        bound = REL * float(ref.std(correction=0)) + 1e-6 * abs(float(ref.mean()))
        assert abs(float(s.value("act/mean")[0]) - float(ref.mean())) <= bound
    if offset >= 1e3 and dtype == torch.float32 and magnitude == 1.0:
        # The one-pass form E[y^2] - mean^2 in float32, as before: far off.
        n, s1, s2 = a.numel(), a.sum(), torch.linalg.vector_norm(a).square()
        naive = (s2 / n - (s1 / n) ** 2).clamp(min=0).sqrt()
        assert rel_err(naive, a.double().std(correction=0)) > 1e-2


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype,magnitude", MAGNITUDES, ids=str)
def test_weight_and_total_norms_match_float64(dtype, magnitude):
    grads = [sample((16, 8, 3, 3), magnitude, dtype, seed=3), None, sample((10, 16), magnitude, dtype, seed=4),
             torch.zeros(5, dtype=dtype)]
    s = step_of(weights=grads)
    s.all_grads = [g for g in grads if g is not None]
    got = s.value("grad_norm/weight").tolist()
    want = [g.double().norm().item() if g is not None else 0.0 for g in grads]
    assert all(rel_err(x, w) < REL for x, w in zip(got, want) if w), (got, want)
    assert got[1] == 0.0 and got[3] == 0.0
    total = torch.cat([g.double().flatten() for g in s.all_grads]).norm()
    assert rel_err(s.value("grad_norm/total"), total) < REL


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_histogram_bins_every_magnitude_like_float64(dtype):
    spec = HistogramBins()
    values = [3e-35, -2e-30, 5e-21, 0.3, -7.0, 2e12, 4e30, 0.0, 0.0]
    if dtype == torch.float64:
        values.append(1e-60)  # below float32: counted in the first bin
    g = torch.tensor(values, dtype=torch.float64).to(dtype)
    h = log_abs_histogram(g, spec).numpy()
    n, s1, s2, counts = h[0], h[1], h[2], h[3:]
    x = np.log10(np.abs(g.double().numpy()[g.double().numpy() != 0]))
    x = np.clip(x, spec.lo, spec.hi)
    want, _ = np.histogram(x, bins=np.asarray(spec.edges()))
    assert counts.tolist() == want.tolist()
    assert counts.sum() == n == len(values) - 2  # zeros are left out, nothing else
    assert math.isclose(s1, x.sum(), rel_tol=1e-3) and math.isclose(s2, (x * x).sum(), rel_tol=1e-3)


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("c", [1e-25, 1e25, 0.0])
def test_monitor_logs_vanishing_exploding_and_zero_gradients_exactly(tmp_path, c):
    """Through a real Trainer, the loss times c: every gradient scales by c, so the float64
    reference is the unscaled one times c. c = 1e-25 is the plain ResNet-50's conv1 (its
    squares underflow float32), 1e25 overflows it, 0 must give 0, not a gap."""

    class Scaled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x).clone()  # same logits; the hook scales the gradient behind them
            if out.requires_grad:
                out.register_hook(lambda g: g * c)
            return out

    torch.manual_seed(0)
    net = TinyNet(bn=False)
    data = make_data()
    x, y = data.tensors[0][:4], data.tensors[1][:4]
    layers = ["conv1", "conv2", "conv3", "fc"]
    want = {k: v * c if k.startswith("grad_") else v for k, v in reference(net, layers, x, y).items()}
    monitor = GradientFlowMonitor(layers=[f"net.{n}" for n in layers])
    fit(tmp_path, Scaled(net), monitor, data=data)
    got = {k.replace("/net.", "/"): v for k, v in recorded(monitor, 0).items()}
    assert_close(got, want, rel=REL)
    if c == 0.0:
        assert all(got[f"grad_norm/output/{n}"] == 0.0 for n in layers)
    doc = json.loads((tmp_path / "grad_stats.json").read_text())
    exported = doc["series"]["grad_norm/output/net.conv1"][0]
    assert exported == got["grad_norm/output/conv1"]  # float64 in the export, not rounded
    scalars = {e.value for e in events(tmp_path).Scalars("grad_norm/output/net.conv1")}
    assert scalars == {np.float32(got["grad_norm/output/conv1"]).item()}  # TensorBoard keeps float32


def test_an_exactly_zero_gradient_is_drawn_on_the_axis_floor_not_as_a_gap():
    from skipstudy.monitor.writers import figure_rgb, gradient_flow_figure

    out = np.array([[2e-21, 0.0, 1.0], [3e-21, 0.0, 2.0]])
    fig = gradient_flow_figure(["conv1", "conv2", "fc"], out, np.full_like(out, np.nan), "t")
    figure_rgb(fig)  # renders
    ax = fig.axes[0]
    floor = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(floor) == 1
    assert floor[0].get_xdata().tolist() == [2] and floor[0].get_ydata().tolist() == [0.0]
    _, y_display = floor[0].get_transform().transform((2, 0.0))
    assert y_display == pytest.approx(ax.get_window_extent().y0)  # on the axis floor
    (median,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert median.get_ydata()[0] == pytest.approx(2.5e-21)  # the tiny value is drawn
    assert ax.get_ylim()[0] <= 2e-21


def test_the_cpu_shortcut_never_reads_an_accelerator_tensor():
    """The CPU paths decide on the host (cpu_value); on any other device that would be a sync."""
    from skipstudy.monitor.sums import cpu_value

    assert cpu_value(torch.tensor(2.5)) == 2.5
    with pytest.raises(RuntimeError, match="host sync"):
        cpu_value(torch.zeros((), device="meta"))


def test_a_recorded_step_issues_at_most_6_ops_a_layer_and_12_a_block(monkeypatch):
    """On the meta device (every non-CPU branch, as on a GPU) the monitor at its defaults adds at
    most 6 torch ops a tracked layer plus 12 a residual block to a training step, the budget of a
    host-bound GPU step: the device's ops and those on CPU tensors (the quantities are numpy on the
    host copy) together (scripts/count_monitor_ops.py prints the breakdown for ResNet-50/56)."""
    import numpy as np
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from skipstudy import models
    from skipstudy.monitor import taps as monitor_taps

    class DeviceOps(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            DeviceOps.n += 1  # on any device: host work in torch counts too
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(monitor_taps, "_to_host", lambda t: (np.zeros(t.shape), None))  # meta holds no values
    net = models.cifar_resnet(10, depth=20).train().to("meta").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    y = torch.zeros(2, dtype=torch.long, device="meta")
    taps = monitor_taps.LayerTaps(net)

    def ops(record: bool) -> int:
        net.zero_grad(set_to_none=True)
        DeviceOps.n = 0
        with DeviceOps():
            if record:
                with taps.record(0):
                    F.cross_entropy(net(x), y).backward()
            else:
                taps.armed = False
                F.cross_entropy(net(x), y).backward()
        return DeviceOps.n

    ops(True)  # first-step work (forward order, constants)
    added = ops(True) - ops(False)
    layers, blocks = len(taps.layer_names), len(taps.block_names)
    assert (layers, blocks) == (20, 9)
    assert added <= 6 * layers + 12 * blocks == 228, added
