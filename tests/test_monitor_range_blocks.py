"""The per-block statistics (``grad_split/*``, ``spp/*``) where gradients vanish or explode, and
where channel means cancel: every quantity against float64 computed from the same float32 (bf16,
fp16) values, through the CPU paths and the accelerator path (``sums_path``, tests/conftest.py).

Two failures of float32 per-channel sums are pinned here: gradients of ~3e33 of one sign
overflow a channel's sum over 128x32x32 elements (``spp/grad_mean_rms`` read inf and
``spp/grad_std`` 0, a vanished gradient instead of an exploded one), and the gradient into a
1x1 conv followed by a train-mode BN has channel means that cancel to rounding noise, where a
float32 sum was 6.6% off.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from skipstudy.monitor.quantities import STATISTICS, StepTensors
from skipstudy.monitor.sums import assemble, channel_sums
from test_monitor_range import MAGNITUDES, rel_err, sample

REL = 1e-5


def spp_reference(t: torch.Tensor) -> dict[str, float]:
    """Average over channels of (channel mean)^2 and of channel variance, in float64."""
    x = t.double().movedim(1, 0).reshape(t.shape[1], -1)
    mean = x.mean(1)
    var = (x - mean.unsqueeze(1)).square().mean(1)
    return {"mean_sq": float(mean.square().mean()), "var": float(var.mean())}


def spp_of(sums: list[torch.Tensor], site: str) -> StepTensors:
    width = max(s.numel() for s in sums)
    rows = torch.stack([torch.nn.functional.pad(s, (0, width - s.numel())) for s in sums])
    return StepTensors({site: rows})


def close(got: float, want: float) -> bool:
    return rel_err(got, want) < REL if want else got == 0.0


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype,magnitude", MAGNITUDES, ids=str)
def test_every_spp_quantity_matches_float64(dtype, magnitude):
    """spp/mean_sq, spp/var and spp/branch_var of activations, spp/grad_mean_rms, spp/grad_std
    and spp/grad_branch_std of gradients, two blocks of different widths (zero-padded rows)."""
    a = sample((4, 8, 6, 5), magnitude, dtype, seed=7, channels_last=True)
    a = (a.double() + 0.5 * magnitude).to(dtype)  # channel means well away from 0
    b = sample((3, 3, 4, 4), magnitude, dtype, seed=8)
    refs = [spp_reference(a), spp_reference(b)]
    for site in ("block", "branch", "block_grad", "branch_grad"):
        s = spp_of([channel_sums(a), channel_sums(b)], site)
        want = {"block": {"spp/mean_sq": "mean_sq", "spp/var": "var"}, "branch": {"spp/branch_var": "var"},
                "block_grad": {"spp/grad_mean_rms": "mean_sq", "spp/grad_std": "var"},
                "branch_grad": {"spp/grad_branch_std": "var"}}[site]
        for tag, key in want.items():
            got = s.value(tag).tolist()
            expect = [r[key] if "grad" not in tag else math.sqrt(r[key]) for r in refs]
            assert all(close(g, w) for g, w in zip(got, expect)), (tag, got, expect)


@pytest.mark.usefixtures("sums_path")
def test_spp_of_exploding_gradients_of_one_sign_is_finite_and_right():
    """3e33 per element, 128x32x32 elements a channel: a float32 channel sum is 3.9e38 (inf)."""
    g = torch.full((128, 2, 32, 32), 3e33)
    g[:, 1] = -2e33
    assert math.isinf(float(g.sum(dim=(0, 2, 3), dtype=torch.float32)[0]))
    s = spp_of([channel_sums(g)], "block_grad")
    ref = spp_reference(g)
    assert close(float(s.value("spp/grad_mean_rms")[0]), math.sqrt(ref["mean_sq"]))
    assert float(s.value("spp/grad_std")[0]) == 0.0 == ref["var"]  # constant channels: exactly 0
    g[0, 0, 0, 0] = 1e34  # one different element: a std that is not 0
    s, ref = spp_of([channel_sums(g)], "block_grad"), spp_reference(g)
    assert close(float(s.value("spp/grad_mean_rms")[0]), math.sqrt(ref["mean_sq"]))
    assert rel_err(float(s.value("spp/grad_std")[0]), math.sqrt(ref["var"])) < 1e-3


@pytest.mark.usefixtures("sums_path")
def test_spp_grad_mean_rms_where_channel_means_cancel():
    """The gradient into a 1x1 conv followed by a train-mode BN: each channel's sum is rounding
    noise of its elements, so it must be summed in float64 to match the float64 reference."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
    x = torch.randn(32, 16, 16, 16, requires_grad=True)
    (bn(conv(x)) * torch.randn(32, 16, 16, 16)).sum().backward()
    g = x.grad
    ref = spp_reference(g)
    float32_means = g.sum(dim=(0, 2, 3), dtype=torch.float32).double() / (g.numel() / g.shape[1])
    naive = math.sqrt(float(float32_means.square().mean()))
    assert rel_err(naive, math.sqrt(ref["mean_sq"])) > 1e-3  # what a float32 sum gives
    s = spp_of([channel_sums(g)], "block_grad")
    assert rel_err(float(s.value("spp/grad_mean_rms")[0]), math.sqrt(ref["mean_sq"])) < REL
    assert rel_err(float(s.value("spp/grad_std")[0]), math.sqrt(ref["var"])) < REL


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("dtype,magnitude", MAGNITUDES, ids=str)
def test_every_grad_split_quantity_matches_float64(dtype, magnitude):
    """grad_split/branch, /shortcut, /ratio and /cos from the split statistics of g = s + b as
    autograd would add them (rounded once in the dtype), against float64 on the same s and b."""
    b = sample((4, 8, 5, 5), magnitude, dtype, seed=11)
    s = (sample((4, 8, 5, 5), magnitude, torch.float64, seed=12) * 3 + b.double() * 0.5).to(dtype)
    g = s + b
    sums = {name: assemble(STATISTICS[name].fn(g, b, s), g.device).unsqueeze(0) for name in ("split_branch", "split_shortcut")}
    step = StepTensors(sums)
    bd, sd = b.double().flatten(), s.double().flatten()
    want = {"grad_split/branch": float(bd.norm()), "grad_split/shortcut": float(sd.norm()),
            "grad_split/ratio": float(sd.norm() / bd.norm()),
            "grad_split/cos": float(bd @ sd / (bd.norm() * sd.norm()))}
    for tag, w in want.items():
        got = float(step.value(tag)[0])
        # cos is taken from ||g||^2 - ||s||^2 - ||b||^2 with g rounded once per element in the dtype
        bound = REL if tag != "grad_split/cos" else {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        assert abs(got - w) <= bound * abs(w), (tag, got, w)


@pytest.mark.usefixtures("sums_path")
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_grad_split_of_large_float32_gradients_matches_float64(magnitude):
    """The CPU path reduces large tensors (a ResNet's first stage, batch 128) in float32 rows,
    not in float64 (10x the time there): the split still matches float64 over several draws."""
    for seed in range(2):
        b = sample((64, 16, 32, 32), magnitude, torch.float32, seed=20 + seed, channels_last=True)
        s = (sample((64, 16, 32, 32), magnitude, torch.float64, seed=30 + seed) * 3 + b.double() * 0.5).to(torch.float32)
        g = s + b
        sums = {name: assemble(STATISTICS[name].fn(g, b, s), g.device).unsqueeze(0)
                for name in ("split_branch", "split_shortcut")}
        step = StepTensors(sums)
        bd, sd = b.double().flatten(), s.double().flatten()
        assert rel_err(float(step.value("grad_split/branch")[0]), float(bd.norm())) < 1e-7
        assert rel_err(float(step.value("grad_split/shortcut")[0]), float(sd.norm())) < 1e-7
        cos = float(bd @ sd / (bd.norm() * sd.norm()))
        assert abs(float(step.value("grad_split/cos")[0]) - cos) <= 1e-6 * abs(cos)
