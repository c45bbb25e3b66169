"""Pre-activation ResNets (He et al. 2016b) and Wide ResNets (Zagoruyko & Komodakis 2016):
parameter counts against the papers (on the meta device: no memory, no arithmetic), the block
equations, the plain twins, the init schemes and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skipstudy import models
from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.models.preact import PreActBasicBlock, PreActBlock, PreActBottleneck


def _count(net: nn.Module, weights_only: bool = False) -> float:
    if weights_only:
        return sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) / 1e6
    return sum(p.numel() for p in net.parameters()) / 1e6


@pytest.mark.parametrize("depth,paper,total", [(164, 1.7, 1.703), (1001, 10.2, 10.328)])
def test_cifar_preact_parameter_counts_match_the_paper(depth, paper, total):
    """He et al. 2016b, Table 2 (CIFAR-10, 1x1 projections): 1.7M and 10.2M. The paper's figures
    are the conv and linear weights (10.18M at depth 1001); BN's scales and shifts add 0.15M."""
    with torch.device("meta"):
        net = models.preact_resnet(10, depth=depth)
    assert round(_count(net, weights_only=True), 1) == paper
    assert round(_count(net), 3) == total
    blocks = [m for m in net.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 3 * (depth - 2) // 9 and all(isinstance(b, PreActBottleneck) for b in blocks)


def test_preact_110_is_basic_blocks_and_the_plain_twin_drops_exactly_the_projections():
    with torch.device("meta"):
        net, plain = models.preact_resnet(10, depth=110), models.preact_resnet(10, depth=110, skip=False)
    blocks = [m for m in net.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 54 and all(isinstance(b, PreActBasicBlock) for b in blocks)
    residual, twin = dict(net.named_parameters()), dict(plain.named_parameters())
    assert set(twin) == {k for k in residual if ".downsample." not in k}
    assert {k for k in residual if ".downsample." in k} == {"layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight"}


@pytest.mark.parametrize("depth,width,paper", [(28, 10, 36.5), (16, 8, 11.0), (40, 4, 8.9)])
def test_wide_resnet_parameter_counts_match_the_paper(depth, width, paper):
    """Zagoruyko & Komodakis 2016, Table 3 and 5 (all parameters)."""
    with torch.device("meta"):
        net = models.wide_resnet(10, depth=depth, width=width, dropout=0.3)
    assert round(_count(net), 1) == paper
    assert net.arch == f"wrn_{depth}_{width}"
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3 * (depth - 4) // 6


@pytest.mark.parametrize("depth,layers,bottleneck", [(18, [2, 2, 2, 2], False), (50, [3, 4, 6, 3], True),
                                                     (152, [3, 8, 36, 3], True)])
def test_imagenet_preact_depths_have_torchvisions_layouts(depth, layers, bottleneck):
    with torch.device("meta"):
        net = models.preact_resnet(10, family="imagenet", depth=depth)
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3, 4)] == layers
    assert isinstance(net.layer1[0], PreActBottleneck if bottleneck else PreActBasicBlock)
    assert net.downsample_factor == 32 and isinstance(net.maxpool, nn.MaxPool2d)


def test_blocks_compute_the_papers_equations_and_the_net_ends_in_bn_relu():
    """Identity block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``; projection block: both
    paths read ``relu(bn1(x))`` (the authors' both_preact); the pooled features are post-ReLU."""
    torch.manual_seed(0)
    net = models.preact_resnet(10, depth=20).train()
    F = nn.functional
    x = torch.randn(4, 16, 8, 8)
    block = net.layer1[1]
    want = x + block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x))))))
    torch.testing.assert_close(block(x.clone()), want)
    block = net.layer2[0]
    t = F.relu(block.bn1(x))
    torch.testing.assert_close(block(x.clone()), block.downsample(t) + block.conv2(F.relu(block.bn2(block.conv1(t)))))
    feats = []
    net.avgpool.register_forward_hook(lambda m, a, o: feats.append(a[0]))
    net(torch.randn(2, 3, 32, 32))
    assert (feats[0] >= 0).all() and [n for n, _ in net.named_children()][-4:] == ["bn_final", "relu", "avgpool", "fc"]


@pytest.mark.parametrize("builder,options", [("preact_resnet", {"depth": 20}),
                                             ("preact_resnet", {"depth": 29, "block": "bottleneck"}),
                                             ("wide_resnet", {"depth": 10, "width": 2})])
@pytest.mark.parametrize("init", ["zero_residual", "skipinit"])
def test_initially_each_block_is_its_shortcut(builder, options, init):
    """zero_residual (each branch's last conv zeroed) and skipinit start every pre-activation
    block as its shortcut: ``x``, or the projection of ``relu(bn1(x))``."""
    torch.manual_seed(0)
    net = getattr(models, builder)(10, init=init, **options).train()
    seen = []
    for block in (m for m in net.modules() if isinstance(m, PreActBlock)):
        block.register_forward_hook(lambda m, a, o: seen.append((m, a[0].detach().clone(), o.detach())))
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    for block, x, y in seen:
        torch.testing.assert_close(y, block.without_branch(x), rtol=0, atol=0)
    assert sum(b.downsample is None for b, _, _ in seen) >= len(seen) - 3


def test_wide_resnet_dropout_sits_between_the_convs():
    net = models.wide_resnet(10, depth=10, width=1, dropout=0.5)
    names = [n for n, _ in net.layer1[0].named_children()]
    assert names == ["bn1", "relu", "conv1", "bn2", "dropout", "conv2"]
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), net(x))  # no dropout in eval mode
    net.train()
    assert not torch.equal(net(x), net(x))


# The declared options (models/options.py), checked as the command line checks them.
@pytest.mark.parametrize("builder,options,message", [
    ("preact_resnet", dict(depth=21),
     "model.depth=21 must be 6n+2 (basic blocks) or 9n+2 >= 164 (bottlenecks) for model.family=cifar"),
    ("preact_resnet", dict(depth=32, block="bottleneck"),
     "model.depth=32 must be 9n+2; the paper's: 164, 1001 with model.block=bottleneck"),
    ("preact_resnet", dict(depth=164, block="basic"), None),
    ("preact_resnet", dict(family="imagenet", depth=20),
     "model.depth=20 is not an ImageNet ResNet depth (model.family=imagenet); valid: 18, 34, 50, 101, 152"),
    ("preact_resnet", dict(family="imagenet", depth=50, block="basic"),
     "model.block=basic does not fit model.depth=50 (model.family=imagenet uses bottleneck)"),
    ("preact_resnet", dict(depth=20, norm="none", init="fixup"),
     "model.init=fixup is defined for post-activation blocks (Zhang et al. 2019), not preact_resnet's "
     "pre-activation ones; use model.init=skipinit"),
    ("wide_resnet", dict(norm="none", init="fixup"), "model.init=fixup is defined for post-activation"),
    ("wide_resnet", dict(depth=27), "model.depth=27 must be 6n+4 >= 10; the paper's: 16, 22, 28, 40"),
    ("wide_resnet", dict(dropout=1.0), "model.dropout=1.0 must be a number in [0, 1)"),
    ("wide_resnet", dict(skip=False, init="zero_residual"), "model.init=zero_residual needs model.skip=true"),
])
def test_refusals_name_the_key_the_value_and_the_fix(builder, options, message):
    if message is None:  # 164 = 6 * 27 + 2: a valid basic-block net, not the paper's bottleneck one
        config.check_group("model", f"skipstudy.models.{builder}", options)
        with torch.device("meta"):
            assert isinstance(getattr(models, builder)(10, **options).layer1[0], PreActBasicBlock)
        return
    with pytest.raises(ConfigError) as info:
        config.check_group("model", f"skipstudy.models.{builder}", options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
