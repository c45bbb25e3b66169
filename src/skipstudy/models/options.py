"""The model group's keys (``conf/model/``): each option's defaults, types and ranges, declared
here once. The yaml files take these defaults (``overrides.register`` stores each class as a
config node) and the builders in ``resnet.py`` and ``preact.py`` fill in a key left out from
them; the values are checked once, by ``skipstudy.config.check``, before anything is built."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import model_validator

from skipstudy.errors import ConfigError
from skipstudy.keys import Options, key, rule


class Net(Options):
    skip: bool = True            # false: the plain twin (no shortcuts, no projection parameters)
    norm: Literal["batch", "none"] = "batch"
    # default: PyTorch's | kaiming: torchvision's | zero_residual, fixup (norm=none), skipinit: each block
    # starts as relu(shortcut(x)) (resnet.apply_init)
    init: Literal["default", "kaiming", "zero_residual", "fixup", "skipinit"] = "default"

    @model_validator(mode="after")
    def _init_fits(self) -> Net:
        if not self.skip and self.init in ("zero_residual", "fixup", "skipinit"):
            raise ConfigError(f"model.init={self.init} needs model.skip=true: without a shortcut a zeroed branch "
                              "makes every block output a constant; use model.init=default or model.init=kaiming")
        if self.init == "fixup" and isinstance(self, (PreActResNet, WideResNet)):
            raise ConfigError(f"model.init=fixup is defined for post-activation blocks (Zhang et al. 2019), not "
                              f"{'wide' if isinstance(self, WideResNet) else 'preact'}_resnet's pre-activation ones; use model.init=skipinit "
                              "(De & Smith 2020 used it in pre-activation Wide ResNets) or model.init=zero_residual")
        if self.init == "fixup" and self.norm != "none":
            raise ConfigError(f"model.init=fixup needs model.norm=none (got model.norm={self.norm}): Fixup replaces "
                              "normalisation layers; with batch norm use model.init=zero_residual")
        return self


class ImageNetResNet(Net):
    # imagenet: 7x7/2 conv + max-pool (downsamples by 32) | cifar: 3x3/1 conv, no pool (by 8)
    stem: Literal["imagenet", "cifar"] = "imagenet"


class CifarResNet(Net):
    depth: Annotated[int, rule(lambda d: d >= 8 and (d - 2) % 6 == 0)] = key(
        20, valid="6n+2 >= 8; the paper's: 20, 32, 44, 56, 110, 1202", bad=21)
    shortcut: Literal["A", "B"] = "A"  # A: zero-padded identity (the paper's, no parameters) | B: 1x1 projection


class PreActResNet(Net):
    family: Literal["cifar", "imagenet"] = "cifar"  # cifar: 16/32/64 planes | imagenet: 64..512, depths 18-152
    depth: int = key(164, ge=8)    # cifar: 6n+2 (basic) or 9n+2 (bottleneck); the paper's: 110, 164, 1001
    block: Literal["basic", "bottleneck"] | None = None  # null: the paper's (preact.cifar_block)
    shortcut: Literal["B", "A"] = "B"  # B: 1x1 projection where shapes change (the paper's) | A: zero-padded
    stem: Literal["imagenet", "cifar"] | None = None   # null: the family's

    @model_validator(mode="after")
    def _depth_fits(self) -> PreActResNet:
        depth, block = self.depth, self.block
        if self.family == "imagenet":
            if depth not in IMAGENET_BLOCKS:
                raise ConfigError(f"model.depth={depth} is not an ImageNet ResNet depth (model.family=imagenet); "
                                  "valid: 18, 34, 50, 101, 152; e.g. model.depth=50, or model.family=cifar")
            if block not in (None, IMAGENET_BLOCKS[depth]):
                raise ConfigError(f"model.block={block} does not fit model.depth={depth} (model.family=imagenet "
                                  f"uses {IMAGENET_BLOCKS[depth]}); e.g. model.block=null")
            return self
        steps = {"basic": (6, "6n+2; the paper's: 110"), "bottleneck": (9, "9n+2; the paper's: 164, 1001")}
        step, words = steps[cifar_block(depth, block)]
        if (depth - 2) % step or depth < step + 2:
            if block is None:
                raise ConfigError(f"model.depth={depth} must be 6n+2 (basic blocks) or 9n+2 >= 164 (bottlenecks) "
                                  "for model.family=cifar; e.g. model.depth=110, model.depth=164 or model.depth=1001")
            raise ConfigError(f"model.depth={depth} must be {words} with model.block={block}; "
                              f"e.g. model.depth={110 if block == 'basic' else 164}")
        return self


IMAGENET_BLOCKS = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck"}


def cifar_block(depth: int, block: str | None) -> str:
    """``model.block`` of a CIFAR pre-activation net: as given, or (null) the paper's: bottleneck
    for 9n+2 >= 164 (ResNet-164, -1001), else basic for 6n+2 (ResNet-110)."""
    return block or ("bottleneck" if depth >= 164 and (depth - 2) % 9 == 0 else "basic")


class WideResNet(Net):
    depth: Annotated[int, rule(lambda d: d >= 10 and (d - 4) % 6 == 0)] = key(
        28, valid="6n+4 >= 10; the paper's: 16, 22, 28, 40", bad=27)
    width: int = key(10, ge=1)             # k; the paper's: 1, 2, 4, 8, 10, 12
    dropout: float = key(0.0, ge=0, lt=1, eg=0.3)  # between the two convs of each block (the paper's: 0.3)
    shortcut: Literal["B", "A"] = "B"


# By the _target_ of conf/model/<option>.yaml.
MODELS: dict[str | None, type[Options]] = {
    "skipstudy.models.mini": Net, "skipstudy.models.cifar_resnet": CifarResNet,
    **{f"skipstudy.models.resnet{d}": ImageNetResNet for d in (18, 34, 50, 101, 152)},
    "skipstudy.models.preact_resnet": PreActResNet, "skipstudy.models.wide_resnet": WideResNet,
}
