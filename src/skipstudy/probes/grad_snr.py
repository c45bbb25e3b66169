"""Gradient signal-to-noise ratio per layer, from micro-batch splits.

Per-sample gradients are not the training gradients of a network with BN in train mode:
every sample's output depends on its batch's statistics. Micro-batches are: each of the
first ``probe.batches`` training batches (stored order, no augmentation) is split into
``probe.splits`` equal micro-batches of ``m`` images, and the gradient of each micro-batch's
mean loss is taken with BN as training runs it (``probe.bn=train``; running statistics and
modes are restored afterwards). Over the ``S = batches x splits`` micro-batch gradients
``g_1 .. g_S`` of a layer's parameters (weight and bias of every Conv2d and Linear, as the
monitor tracks them; ``all`` for every parameter of the network):

* ``mean`` = ``|g_bar|``, the norm of their mean ``g_bar``;
* ``noise`` = ``sqrt(tr C)``, with ``C`` the unbiased sample covariance of the ``g_j``
  (``sum_j |g_j - g_bar|^2 / (S - 1)``, accumulated with Welford's update, so a small noise
  on a large mean is not lost to cancellation);
* ``snr`` = ``|g_bar|^2 / tr C``: above 1, a micro-batch gradient of ``m`` images points more
  along the mean gradient than away from it. ``|g_bar|^2`` over-estimates the squared true
  mean by ``tr C / S`` on average, so pure noise reads about ``1 / S``, not 0. Identical
  micro-batches give ``inf``.

With per-sample statistics (no BN) the noise of a batch of ``b`` images is ``m / b`` times
that of a micro-batch, so the SNR of a ``b``-image step is about ``b / m`` times the one shown.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.monitor.layers import select_layers
from skipstudy.probes.context import (ProbeContext, check_loss_bn, cross_entropy, int_option, loss_mode,
                                      resolve_loss_bn)

NAME = "grad_snr"


def layer_parameters(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{layer: its trainable parameters}`` for every Conv2d and Linear (forward order), then
    ``all``: every trainable parameter of ``net``."""
    layers = {name: [p for p in net.get_submodule(name).parameters(recurse=False) if p.requires_grad]
              for name in select_layers(net, None)}
    layers = {name: ps for name, ps in layers.items() if ps}
    return layers | {"all": [p for p in net.parameters() if p.requires_grad]}


def micro_batches(batches: list[tuple[torch.Tensor, torch.Tensor]], splits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch cut into ``splits`` micro-batches of ``len(batch) // splits`` images (the rest left out)."""
    out = []
    for x, y in batches:
        m = len(x) // splits
        if m < 1:
            raise ConfigError(f"probe.splits={splits} is more than a batch's {len(x)} images; "
                              f"lower probe.splits or raise dataset.batch_size")
        out += [(x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]) for j in range(splits)]
    return out


def split_statistics(net: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per layer: ``mean`` (``|g_bar|``), ``noise`` (``sqrt(tr C)``) and ``snr`` over the
    gradients of the mean loss of each of ``parts``, taken in the network's current mode."""
    layers = layer_parameters(net)
    params = layers["all"]
    index = {id(p): i for i, p in enumerate(params)}
    mean = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    m2 = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
    with torch.inference_mode(False), torch.enable_grad():
        for count, (x, y) in enumerate(parts, start=1):
            loss = cross_entropy(net, x, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for i, g in enumerate(grads):
                g = torch.zeros_like(mean[i]) if g is None else g.double()
                delta = g - mean[i]
                mean[i] += delta / count
                m2[i] += (delta * (g - mean[i])).sum()
    s = len(parts)
    m2 = m2.cpu()
    sq_mean = torch.stack([m.pow(2).sum() for m in mean]).cpu()
    out = {}
    for name, ps in layers.items():
        idx = [index[id(p)] for p in ps]
        signal, var = float(sq_mean[idx].sum()), float(m2[idx].sum()) / (s - 1)
        snr = signal / var if var > 0 else (math.inf if signal > 0 else math.nan)
        out[name] = {"mean": math.sqrt(signal), "noise": math.sqrt(var), "snr": snr}
    return out


def check(net: nn.Module, options: Any) -> None:
    int_option(options, "splits", 4, low=2)  # the noise is the spread between micro-batches
    check_loss_bn(options)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    splits, bn = int(options.get("splits", 4)), resolve_loss_bn(ctx.net, options)
    batches = ctx.fixed_batches("train")
    parts = micro_batches(batches, splits)
    with loss_mode(ctx.net, bn):
        stats = split_statistics(ctx.net, parts)
    layers = [name for name in stats if name != "all"]
    snrs = np.array([stats[name]["snr"] for name in layers])
    result = {
        "snr_all": stats["all"]["snr"],
        "snr_first": stats[layers[0]]["snr"],
        "snr_last": stats[layers[-1]]["snr"],
        "snr_median": float(np.median(snrs)),
    }
    record = {"splits": splits, "micro_batch": len(parts[0][1]), "micro_batches": len(parts), "bn": bn,
              "layers": [{"name": name, **stats[name]} for name in layers], "all": stats["all"]}
    ctx.publish(NAME, record, result,
                lambda title: plot(record["layers"], f"{title}, {len(parts)} micro-batches of {record['micro_batch']}"),
                scalars={f"snr/{name}": stats[name]["snr"] for name in layers})
    return result


def plot(layers: list[dict], title: str = "") -> Figure:
    """Left: SNR per layer (forward order). Right: the mean gradient's norm and the noise per layer."""
    fig = Figure(figsize=(max(9.0, 4 + 0.12 * len(layers)), 3.6), dpi=90)
    ax_snr, ax_parts = fig.subplots(1, 2)
    x = np.arange(len(layers))
    ax_snr.plot(x, [r["snr"] for r in layers], marker="o", ms=3, color="C0")
    ax_snr.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax_snr.set_ylabel("|mean gradient|^2 / tr(covariance)")
    ax_snr.set_title("gradient signal-to-noise ratio", fontsize=9)
    ax_parts.plot(x, [r["mean"] for r in layers], marker="o", ms=3, label="|mean gradient|")
    ax_parts.plot(x, [r["noise"] for r in layers], marker="s", ms=3, ls="--", label="noise sqrt(tr C)")
    ax_parts.set_title("signal and noise of micro-batch gradients", fontsize=9)
    ax_parts.legend(fontsize=7)
    for ax in (ax_snr, ax_parts):
        ax.set_yscale("log")
        ax.set_xlabel("layer (forward order)")
        if len(layers) <= 30:
            ax.set_xticks(x)
            ax.set_xticklabels([r["name"] for r in layers], rotation=90, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
