"""Every block type skipstudy ships, and torchvision's, measured against a reference written from
the papers' equations, not from the block contract: the block recomputed by hand from its own
modules (post-activation ``relu(bn(conv(...)) + shortcut(x))``, pre-activation ``shortcut(x or
relu(bn1(x))) + conv(relu(bn(...)))``), checked equal to the block's output, then autograd through
two detached copies of what branch and shortcut read. BN in train mode; identity, projection
(B) and zero-padding (A) shortcuts; the plain twins."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import NORMS, BasicBlock, Block, Bottleneck, make_stage
from skipstudy.models.preact import PreActBasicBlock, PreActBottleneck
from skipstudy.monitor import LayerTaps
from skipstudy.monitor.layers import find_blocks
from skipstudy.probes import lesion, paths
from test_monitor_blocks import _channel, assert_close

OURS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact_basic": PreActBasicBlock,
        "preact_bottleneck": PreActBottleneck}
TORCHVISION = {"tv_basic": tv.BasicBlock, "tv_bottleneck": tv.Bottleneck}


class Tiny(nn.Module):
    """Stem conv, an identity-shortcut block (4 -> 4 channels), a stride-2 block whose shortcut
    changes shape (4 -> 8), [final BN-ReLU for pre-activation], GAP, linear."""

    def __init__(self, kind: str, skip: bool = True, shortcut: str = "B") -> None:
        super().__init__()
        self.pre = kind.startswith("preact")
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.Identity() if self.pre else nn.BatchNorm2d(4)
        if kind in OURS:
            block = OURS[kind]
            planes = 4 // block.expansion
            self.blocks = nn.Sequential(*make_stage(block, 4, planes, 1, 1, skip, shortcut, nn.BatchNorm2d),
                                        *make_stage(block, 4, 2 * planes, 1, 2, skip, shortcut, nn.BatchNorm2d))
        else:
            block = TORCHVISION[kind]
            planes = 4 // block.expansion
            down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
            self.blocks = nn.Sequential(block(4, planes), block(4, 2 * planes, 2, down))
        self.bn_final = nn.BatchNorm2d(8) if self.pre else nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))) if not self.pre else self.conv1(x))
        x = F.relu(self.bn_final(x)) if self.pre else x
        return self.fc(x.mean((2, 3)))


def _modules(block: nn.Module, prefix: str) -> list[nn.Module]:
    return [getattr(block, f"{prefix}{i}") for i in (1, 2, 3) if hasattr(block, f"{prefix}{i}")]


def _is_pre(block: nn.Module) -> bool:
    return isinstance(block, (PreActBasicBlock, PreActBottleneck))


def _reads(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What branch and shortcut read: ``x``, or ``relu(bn1(x))`` in He et al. 2016b's blocks
    whose shortcut is a projection (``both_preact``)."""
    return F.relu(block.bn1(x)) if _reads_preactivated(block) else x


def _recombine(block: nn.Module, v: torch.Tensor, u: torch.Tensor):
    """``(output, branch term, shortcut term or None)`` with the branch reading ``v`` and the
    shortcut ``u``, from the papers' equations with the block's own modules."""
    pre, shared = _is_pre(block), _reads_preactivated(block)
    out = v
    for i, (conv, norm) in enumerate(zip(_modules(block, "conv"), _modules(block, "bn"))):
        if pre:
            out = conv(out if (shared and i == 0) else F.relu(norm(out)))
        else:
            out = norm(conv(out))
            out = F.relu(out) if i < len(_modules(block, "conv")) - 1 else out
    branch = out
    short = None
    if getattr(block, "skip", True):
        short = u if block.downsample is None else block.downsample(u)
    total = branch if short is None else branch + short
    return (total if pre else F.relu(total)), branch, short


def _reads_preactivated(block: nn.Module) -> bool:
    return _is_pre(block) and getattr(block, "skip", True) and block.downsample is not None


def by_hand(block: nn.Module, x: torch.Tensor, route: tuple[bool, bool] = (True, True)):
    """``(output, branch term, shortcut term, what they read)`` of ``block`` on ``x``; ``route`` =
    (gradient through the branch, through the shortcut): a path not taken reads a detached copy
    (Veit et al. 2016's paths)."""
    t = _reads(block, x)
    return (*_recombine(block, t if route[0] else t.detach(), t if route[1] else t.detach()), t)


def reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None,
              reads=None, recombine=None) -> dict[str, float]:
    """Every per-block quantity of the blocks ``names`` (default: ``blocks.<i>``), by autograd
    through ``recombine(block, v, u)`` -> (output, branch term, shortcut term), the block written
    by hand with its branch reading ``v`` and its shortcut ``u``, both detached copies of
    ``reads(block, x)``."""
    reads, recombine = reads or _reads, recombine or _recombine
    net = copy.deepcopy(net).train()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    if names is None:
        names = [n for n, _ in net.named_modules() if n.startswith("blocks.") and n.count(".") == 1]
    ins, outs = {}, {}
    hooks = [net.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: ins.__setitem__(n, a[0]))
             for n in names]
    hooks += [net.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o)) for n in names]
    loss = F.cross_entropy(net(x), y)
    for h in hooks:
        h.remove()
    g_out = dict(zip(names, torch.autograd.grad(loss, [outs[n] for n in names])))
    ref = {}
    for n in names:
        block = copy.deepcopy(net.get_submodule(n))
        # Two detached copies of what the paths read, recomputed by hand.
        t = reads(block, ins[n].detach()).detach()
        leaf_b, leaf_s = t.clone().requires_grad_(), t.clone().requires_grad_()
        out, branch, short = recombine(block, leaf_b, leaf_s)
        torch.testing.assert_close(out, outs[n], rtol=1e-5, atol=1e-6)  # the hand-written block is the block
        g_sum = torch.autograd.grad(out, branch, g_out[n], retain_graph=True)[0]  # dL/d(branch term)
        b = torch.autograd.grad(branch, leaf_b, g_sum, retain_graph=True)[0].double()
        ref[f"grad_split/branch/{n}"] = b.norm().item()
        if short is not None:
            s = torch.autograd.grad(short, leaf_s, g_sum)[0].double()
            ref[f"grad_split/shortcut/{n}"] = s.norm().item()
            ref[f"grad_split/ratio/{n}"] = (s.norm() / b.norm()).item()
            ref[f"grad_split/cos/{n}"] = (torch.dot(s.flatten(), b.flatten()) / (s.norm() * b.norm())).item()
        ref[f"spp/mean_sq/{n}"], ref[f"spp/var/{n}"] = _channel(outs[n].detach())
        ref[f"spp/branch_var/{n}"] = _channel(branch.detach())[1]
        mean_sq, var = _channel(g_out[n])
        ref[f"spp/grad_mean_rms/{n}"], ref[f"spp/grad_std/{n}"] = math.sqrt(mean_sq), math.sqrt(var)
        ref[f"spp/grad_branch_std/{n}"] = math.sqrt(_channel(g_sum)[1])
    return ref


def recorded(taps: LayerTaps, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with taps.record(step=0):
        F.cross_entropy(net(x), y).backward()
    return taps.values


def assert_same(got: dict[str, float], want: dict[str, float], blocks: list[str]) -> None:
    assert_close(got, {k: v for k, v in want.items() if "/cos/" not in k})
    for n in blocks:
        if f"grad_split/cos/{n}" in want:
            # The cosine comes from three norms (quantities.split_shortcut): within ~1e-7 (r + 1/r).
            r = want[f"grad_split/ratio/{n}"]
            assert math.isclose(got[f"grad_split/cos/{n}"], want[f"grad_split/cos/{n}"], abs_tol=1e-6 * (r + 1 / r))


CASES = [(k, skip, sc) for k in OURS for skip, sc in [(True, "B"), (True, "A"), (False, "B")]] + \
        [(k, True, "B") for k in TORCHVISION]


@pytest.mark.parametrize("kind,skip,shortcut", CASES, ids=[f"{k}-{'skip' if s else 'plain'}-{c}" for k, s, c in CASES])
def test_split_and_spp_of_every_block_type_match_the_papers_equations(kind, skip, shortcut):
    torch.manual_seed(0)
    net = Tiny(kind, skip, shortcut)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    want = reference(net, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block here is declared: no warning
        taps = LayerTaps(net, blocks=True)
    assert taps.block_names == ["blocks.0", "blocks.1"]
    got = recorded(taps, net, x, y)
    assert_same(got, want, taps.block_names)
    # A plain twin has no shortcut part: absent, never a zero.
    assert skip == ("grad_split/shortcut/blocks.1" in got)


LESION_CASES = [(k, sc) for k in OURS for sc in ("A", "B")] + [(k, "B") for k in TORCHVISION]


@pytest.mark.parametrize("kind,shortcut", LESION_CASES, ids=[f"{k}-{c}" for k, c in LESION_CASES])
def test_lesion_and_path_weights_match_the_papers_equations(kind, shortcut):
    """A deleted branch leaves ``relu(shortcut(x))`` (post-activation: skipstudy's and
    torchvision's, which declare no ``without_branch`` and are deleted from their contract) or
    ``shortcut(x or relu(bn1(x)))`` (pre-activation); each path's gradient (Veit et al. 2016) is
    autograd through the hand-written blocks with the unchosen part of every block reading a
    detached input. torchvision's identity block adds its own input (``identity = x``), so its
    branch-only route is the probe's swap of the block's input, checked here against the equations."""
    torch.manual_seed(0)
    net = Tiny(kind, True, shortcut).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    stem = (lambda z: net.conv1(z)) if net.pre else (lambda z: F.relu(net.bn1(net.conv1(z))))
    h = stem(x).detach()
    for block in net.blocks:
        with torch.no_grad():
            _, _, short, t = by_hand(block, h)
            want = short if isinstance(block, (PreActBasicBlock, PreActBottleneck)) else F.relu(short)
            torch.testing.assert_close(lesion.DeletedBranch(block)(h.clone()), want, rtol=0, atol=0)
            h = block(h)
    names = ["blocks.0", "blocks.1"]
    assert [n for n, _ in paths.residual_blocks(net)] == names
    batches = [(x, y)]
    for k in range(3):
        for chosen in itertools.combinations(range(2), k):
            got = paths.path_gradient_norms(net, batches, [names[i] for i in chosen])
            leaf = stem(x).detach().requires_grad_()
            z = leaf
            for i, block in enumerate(net.blocks):
                z = by_hand(block, z, route=(i in chosen, i not in chosen))[0]
            z = F.relu(net.bn_final(z)) if net.pre else z
            loss = F.cross_entropy(net.fc(z.mean((2, 3))), y, reduction="sum")
            want = torch.autograd.grad(loss, leaf)[0].flatten(1).double().norm(dim=1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


class UndeclaredPreAct(Block):
    """The issue's example: a Block subclass computing pre-activation in its own ``forward``,
    declaring nothing (so its inherited post-activation contract must not be trusted)."""

    def __init__(self, channels: int) -> None:
        super().__init__([nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False)], nn.BatchNorm2d, None, 1, True)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(out))) + x


def test_a_block_that_declares_nothing_is_named_never_measured():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), UndeclaredPreAct(4), BasicBlock(4, 4),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match=r"^monitor: 1 block\(s\) of type UndeclaredPreAct \(1\) declare no block "
                                         r"contract, so grad_split/\* and spp/\* cannot be measured"):
        taps = LayerTaps(net)
    assert taps.block_names == ["2"]
    with pytest.raises(ConfigError, match=r"^monitor.blocks=true: 1 block\(s\) of type UndeclaredPreAct"):
        LayerTaps(net, blocks=True)
    assert LayerTaps(net, blocks=False).block_names == []
    assert find_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), NORMS["none"](4))) == []  # nothing residual: silent


def test_init_schemes_zero_the_declared_branch_exit():
    """zero_residual makes every branch output zero at init, on each block's declared exit: the
    last BN's weight (post-activation) or the last conv's (pre-activation: zeroing bn2's weight
    would leave relu(0) = 0 before conv2 and no gradient to either)."""
    from skipstudy import models

    torch.manual_seed(0)
    for net in (models.preact_resnet(10, depth=20, init="zero_residual"),
                models.preact_resnet(10, depth=29, block="bottleneck", init="zero_residual"),
                models.wide_resnet(10, depth=10, width=1, init="zero_residual"),
                models.cifar_resnet(10, depth=8, init="zero_residual")):
        for b in find_blocks(net):
            assert not b.exit.weight.any()
            assert b.module.branch_convs()[0].weight.any()


def test_monitor_blocks_true_refuses_an_undeclared_block_before_training():
    """``GradientFlowMonitor.resolve`` (train.py calls it before anything is written) refuses
    with ``monitor.blocks=true`` and only warns with the default ``monitor.blocks=null``."""
    from skipstudy.monitor import GradientFlowMonitor

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), UndeclaredPreAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"^monitor.blocks=true: 1 block\(s\) of type UndeclaredPreAct \(1\)"):
        GradientFlowMonitor(blocks=True).resolve(net)
    with pytest.warns(UserWarning, match="UndeclaredPreAct"):
        GradientFlowMonitor().resolve(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientFlowMonitor(blocks=False).resolve(net)


@pytest.mark.parametrize("probe", [lesion, paths], ids=["lesion", "paths"])
def test_lesion_and_paths_refuse_a_block_that_declares_nothing(probe):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), UndeclaredPreAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=rf"^probe={probe.NAME}: 1 block\(s\) of type UndeclaredPreAct \(1\) declare "
                                          "no block contract"):
        probe.check(net, None)


class LayerScaleBlock(nn.Module):
    """A user's ConvNeXt-style block, ``x + drop_path(gamma * pw(gelu(pw(norm(dw(x))))))``,
    declaring itself: no skipstudy base class, no adapter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.pw1, self.pw2 = nn.Conv2d(channels, 2 * channels, 1), nn.Conv2d(2 * channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))
        self.drop_path = nn.Identity()

    def block_contract(self):
        from skipstudy.models.contract import BlockContract

        return BlockContract(self.dw, self.drop_path, "identity", after="none")

    def forward(self, x):
        out = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))
        return x + self.drop_path(out * self.gamma.view(1, -1, 1, 1))


def test_a_users_own_block_declares_itself():
    def recombine(block, v, u):
        branch = block.pw2(F.gelu(block.pw1(block.norm(block.dw(v))))) * block.gamma.view(1, -1, 1, 1)
        return u + branch, branch, u

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LayerScaleBlock(4), LayerScaleBlock(4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    want = reference(net, x, y, ["1", "2"], lambda block, z: z, recombine)
    taps = LayerTaps(net, blocks=True)
    assert taps.block_names == ["1", "2"]
    assert_same(recorded(taps, net, x, y), want, taps.block_names)

