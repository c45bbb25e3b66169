"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2) and their plain twins.

A 3x3 conv with 16 filters, then three stages of ``n`` BasicBlocks with 16, 32 and 64
filters on 32, 16 and 8 px maps, global average pool and a linear classifier: 6n+2 weighted
layers. Option A shortcuts (zero-padded identity, parameter-free) are the paper's choice
for these nets and the default; with them the parameter counts match Table 6
(0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M for depths 20, 32, 44, 56, 110, 1202).
"""

from __future__ import annotations

from skipstudy.errors import ConfigError
from skipstudy.models.blocks import BasicBlock
from skipstudy.models.options import check_builder_args
from skipstudy.models.resnet import ResNet, build_resnet

# The depths He et al. 2016 report (Table 6); any 6n+2 >= 8 builds, these are the ones listed.
PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_WIDTHS = (16, 32, 64)


def check_depth(depth: object) -> int:
    """Return ``n`` for a depth of 6n+2, or refuse with the valid depths listed."""
    valid = ", ".join(str(d) for d in PAPER_DEPTHS)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ConfigError(f"model.depth={depth!r} is not an integer; valid: {valid}")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(f"model.depth={depth} is not 6n+2; valid: {valid}")
    return (depth - 2) // 6


def cifar_resnet(
    num_classes: int,
    in_channels: int = 3,
    *,
    depth: int = 20,
    skip: bool = True,
    shortcut: str = "A",
    norm: str = "batch",
    init: str = "default",
    **unknown: object,
) -> ResNet:
    """Build the CIFAR ResNet of ``depth`` = 6n+2 (or its plain twin).

    Args:
        num_classes: classifier outputs (from the dataset).
        in_channels: image channels (from the dataset).
        depth: 6n+2 weighted layers (20, 32, 44, 56, 110, 1202 in the paper; any n >= 1 works).
        skip: ``True`` for the ResNet, ``False`` for the plain net of the same depth.
        shortcut: ``A`` zero-padded identity (paper default, no parameters) or ``B`` 1x1
            projection (+ norm) where shapes change; identity elsewhere in both.
        norm: ``batch`` or ``none``.
        init: ``default | kaiming | zero_residual | fixup | skipinit`` (see ``models.init``).
    """
    check_builder_args("cifar_resnet", num_classes, in_channels, unknown, ("depth", "skip", "shortcut", "norm", "init"))
    n = check_depth(depth)
    return build_resnet(
        f"cifar_resnet{depth}", BasicBlock, (n, n, n), CIFAR_WIDTHS, num_classes, in_channels,
        skip, shortcut, norm, init, stem="cifar", stem_width=16,
    )
