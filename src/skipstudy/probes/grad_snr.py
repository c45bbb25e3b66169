"""Gradient signal-to-noise ratio per layer, ``|g_bar|^2 / tr C`` over micro-batch gradients
(micro-batches, not samples: with train-mode BN a sample's gradient depends on its batch). Pure
noise reads about ``1 / S`` for ``S`` micro-batches, not 0; without BN the SNR of a ``b``-image
step is about ``b / m`` times that of ``m``-image micro-batches."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.monitor.layers import select_layers
from skipstudy.probes.context import Batches, ProbeContext, bn_mode, cross_entropy, panels, titled


def layer_parameters(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{layer: its trainable parameters}`` per Conv2d and Linear in forward order, then ``all``."""
    layers = {name: [p for p in net.get_submodule(name).parameters(recurse=False) if p.requires_grad]
              for name in select_layers(net, None)}
    return {name: ps for name, ps in layers.items() if ps} | {"all": [p for p in net.parameters() if p.requires_grad]}


def micro_batches(batches: Batches, splits: int) -> Batches:
    """Each batch cut into ``splits`` micro-batches of ``len(batch) // splits`` images (the rest left out)."""
    out = []
    for x, y in batches:
        m = len(x) // splits
        if m < 1:
            raise ConfigError(f"probe.splits={splits} is more than a batch's {len(x)} images; "
                              f"lower probe.splits or raise dataset.batch_size")
        out += [(x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]) for j in range(splits)]
    return out


def split_statistics(net: nn.Module, parts: Batches) -> dict[str, dict[str, float]]:
    """Per layer ``mean``, ``noise`` and ``snr`` over the gradients of each part's mean loss, taken
    in the network's current mode. Welford's update keeps a small noise on a large mean from
    being lost to cancellation."""
    layers = layer_parameters(net)
    params = layers["all"]
    index = {id(p): i for i, p in enumerate(params)}
    mean = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    m2 = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
    with torch.inference_mode(False), torch.enable_grad():
        for count, (x, y) in enumerate(parts, start=1):
            for i, g in enumerate(torch.autograd.grad(cross_entropy(net, x, y), params, materialize_grads=True)):
                delta = g.double() - mean[i]
                mean[i] += delta / count
                m2[i] += (delta * (g.double() - mean[i])).sum()
    m2, sq_mean = m2.cpu(), torch.stack([m.pow(2).sum() for m in mean]).cpu()
    out = {}
    for name, ps in layers.items():
        idx = [index[id(p)] for p in ps]
        signal, var = float(sq_mean[idx].sum()), float(m2[idx].sum()) / (len(parts) - 1)
        snr = signal / var if var > 0 else (math.inf if signal > 0 else math.nan)
        out[name] = {"mean": math.sqrt(signal), "noise": math.sqrt(var), "snr": snr}
    return out


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    parts = micro_batches(ctx.fixed_batches("train"), options.splits)
    bn, mode = bn_mode(ctx, options)
    with mode:
        stats = split_statistics(ctx.net, parts)
    layers = [name for name in stats if name != "all"]
    result = {"snr_all": stats["all"]["snr"], "snr_first": stats[layers[0]]["snr"],
              "snr_last": stats[layers[-1]]["snr"], "snr_median": float(np.median([stats[n]["snr"] for n in layers]))}
    record = {"micro_batch": len(parts[0][1]), "micro_batches": len(parts), "bn": bn,
              "layers": [{"name": name, **stats[name]} for name in layers], "all": stats["all"]}
    ctx.publish(options, record, result,
                lambda title: plot(record["layers"], f"{title}, {len(parts)} micro-batches of {record['micro_batch']}"),
                scalars={f"snr/{name}": stats[name]["snr"] for name in layers})
    return result


def plot(layers: list[dict], title: str = "") -> Figure:
    """Left: SNR per layer (forward order). Right: the mean gradient's norm and the noise per layer."""
    fig, (ax_snr, ax_parts) = panels(max(9.0, 4 + 0.12 * len(layers)), 3.6, 1, 2)
    x = np.arange(len(layers))
    ax_snr.plot(x, [r["snr"] for r in layers], marker="o", ms=3, color="C0")
    ax_snr.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax_snr.set(title="gradient signal-to-noise ratio", ylabel="|mean gradient|^2 / tr(covariance)")
    ax_parts.plot(x, [r["mean"] for r in layers], marker="o", ms=3, label="|mean gradient|")
    ax_parts.plot(x, [r["noise"] for r in layers], marker="s", ms=3, ls="--", label="noise sqrt(tr C)")
    ax_parts.set(title="signal and noise of micro-batch gradients")
    ax_parts.legend(fontsize=7)
    for ax in (ax_snr, ax_parts):
        ax.set(yscale="log", xlabel="layer (forward order)")
        if len(layers) <= 30:
            ax.set_xticks(x, [r["name"] for r in layers], rotation=90, fontsize=6)
    return titled(fig, title)
