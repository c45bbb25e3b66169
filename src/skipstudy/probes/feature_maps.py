"""Feature maps: the channel-mean activation after each stage, next to the input image.

For a few fixed validation images, a forward hook on every stage module records the stage's
output averaged over channels (one H x W map per image and stage). One row per image: the
input, then one panel per stage. In a deep plain twin the late maps go flat or lose the
object's layout; in the residual net they keep it. That answers, by eye, whether
information survives depth.

Stages are found by name, so every network in ``skipstudy.models`` works without a
registry: the stem output (ResNets: the ``maxpool`` slot, an identity for the CIFAR stem),
then the children called ``layer1``, ``layer2``... (ResNets) or ``block1``, ``block2``... (mini).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.probes.context import ProbeContext, eval_mode

NAME = "feature_maps"
STAGE_NAME = re.compile(r"(layer|block|stage)\d+")


def stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(label, module)`` of every stage in forward order: ``stem`` (if any), then layerN/blockN."""
    children = dict(net.named_children())
    found: list[tuple[str, nn.Module]] = []
    if "conv1" in children and "maxpool" in children:
        found.append(("stem", children["maxpool"]))
    found += [(name, m) for name, m in children.items() if STAGE_NAME.fullmatch(name)]
    return found


def check(net: nn.Module, options: Any = None) -> None:
    if not stages(net):
        raise ConfigError(
            f"probe=feature_maps finds no stages in {getattr(net, 'arch', type(net).__name__)}: it looks for "
            "children named layer1.. or block1.. (and a ResNet stem); use a model from skipstudy.models"
        )


@torch.no_grad()
def channel_mean_maps(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{stage: (N, H, W) float CPU tensor}``: each stage's output averaged over its channels."""
    maps: dict[str, torch.Tensor] = {}
    handles = []
    for label, module in stages(net):
        def hook(_m, _inp, out, label=label):
            # Reduced at once: a later in-place op on the same tensor cannot change it.
            maps[label] = out.detach().float().mean(dim=1).cpu()
        handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(net):
            net(images)
    finally:
        for h in handles:
            h.remove()
    return maps


def display_images(images: torch.Tensor, mean, std) -> np.ndarray:
    """``(N, H, W, C)`` in [0, 1]: un-normalised with the data set's mean/std, then, where that
    does not land in [0, 1] (synthetic data), stretched per image."""
    x = images.detach().float().cpu()
    c = x.shape[1]
    m = torch.tensor(list(mean)[:c] or [0.0] * c).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c] or [1.0] * c).view(1, c, 1, 1)
    x = x * s + m
    out = []
    for img in x:
        if img.min() < 0 or img.max() > 1:
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
        out.append(img.permute(1, 2, 0).numpy())
    return np.stack(out)


def plot(images: np.ndarray, maps: dict[str, torch.Tensor], title: str = "") -> Figure:
    """One row per image: the input, then one panel per stage (each with its own colour scale)."""
    n, cols = images.shape[0], 1 + len(maps)
    fig = Figure(figsize=(1.9 * cols, 1.9 * n + 0.5), dpi=90)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        img = images[i]
        axes[i, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        for j, (label, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(m[i].numpy(), cmap="viridis")
            if i == 0:
                axes[i, j].set_title(f"{label}\n{m.shape[1]}x{m.shape[2]}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def spatial_contrast(maps: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per stage: spatial std of the channel-mean map over its mean magnitude, averaged over images.

    Near 0 when a stage's map is flat (the layout of the input is gone); a scalar the report
    can compare across depths and between a net and its plain twin.
    """
    out = {}
    for label, m in maps.items():
        flat = m.flatten(1)
        out[label] = float((flat.std(dim=1, unbiased=False) / flat.abs().mean(dim=1).clamp_min(1e-12)).mean())
    return out


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    """Feature maps of the first ``probe.images`` validation images; PNG, ``.npz``, TensorBoard."""
    check(ctx.net)
    config.check_probe(NAME, options)
    count = options.get("images", 4)
    batch_size = getattr(ctx.datamodule, "batch_size", None)
    needed = -(-count // batch_size) if isinstance(batch_size, int) and batch_size > 0 else None
    images = torch.cat([x for x, _ in ctx.fixed_batches("val", batches=needed)])[:count]
    maps = channel_mean_maps(ctx.net, images)
    dm = ctx.datamodule
    shown = display_images(images, getattr(dm, "mean", ()), getattr(dm, "std", ()))
    arch = getattr(ctx.net, "arch", type(ctx.net).__name__)
    skip = ctx.model.get("skip")
    title = f"{arch}{'' if skip is None else (' (skip)' if skip else ' (plain)')}, step {ctx.step}"
    stem = ctx.stem(NAME)
    fig = plot(shown, maps, title)
    ctx.figure(fig, stem.with_suffix(".png"), f"probe/{NAME}")
    np.savez_compressed(stem.with_suffix(".npz"), input=shown, **{k: v.numpy() for k, v in maps.items()})
    contrast = spatial_contrast(maps)
    ctx.scalars({f"probe/{NAME}/spatial_contrast/{k}": v for k, v in contrast.items()})
    return {f"spatial_contrast/{k}": v for k, v in contrast.items()}
