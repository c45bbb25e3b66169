"""The monitor's numbers where gradients vanish or explode: every norm, RMS, total norm,
activation statistic and histogram bin against a float64 computation on the same values,
for elements from 1e-30 to 1e30 (float32, bf16) and over fp16's whole range, and exact zeros.

A float32 accumulator loses both ends: the squares of elements near 1e-25 underflow (the
norm reads 0) and of elements near 1e25 overflow (the norm reads inf); the one-pass variance
E[y^2] - mean^2 loses every digit when |mean| >> std.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from skipstudy.monitor import GradientFlowMonitor
from skipstudy.monitor.quantities import StepTensors
from skipstudy.monitor.sums import HistogramBins, activation_sums, log_abs_histogram, output_grad_sums
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


def step_of(acts: list[torch.Tensor] | None = None, weights=None) -> StepTensors:
    act = torch.stack([sum(activation_sums(y) for y in group) for group in acts]) if acts else torch.zeros(1, 5)
    return StepTensors({"activation": act}, weight_grads=weights or [], weight_numel=torch.zeros(0),
                       all_grads=weights or [])


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
        assert abs(float(s.value("act/mean")[0]) - float(ref.mean())) <= REL * float(ref.std(correction=0)) + 1e-6 * abs(float(ref.mean()))
    if offset >= 1e3 and dtype == torch.float32 and magnitude == 1.0:
        # The one-pass form E[y^2] - mean^2 in float32, as before: far off.
        n, s1, s2 = a.numel(), a.sum(), torch.linalg.vector_norm(a).square()
        naive = (s2 / n - (s1 / n) ** 2).clamp(min=0).sqrt()
        assert rel_err(naive, a.double().std(correction=0)) > 1e-2


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
