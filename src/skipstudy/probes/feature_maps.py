"""Feature maps: the channel-mean activation after each stage, next to the input image. In a deep
plain twin the late maps go flat or lose the object's layout: whether information survives depth."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.probes.context import ProbeContext, kept_state, panels, require_stages, stages, titled

NAME = "feature_maps"


def check(net: nn.Module, options: Any = None) -> None:
    require_stages(net, NAME)


@torch.no_grad()
def channel_mean_maps(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{stage: (N, H, W) float CPU tensor}``: each stage's output averaged over its channels."""
    maps: dict[str, torch.Tensor] = {}

    def hook(label):
        # Reduced at once: a later in-place op on the same tensor cannot change it.
        return lambda _m, _inp, out: maps.__setitem__(label, out.detach().float().mean(dim=1).cpu())
    with contextlib.ExitStack() as hooks, kept_state(net):
        for label, module in stages(net):
            hooks.enter_context(module.register_forward_hook(hook(label)))
        net(images)
    return maps


def display_images(images: torch.Tensor, mean, std) -> np.ndarray:
    """``(N, H, W, C)`` in [0, 1]: un-normalised, then stretched per image where that does not land
    in [0, 1] (synthetic data)."""
    c = images.shape[1]
    x = images.detach().float().cpu() * torch.tensor(std[:c]).view(1, c, 1, 1) + torch.tensor(mean[:c]).view(1, c, 1, 1)
    out = [img if 0 <= img.min() and img.max() <= 1 else (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
           for img in x]
    return np.stack([img.permute(1, 2, 0).numpy() for img in out])


def plot(images: np.ndarray, maps: dict[str, torch.Tensor], title: str = "") -> Figure:
    """One row per image: the input, then one panel per stage (each with its own colour scale)."""
    n, cols = images.shape[0], 1 + len(maps)
    fig, axes = panels(1.9 * cols, 1.9 * n + 0.5, n, cols, squeeze=False)
    gray = images.shape[-1] == 1
    for i in range(n):
        axes[i, 0].imshow(images[i][..., 0] if gray else images[i], cmap="gray" if gray else None)
        for j, m in enumerate(maps.values(), start=1):
            axes[i, j].imshow(m[i].numpy(), cmap="viridis")
    axes[0, 0].set_title("input")
    for j, (stage, m) in enumerate(maps.items(), start=1):
        axes[0, j].set_title(f"{stage}\n{m.shape[1]}x{m.shape[2]}")
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    return titled(fig, title)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    images = ctx.val_images(options.images, f"probe.images={options.images}")
    maps = channel_mean_maps(ctx.net, images)
    shown = display_images(images, ctx.datamodule.mean, ctx.datamodule.std)
    # Spatial std of each map over its mean magnitude, averaged over images: near 0 where the
    # input's layout is gone, a number the report compares across depths and plain twins.
    contrast = {f"spatial_contrast/{stage}": float((m.flatten(1).std(dim=1, unbiased=False)
                                                    / m.flatten(1).abs().mean(dim=1).clamp_min(1e-12)).mean())
                for stage, m in maps.items()}
    stem = ctx.publish(options, {}, contrast, lambda title: plot(shown, maps, title))
    np.savez_compressed(stem.with_suffix(".npz"), input=shown, **{k: v.numpy() for k, v in maps.items()})
    return contrast
