"""The networks (ResNet-18..152 and the CIFAR ResNets as one :class:`ResNet`, and the mini net),
the init schemes (``model.init``) and the builders that ``conf/model/<name>.yaml`` target; their
options' defaults, types and ranges are ``models/options.py``'s, checked by ``skipstudy.config``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skipstudy.models.blocks import NORMS, BasicBlock, Block, Bottleneck, _shift, make_shortcut, make_stage
from skipstudy.models.options import IMAGENET_BLOCKS, CifarResNet, ImageNetResNet, Net, Options


class ResNet(nn.Module):
    """A stem (``imagenet``: 7x7/2 conv + 3x3/2 max-pool; ``cifar``: 3x3/1 conv), one stage per
    entry of ``layers`` (each after the first halves the resolution), global average pool and a
    linear classifier. ``widths`` are the stages' ``planes``."""

    def __init__(self, block: type[Block], layers: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, skip: bool = True, shortcut: str = "B", norm: str = "batch",
                 stem: str = "imagenet", stem_width: int = 64, arch: str = "resnet") -> None:
        super().__init__()
        norm_layer = NORMS[norm]
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7 if big else 3, stride=2 if big else 1,
                               padding=3 if big else 1, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        # The CIFAR stem has no pool; an Identity keeps torchvision's module list.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if big else nn.Identity()
        in_planes = stem_width
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            stage = make_stage(block, in_planes, planes, num_blocks, 1 if i == 0 else 2, skip, shortcut, norm_layer)
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        # Fixup's scalar biases after the stem conv and before the classifier (empty otherwise).
        self.register_parameter("bias1", None)
        self.register_parameter("bias2", None)
        self.num_stages, self.arch, self.stem = len(layers), arch, stem
        # Total stride to the last feature map; check_input_size compares the image size with it.
        self.downsample_factor = (4 if big else 1) * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(_shift(self.bn1(self.conv1(x)), self.bias1)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(_shift(torch.flatten(self.avgpool(x), 1), self.bias2))


class MiniNet(nn.Module):
    """The smallest plain-vs-residual pair: ``block1`` BasicBlock ``in_channels -> 16``, ``block2``
    ``16 -> 32`` with stride 2 (both with 1x1 projection shortcuts), GAP, linear ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 3, skip: bool = True, norm: str = "batch") -> None:
        super().__init__()
        norm_layer = NORMS[norm]
        for name, (cin, cout, stride) in {"block1": (in_channels, 16, 1), "block2": (16, 32, 2)}.items():
            down = make_shortcut(cin, cout, stride, "B", norm_layer) if skip else None
            self.add_module(name, BasicBlock(cin, cout, stride, down, norm_layer, skip=skip))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)
        self.register_parameter("bias2", None)  # Fixup's scalar bias before the classifier
        self.arch, self.downsample_factor = "mini", 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        return self.fc(_shift(torch.flatten(self.avgpool(x), 1), self.bias2))


def apply_init(net: nn.Module, init: str) -> None:
    """Apply ``model.init`` in place, once, right after the build. ``default``: PyTorch's own;
    ``kaiming``: torchvision's ResNet init; ``zero_residual`` (Goyal et al. 2017), ``fixup`` (Zhang
    et al. 2019) and ``skipinit`` (De & Smith 2020) start every block as ``relu(shortcut(x))``
    (their per-block parts are :class:`Block`'s). Fixup also zeroes the classifier and fills the
    net's scalar bias slots after the stem and before the classifier (the paper's rule 3)."""
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    if init == "default":
        return
    if init == "skipinit":
        for block in blocks:
            block.add_branch_scale(0.0)
        return
    with torch.no_grad():  # kaiming: as torchvision's ResNet
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if init == "zero_residual":
        for block in blocks:
            block.zero_init_last()
    elif init == "fixup":
        for block in blocks:
            block.fixup_init(num_branches=len(blocks))
        with torch.no_grad():
            net.fc.weight.zero_()
            net.fc.bias.zero_()
        for name in ("bias1", "bias2"):
            if hasattr(net, name):  # an empty slot (the mini net has no stem, so no bias1)
                setattr(net, name, nn.Parameter(torch.zeros(())))


def build(schema: type[Options], make, options: dict) -> nn.Module:
    """Build with ``make(**options)`` over ``schema``'s defaults (the values are checked already,
    by skipstudy.config), then apply the init scheme."""
    options = dict(schema.model_construct(**options))
    init = options.pop("init")
    net = make(**options)
    apply_init(net, init)
    return net


def mini(num_classes: int, in_channels: int = 3, **options) -> MiniNet:
    """The mini net; options ``skip``, ``norm``, ``init`` (models/options.py Net)."""
    return build(Net, lambda **o: MiniNet(num_classes, in_channels, **o), options)


def cifar_resnet(num_classes: int, in_channels: int = 3, **options) -> ResNet:
    """The CIFAR ResNet of depth 6n+2 (He et al. 2016, sec. 4.2): three stages of n BasicBlocks
    with 16/32/64 filters. Options: models/options.py CifarResNet."""
    def make(depth, **o):
        n = (depth - 2) // 6
        return ResNet(BasicBlock, (n, n, n), (16, 32, 64), num_classes, in_channels, stem="cifar", stem_width=16,
                      arch=f"cifar_resnet{depth}", **o)
    return build(CifarResNet, make, options)


# torchvision's stage layouts of the ImageNet depths (their blocks: options.IMAGENET_BLOCKS), which
# the pre-activation nets of family=imagenet share.
IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _imagenet(depth: int):
    arch, layers = f"resnet{depth}", IMAGENET_LAYERS[depth]
    block = BasicBlock if IMAGENET_BLOCKS[depth] == "basic" else Bottleneck

    def builder(num_classes: int, in_channels: int = 3, **options) -> ResNet:
        def make(**o) -> ResNet:
            return ResNet(block, layers, (64, 128, 256, 512), num_classes, in_channels, arch=arch, **o)
        return build(ImageNetResNet, make, options)
    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = (f"ResNet-{depth} (He et al. 2016): {block.__name__}, stages {'-'.join(map(str, layers))}; "
                       f"options skip, norm, init, stem (models/options.py ImageNetResNet).")
    return builder


resnet18, resnet34, resnet50, resnet101, resnet152 = (_imagenet(depth) for depth in IMAGENET_LAYERS)
