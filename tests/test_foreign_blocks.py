"""Other people's blocks handed to the monitor and the lesion and paths probes as they are: timm's ResNet blocks and ConvNeXt
blocks (``shortcut + drop_path(gamma * branch(x))``), each through its declared adapter
(``skipstudy.models.contract.ADAPTERS``), against autograd through the block written by hand
from timm's own ``forward``. Skipped where timm (a dev extra) is not installed."""

from __future__ import annotations

import warnings

import pytest
import torch

from skipstudy.monitor import GradientFlowMonitor, LayerTaps
from test_block_contract import assert_same, recorded, reference

timm = pytest.importorskip("timm")
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402


def _same(block, x):
    return x


def _timm_resnet(block, v, u):
    """timm's BasicBlock/Bottleneck forward (no SE, drop_block, aa or drop_path in these nets)."""
    out = block.act1(block.bn1(block.conv1(v)))
    if isinstance(block, Bottleneck):
        out = block.act2(block.bn2(block.conv2(out)))
        branch = block.bn3(block.conv3(out))
    else:
        branch = block.bn2(block.conv2(out))
    short = u if block.downsample is None else block.downsample(u)
    act = block.act3 if isinstance(block, Bottleneck) else block.act2
    return act(branch + short), branch, short


def _convnext(block, v, u):
    """timm's ConvNeXtBlock forward, both MLP layouts; nothing after the addition."""
    out = block.conv_dw(v)
    if block.use_conv_mlp:
        out = block.mlp(block.norm(out))
    else:
        out = block.mlp(block.norm(out.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    branch = block.drop_path(out.mul(block.gamma.reshape(1, -1, 1, 1)))
    short = block.shortcut(u)
    return branch + short, branch, short


def _names(net, cls) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, cls)]


def _check(net, cls, recombine, x, y):
    torch.manual_seed(1)
    names = _names(net, cls)
    want = reference(net, x, y, names, _same, recombine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared through an adapter: no warning
        taps = LayerTaps(net, blocks=True)
    assert taps.block_names == names
    got = recorded(taps, net, x, y)
    assert_same(got, want, names)
    taps.remove()
    return got


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck], ids=["basic", "bottleneck"])
def test_timm_resnet_blocks_match_autograd(block):
    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes each branch's last BN by default, leaving nothing to split.
    net = ResNet(block, (1, 2, 1, 1), num_classes=3, channels=(4, 8, 8, 8), zero_init_last=False).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    got = _check(net, block, _timm_resnet, x, y)
    assert "grad_split/shortcut/layer2.0" in got  # the projection block


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_mlp", "conv_mlp"])
def test_timm_convnext_blocks_match_autograd(conv_mlp):
    from timm.models.convnext import ConvNeXtBlock

    torch.manual_seed(0)
    # ls_init_value=0.5: timm's 1e-6 makes the branch's gradient 1e-6 of the shortcut's, a
    # cosine of three norms then has no digits left (quantities.split_shortcut).
    net = ConvNeXt(num_classes=3, depths=(2, 1, 1, 1), dims=(8, 16, 16, 16), ls_init_value=0.5,
                   conv_mlp=conv_mlp).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    got = _check(net, ConvNeXtBlock, _convnext, x, y)
    assert len([k for k in got if k.startswith("spp/branch_var/")]) == 5


def test_monitor_finds_convnext_blocks_in_a_timm_model():
    """``timm.create_model`` (no weights) handed to the Lightning callback's taps: every
    ConvNeXt block is measured, none named as undeclared."""
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    monitor = GradientFlowMonitor(blocks=True)
    monitor.resolve(net)  # refuses undeclared blocks before training; none here
    taps = LayerTaps(net, blocks=True)
    assert len(taps.block_names) == 2 + 2 + 6 + 2
    taps.remove()


def _path_reference(net, cls, recombine, x, y, chosen):
    """Per image, the gradient norm at the first block's input through the path taking the
    branches of ``chosen``: each block's output replaced by its hand-written equation with the
    part not taken reading a detached copy of the block's input."""
    names, leaf = _names(net, cls), {}

    def first_input(_module, args):
        leaf["x"] = args[0].detach().requires_grad_()
        return (leaf["x"],)

    def by_equation(name):
        def hook(block, args, _out):
            z = args[0]
            v, u = (z, z.detach()) if name in chosen else (z.detach(), z)
            return recombine(block, v, u)[0]
        return hook

    handles = [net.get_submodule(names[0]).register_forward_pre_hook(first_input)]
    handles += [net.get_submodule(n).register_forward_hook(by_equation(n)) for n in names]
    loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
    for h in handles:
        h.remove()
    return torch.autograd.grad(loss, leaf["x"])[0].flatten(1).double().norm(dim=1)


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "convnext"])
def test_timm_blocks_lesion_and_paths_match_their_equations(kind):
    """The lesion probe deletes a timm block as ``act(shortcut(x))`` (ResNet) or ``shortcut(x)``
    (ConvNeXt, its shortcut an ``nn.Identity`` it calls); the paths probe's gradient of a path
    equals autograd through the blocks written from timm's ``forward``."""
    from timm.models.convnext import ConvNeXtBlock

    from skipstudy.probes import lesion, paths

    torch.manual_seed(0)
    if kind == "convnext":
        cls, recombine = ConvNeXtBlock, _convnext
        net = ConvNeXt(num_classes=3, depths=(2, 1, 1, 1), dims=(8, 16, 16, 16), ls_init_value=0.5)
    else:
        cls, recombine = {"basic": BasicBlock, "bottleneck": Bottleneck}[kind], _timm_resnet
        net = ResNet(cls, (1, 2, 1, 1), num_classes=3, channels=(4, 8, 8, 8), zero_init_last=False)
    net = net.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    names = _names(net, cls)
    assert [n for n, _ in paths.residual_blocks(net)] == names
    lesion.check(net)
    paths.check(net, None)
    with torch.no_grad():
        for n in names:
            block = net.get_submodule(n)
            z = torch.randn(2, (block.conv_dw if kind == "convnext" else block.conv1).in_channels, 8, 8)
            short = recombine(block, z, z)[2]
            want = short if kind == "convnext" else (block.act3 if kind == "bottleneck" else block.act2)(short.clone())
            torch.testing.assert_close(lesion.DeletedBranch(block)(z), want, rtol=0, atol=0)
    n = len(names)
    for chosen in [(), tuple(range(n)), (0,), (n - 1,), (1, n - 2)]:
        picked = [names[i] for i in chosen]
        got = paths.path_gradient_norms(net, [(x, y)], picked)
        want = _path_reference(net, cls, recombine, x, y, set(picked))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_timm_resnet_with_another_activation_declares_nothing():
    """The adapter's ``after="relu"`` would be false for a GELU after the addition: such a
    block declares nothing, so the lesion probe refuses it instead of applying a ReLU."""
    from skipstudy.errors import ConfigError
    from skipstudy.probes import lesion

    net = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=3, channels=(4, 8, 8, 8), act_layer="gelu")
    with pytest.raises(ConfigError, match=r"^probe=lesion: 4 block\(s\) of type BasicBlock"):
        lesion.check(net)
