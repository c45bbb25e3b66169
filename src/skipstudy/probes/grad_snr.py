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
from skipstudy.probes.spectra import jackknife_se


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
    """Per layer ``mean``, ``noise``, ``snr`` and ``snr_se`` over the gradients of each part's mean
    loss, taken in the network's current mode. Two passes over the parts (the textbook stable
    variance: deviations from the finished mean, so a small noise on a large mean is not lost to
    cancellation); the second keeps two numbers per part and layer, from which the leave-one-part-out
    SNRs, and so the jackknife's standard error, follow exactly without storing any gradient."""
    layers = layer_parameters(net)
    params = layers["all"]
    index = {id(p): i for i, p in enumerate(params)}
    s = len(parts)

    def gradients(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(False), torch.enable_grad():
            return torch.autograd.grad(cross_entropy(net, x, y), params, materialize_grads=True)

    mean = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in parts:
        for m, g in zip(mean, gradients(x, y)):
            m += g.double() / s
    # Per part i and parameter: e = |g_i - m|^2 and c = <m, m - g_i>.
    e = torch.zeros(s, len(params), dtype=torch.float64, device=params[0].device)
    c = torch.zeros_like(e)
    for i, (x, y) in enumerate(parts):
        for j, (m, g) in enumerate(zip(mean, gradients(x, y))):
            d = m - g.double()
            e[i, j], c[i, j] = d.pow(2).sum(), (m * d).sum()
    e, c, sq_mean = e.cpu().numpy(), c.cpu().numpy(), torch.stack([m.pow(2).sum() for m in mean]).cpu().numpy()
    out = {}
    for name, ps in layers.items():
        idx = [index[id(p)] for p in ps]
        signal, e_l, c_l = float(sq_mean[idx].sum()), e[:, idx].sum(axis=1), c[:, idx].sum(axis=1)
        m2 = float(e_l.sum())
        out[name] = {"mean": math.sqrt(signal), "noise": math.sqrt(m2 / (s - 1)), "snr": ratio(signal, m2 / (s - 1))}
        # Without part i: m_-i = m + (m - g_i) / (s - 1), and the deviations' sum of squares
        # loses e_i * s / (s - 1) (the mean moves too); the SNR of s - 1 parts follows.
        if s >= 3:
            signal_out = signal + 2 * c_l / (s - 1) + e_l / (s - 1) ** 2
            var_out = np.clip(m2 - e_l * s / (s - 1), 0.0, None) / (s - 2)
            leave_out = np.array([ratio(a, b) for a, b in zip(signal_out, var_out)])
            out[name]["snr_se"] = float(jackknife_se(leave_out)) if np.isfinite(leave_out).all() else math.nan
        else:  # the jackknife's s - 1 parts need two for a variance
            out[name]["snr_se"] = math.nan
    return out


def ratio(signal: float, var: float) -> float:
    return signal / var if var > 0 else (math.inf if signal > 0 else math.nan)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    parts = micro_batches(ctx.fixed_batches("train"), options.splits)
    bn, mode = bn_mode(ctx, options)
    with mode:
        stats = split_statistics(ctx.net, parts)
    layers = [name for name in stats if name != "all"]
    result = {}
    for key, name in (("snr_all", "all"), ("snr_first", layers[0]), ("snr_last", layers[-1])):
        result |= {key: stats[name]["snr"], f"{key}_se": stats[name]["snr_se"]}  # each value beside its error
    result["snr_median"] = float(np.median([stats[n]["snr"] for n in layers]))
    record = {"micro_batch": len(parts[0][1]), "micro_batches": len(parts), "bn": bn,
              "layers": [{"name": name, **stats[name]} for name in layers], "all": stats["all"]}
    ctx.publish(options, record, result,
                lambda title: plot(record["layers"], f"{title}, {len(parts)} micro-batches of {record['micro_batch']}"),
                scalars={f"{key}/{name}": stats[name][key] for name in layers for key in ("snr", "snr_se")})
    return result


def plot(layers: list[dict], title: str = "") -> Figure:
    """Left: SNR per layer (forward order) with its standard error. Right: the mean gradient's norm and the noise per layer."""
    fig, (ax_snr, ax_parts) = panels(max(9.0, 4 + 0.12 * len(layers)), 3.6, 1, 2)
    x = np.arange(len(layers))
    ax_snr.errorbar(x, [r["snr"] for r in layers], yerr=[r["snr_se"] for r in layers], marker="o", ms=3, color="C0",
                    capsize=2)  # bars: the jackknife's standard error over the micro-batches
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
