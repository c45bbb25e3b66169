"""Skip-configurable networks: builders ``fn(num_classes, in_channels=3, **options) -> nn.Module``.

Blocks in ``blocks.py`` (where a new block type starts), networks and builders in ``resnet.py``,
init schemes in ``init.py``. Every network has ``arch`` (its name) and ``downsample_factor``
(total stride) attributes.
"""

from __future__ import annotations

from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.resnet import cifar_resnet, mini, resnet18, resnet34, resnet50, resnet101, resnet152


def check_input_size(model: nn.Module, image_size: int | tuple[int, int]) -> None:
    """Refuse images smaller than the network's total downsampling (its last map would be < 1 px
    of real content). ``image_size`` is the side length, or ``(height, width)``."""
    factor = getattr(model, "downsample_factor", 1)
    side = min(image_size) if isinstance(image_size, (tuple, list)) else image_size
    if side < factor:
        hint = " or model.stem=cifar" if getattr(model, "stem", None) == "imagenet" else ""
        name = getattr(model, "arch", type(model).__name__)
        raise ConfigError(f"dataset.image_size={image_size} is too small for {name} (downsamples by {factor}); "
                          f"use >= {factor}{hint}")


__all__ = ["check_input_size", "cifar_resnet", "mini", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
