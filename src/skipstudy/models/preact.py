"""Pre-activation ResNets (He et al. 2016b, "Identity Mappings in Deep Residual Networks") and
Wide ResNets (Zagoruyko & Komodakis 2016, whose blocks are pre-activation ones).

A pre-activation block is ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``: nothing after the
addition, so the identity path runs from the stem to the final BN-ReLU untouched. Where the
shortcut is a projection, it reads the same pre-activated tensor as the branch (the authors'
``both_preact`` blocks; also Zagoruyko's and timm's), and it has no norm of its own. The
plain twin (``skip=False``) is the same net without the additions and the projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import NORMS, Block, NormLayer, _redefines_forward, make_stage
from skipstudy.models.contract import BlockContract
from skipstudy.models import options as declared
from skipstudy.models.resnet import IMAGENET_LAYERS, build


class PreActBlock(Block):
    """``[shortcut(x) or shortcut(relu(bn1(x)))] + branch``, the branch being norm-ReLU-conv
    triples, an optional dropout before the last conv (Wide ResNets), no ReLU after the sum."""

    shortcut_norm = False

    def __init__(self, convs: list[nn.Conv2d], norm_layer: NormLayer, downsample: nn.Module | None,
                 stride: int, skip: bool, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not Block's: the norms come before their convs
        for i, conv in enumerate(convs, start=1):
            setattr(self, f"bn{i}", norm_layer(conv.in_channels))
            if i == 1:
                # In place only after a real norm: with norm=none bn1 hands on the block input itself,
                # which the shortcut still needs.
                self.relu = nn.ReLU(inplace=not isinstance(self.bn1, nn.Identity))
            if i == len(convs) and dropout > 0:
                self.dropout = nn.Dropout(dropout)  # Zagoruyko & Komodakis: between the convs, after the ReLU
            setattr(self, f"conv{i}", conv)
        if not dropout > 0:
            self.dropout = None
        self.downsample = downsample
        self.stride, self.skip, self.depth = stride, skip, len(convs)
        self.register_parameter("scale", None)

    @property
    def fixup_bias_names(self) -> list[str]:
        return []

    @property
    def shares_preactivation(self) -> bool:
        """Whether the shortcut reads ``relu(bn1(x))`` (a projection) rather than ``x``."""
        return self.skip and self.downsample is not None

    def branch_exit(self) -> nn.Module:
        return self.branch_convs()[-1]

    def block_contract(self) -> BlockContract | None:
        """Branch from ``bn1`` (from ``conv1`` where the projection shares ``relu(bn1(x))``) to
        the last conv; nothing after the addition."""
        if _redefines_forward(type(self)):
            return None
        shared = self.shares_preactivation
        return BlockContract(self.conv1 if shared else self.bn1, self.branch_exit(), self.shortcut_kind,
                             self.downsample if self.skip else None, shared=shared, after="none")

    def shortcut_term(self, u: torch.Tensor) -> torch.Tensor:
        """The shortcut's part of the output from what it reads (``x``, or ``relu(bn1(x))`` for a
        projection); the paths probe detaches ``u`` here."""
        return u if self.downsample is None else self.downsample(u)

    def without_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its branch deleted: ``x``, or the projection of ``relu(bn1(x))``."""
        return self.shortcut_term(self.relu(self.bn1(x)) if self.shares_preactivation else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        for i in range(2, self.depth + 1):
            out = self.relu(getattr(self, f"bn{i}")(out))
            if i == self.depth and self.dropout is not None:
                out = self.dropout(out)
            out = getattr(self, f"conv{i}")(out)
        if self.scale is not None:
            out = out * self.scale
        if self.skip:
            out = out + self.shortcut_term(pre if self.shares_preactivation else x)
        return out

    def fixup_init(self, num_branches: int) -> None:
        raise ConfigError("model.init=fixup is defined for post-activation blocks (Zhang et al. 2019); "
                          "for pre-activation blocks use model.init=skipinit or model.init=zero_residual")


class PreActBasicBlock(PreActBlock):
    """Two 3x3 convs, each after BN-ReLU (the CIFAR ResNet-110 and Wide ResNet blocks)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d, *, skip: bool = True, dropout: float = 0.0) -> None:
        super().__init__([conv3x3(in_planes, planes, stride), conv3x3(planes, planes)],
                         norm_layer, downsample, stride, skip, dropout)


class PreActBottleneck(PreActBlock):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, each after BN-ReLU (ResNet-164, -1001)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d, *, skip: bool = True, dropout: float = 0.0) -> None:
        super().__init__([conv1x1(in_planes, planes), conv3x3(planes, planes, stride),
                          conv1x1(planes, planes * self.expansion)], norm_layer, downsample, stride, skip, dropout)


class PreActResNet(nn.Module):
    """A stem conv (``imagenet``: 7x7/2 + 3x3/2 max-pool, as timm's ResNetV2; ``cifar``: 3x3/1),
    no norm in it (each block normalises its own input), the stages, the final BN-ReLU
    (``bn_final``, ``relu``), global average pool and ``fc``."""

    def __init__(self, block: type[PreActBlock], layers: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, skip: bool = True, shortcut: str = "B", norm: str = "batch",
                 stem: str = "cifar", stem_width: int = 16, arch: str = "preact_resnet", dropout: float = 0.0) -> None:
        super().__init__()
        norm_layer = NORMS[norm]
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7 if big else 3, stride=2 if big else 1,
                               padding=3 if big else 1, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if big else nn.Identity()
        in_planes = stem_width
        options = {"dropout": dropout} if dropout > 0 else {}
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            stage = make_stage(block, in_planes, planes, num_blocks, 1 if i == 0 else 2, skip, shortcut,
                               norm_layer, **options)
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes * block.expansion
        self.bn_final = norm_layer(in_planes)
        self.relu = nn.ReLU(inplace=not isinstance(self.bn_final, nn.Identity))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_stages, self.arch, self.stem = len(layers), arch, stem
        self.downsample_factor = (4 if big else 1) * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


def preact_resnet(num_classes: int, in_channels: int = 3, **options) -> PreActResNet:
    """Pre-activation ResNet (He et al. 2016b). ``family=cifar``: 3 stages of 16/32/64 planes,
    depth 6n+2 (basic blocks) or 9n+2 (bottlenecks, 64/128/256 channels out); ``family=imagenet``:
    depths 18-152 with torchvision's layouts. Options: models/options.py PreActResNet."""
    def make(depth, family, block, stem, **o):
        if family == "imagenet":
            kind, layers = declared.IMAGENET_BLOCKS[depth], IMAGENET_LAYERS[depth]
            return PreActResNet(BLOCKS[kind], layers, (64, 128, 256, 512), num_classes, in_channels,
                                stem=stem or "imagenet", stem_width=64, arch=f"preact_resnet{depth}", **o)
        kind = declared.cifar_block(depth, block)
        n = (depth - 2) // (6 if kind == "basic" else 9)
        return PreActResNet(BLOCKS[kind], (n, n, n), (16, 32, 64), num_classes, in_channels, stem=stem or "cifar",
                            stem_width=16, arch=f"preact_resnet{depth}", **o)
    return build(declared.PreActResNet, make, options)


def wide_resnet(num_classes: int, in_channels: int = 3, **options) -> PreActResNet:
    """WRN-d-k (Zagoruyko & Komodakis 2016): depth 6n+4, 3 stages of n pre-activation basic
    blocks with 16k/32k/64k filters, dropout between the convs. Options: models/options.py WideResNet."""
    def make(depth, width, **o):
        n = (depth - 4) // 6
        return PreActResNet(PreActBasicBlock, (n, n, n), (16 * width, 32 * width, 64 * width), num_classes,
                            in_channels, stem="cifar", stem_width=16, arch=f"wrn_{depth}_{width}", **o)
    return build(declared.WideResNet, make, options)
