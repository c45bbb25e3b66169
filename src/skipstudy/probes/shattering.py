"""Shattered gradients (Balduzzi et al. 2017, "The Shattered Gradients Problem").

Along a line of ``probe.points`` inputs interpolating two validation images,
``x(t) = (1 - t) x0 + t x1``, the gradient of one fixed logit with respect to the input is
computed at every point. Its autocorrelation along the line says how "shattered" the
gradient is: in a deep plain net neighbouring gradients are nearly unrelated (white noise,
correlation decaying like 2^-L with depth L), in a residual net they stay correlated
(decaying like 1/sqrt(L)).

The autocorrelation of the gradient sequence ``g_0 .. g_{P-1}`` (each a vector over the
input's pixels) is the multivariate one: mean over the line removed, then
``R(k) = sum_i <g_i, g_{i+k}> / sum_i <g_i, g_i>`` (the biased estimator, so ``R(0) = 1``
and ``|R(k)| <= 1``). The correlation length is the first lag where ``R`` falls below 1/e,
linearly interpolated between lags (``P`` if it never does).

Batch norm: every point's gradient must be its own, so BN runs in eval mode. A trained
network uses its running statistics. At initialisation these are still 0/1 (BN would be an
identity), so the probe first calibrates them (then restores them) with one pass over the
line's inputs in train mode (``probe.bn=auto``; ``eval``/``calibrate`` force either).

``python -m skipstudy.probe -m probe=shattering model=cifar_resnet model.depth=20,56,110
model.skip=true,false`` probes freshly initialised networks, one job each; at the end of the
sweep :func:`comparison_figure` draws all of them in one figure
(``<sweep>/probes/shattering/shattering_comparison.png``, see :mod:`skipstudy.probes.comparison`).
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from torch import nn

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.probes.comparison import label as _label
from skipstudy.probes.context import ProbeContext, depth_of, eval_bn

NAME = "shattering"
THRESHOLD = math.exp(-1.0)


def line_inputs(x0: torch.Tensor, x1: torch.Tensor, points: int) -> torch.Tensor:
    """``points`` inputs evenly spaced from ``x0`` (t=0) to ``x1`` (t=1), stacked on dim 0."""
    t = torch.linspace(0.0, 1.0, points, device=x0.device, dtype=x0.dtype).view(-1, *([1] * x0.dim()))
    return (1 - t) * x0.unsqueeze(0) + t * x1.unsqueeze(0)


def input_gradients(net: nn.Module, inputs: torch.Tensor, logit: int, chunk: int = 64) -> torch.Tensor:
    """``(P, D)``: gradient of ``net(x)[logit]`` w.r.t. each input ``x`` (flattened), float64 on the CPU.

    The network must treat samples independently (eval-mode BN): then the gradient of the
    summed logit of a chunk is every sample's own gradient.
    """
    grads = []
    with torch.inference_mode(False), torch.enable_grad():
        for part in inputs.split(chunk):
            x = part.detach().clone().requires_grad_(True)
            out = net(x)
            (g,) = torch.autograd.grad(out[:, logit].sum(), x)
            grads.append(g.flatten(1).double().cpu())
    return torch.cat(grads)


def autocorrelation(grads: torch.Tensor) -> torch.Tensor:
    """Normalised autocorrelation ``R(0..P-1)`` of a ``(P, D)`` sequence along dim 0 (``R(0) = 1``).

    A sequence that does not change along the line is perfectly correlated: all ones.
    """
    g = grads.double()
    g = g - g.mean(dim=0, keepdim=True)
    p = g.shape[0]
    spectrum = torch.fft.rfft(g, n=2 * p, dim=0)  # zero-padded: linear, not circular, correlation
    s = torch.fft.irfft(spectrum.abs() ** 2, n=2 * p, dim=0)[:p].sum(dim=1)
    if not s[0] > 1e-300:
        return torch.ones(p, dtype=torch.float64)
    return s / s[0]


def correlation_length(acf: torch.Tensor | np.ndarray, threshold: float = THRESHOLD) -> float:
    """First lag where ``acf`` drops below ``threshold``, interpolated linearly; ``len(acf)`` if never."""
    r = np.asarray(acf, dtype=np.float64)
    below = np.flatnonzero(r < threshold)
    if below.size == 0:
        return float(len(r))
    k = int(below[0])
    if k == 0:
        return 0.0
    return float(k - 1 + (r[k - 1] - threshold) / (r[k - 1] - r[k]))


def check(net: nn.Module, options: Any) -> None:
    config.check_probe(NAME, options)
    logit = options.get("logit", 0)
    classes = getattr(getattr(net, "fc", None), "out_features", None)
    if classes is not None and logit >= classes:  # the range the network sets
        raise ConfigError(f"probe.logit={logit!r} must be a class index in [0, {classes}); e.g. probe.logit=0")


def _images(ctx: ProbeContext, indices: list[int]) -> list[torch.Tensor]:
    batch_size = getattr(ctx.datamodule, "batch_size", None)
    needed = max(indices) // batch_size + 1 if isinstance(batch_size, int) and batch_size > 0 else None
    images = torch.cat([x for x, _ in ctx.fixed_batches("val", batches=needed)])
    if max(indices) >= len(images):
        raise ConfigError(f"probe.pair={indices}: the validation split has only {len(images)} images")
    return [images[i] for i in indices]


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    points, logit = int(options.get("points", 256)), int(options.get("logit", 0))
    chunk = int(options.get("chunk", 64))
    pair = [int(i) for i in options.get("pair", [0, 1])]
    x0, x1 = _images(ctx, pair)
    inputs = line_inputs(x0, x1, points)

    bn, bn_context = eval_bn(ctx, options, inputs, chunk)
    with bn_context:
        grads = input_gradients(ctx.net, inputs, logit, chunk)

    acf = autocorrelation(grads)
    length = correlation_length(acf)
    result = {
        "corr_length": length,
        "corr_length_frac": length / (points - 1),
        "acf_lag1": float(acf[1]),
    }
    record = {
        "arch": getattr(ctx.net, "arch", type(ctx.net).__name__),
        "depth": depth_of(ctx.net),
        "points": points, "logit": logit, "pair": pair, "bn": bn, "threshold": THRESHOLD,
        **result,
        "grad_norm_mean": float(grads.norm(dim=1).mean()),
        "acf": [float(v) for v in acf],
    }
    stem = ctx.stem(NAME)
    ctx.write_json(stem.with_suffix(".json"), record, summary=result)
    np.save(stem.with_suffix(".npy"), acf.numpy())
    ctx.figure(plot_run(grads, acf, length, title=f"{_label(record | {'model': ctx.model}, with_depth=True)}, step {ctx.step}"),
               stem.with_suffix(".png"), f"probe/{NAME}")
    ctx.scalars({f"probe/{NAME}/{k}": v for k, v in result.items()})
    return result


# -- figures ------------------------------------------------------------------------------

def plot_run(grads: torch.Tensor, acf: torch.Tensor, length: float, title: str = "") -> Figure:
    """Left: the gradient along the line at the three input coordinates that vary most.
    Right: the autocorrelation with the 1/e threshold and the correlation length."""
    fig = Figure(figsize=(9, 3.2), dpi=90)
    ax_g, ax_r = fig.subplots(1, 2)
    t = np.linspace(0, 1, grads.shape[0])
    top = torch.topk(grads.var(dim=0), k=min(3, grads.shape[1])).indices
    for d in top.tolist():
        ax_g.plot(t, grads[:, d].numpy(), lw=0.8)
    ax_g.set_xlabel("t (x0 -> x1)")
    ax_g.set_ylabel("d logit / d input")
    ax_g.set_title("gradient along the line (3 coordinates)", fontsize=9)
    lags = np.arange(len(acf) // 2 + 1)
    ax_r.plot(lags, acf.numpy()[: len(lags)], lw=1.2)
    ax_r.axhline(THRESHOLD, color="gray", ls=":", lw=0.8)
    if length < len(acf):
        ax_r.axvline(length, color="C3", ls="--", lw=0.8, label=f"corr. length {length:.1f}")
        ax_r.legend(fontsize=8)
    ax_r.set_xlabel("lag (points)")
    ax_r.set_ylabel("autocorrelation")
    ax_r.set_title("autocorrelation of the gradient", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def comparison_figure(records: list[dict]) -> Figure:
    """Correlation length and lag-1 autocorrelation against depth, one line per kind of net
    (skip / plain, norm, init); and every run's autocorrelation, coloured by depth."""
    fig = Figure(figsize=(13, 3.8), dpi=90)
    ax_len, ax_lag1, ax_acf = fig.subplots(1, 3)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    for i, (label, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["depth"])
        depths = [r["depth"] for r in rs]
        style = "-" if "plain" not in label.split() else "--"
        ax_len.plot(depths, [r["corr_length"] for r in rs], style, marker="o", color=f"C{i}", label=label)
        ax_lag1.plot(depths, [r["acf_lag1"] for r in rs], style, marker="o", color=f"C{i}", label=label)
    all_depths = sorted({r["depth"] for r in records})
    cmap = matplotlib.colormaps["viridis"]
    for r in sorted(records, key=lambda r: (r["depth"], _label(r))):
        shade = cmap(all_depths.index(r["depth"]) / max(1, len(all_depths) - 1))
        acf = np.asarray(r["acf"])
        lags = np.arange(len(acf) // 2 + 1)
        style = "--" if "plain" in _label(r).split() else "-"
        ax_acf.plot(lags, acf[: len(lags)], style, color=shade, lw=1, label=f"{_label(r)} {r['depth']}")
    ax_acf.axhline(THRESHOLD, color="gray", ls=":", lw=0.8)
    ax_len.set_xlabel("depth (weighted layers)")
    ax_len.set_ylabel("correlation length (points, 1/e)")
    ax_len.set_yscale("log")
    ax_len.yaxis.set_major_formatter(ScalarFormatter())
    ax_len.yaxis.set_minor_formatter(ScalarFormatter())
    ax_len.set_title("correlation length of input gradients", fontsize=9)
    ax_lag1.set_xlabel("depth (weighted layers)")
    ax_lag1.set_ylabel("autocorrelation at lag 1")
    ax_lag1.set_title("neighbouring gradients' correlation", fontsize=9)
    ax_acf.set_xlabel("lag (points)")
    ax_acf.set_ylabel("autocorrelation")
    ax_acf.set_title("autocorrelation (solid: skip, dashed: plain)", fontsize=9)
    for ax in (ax_len, ax_lag1):
        ax.legend(fontsize=7)
    if len(records) <= 12:
        ax_acf.legend(fontsize=6)
    fig.suptitle("Shattered gradients (Balduzzi et al. 2017): plain nets decorrelate like 2^-L, "
                 "residual nets like 1/sqrt(L)", fontsize=9)
    fig.tight_layout()
    return fig


# Summary keys of the sweep's comparison table (skipstudy.probes.comparison).
COMPARISON_COLUMNS = ("corr_length", "corr_length_frac", "acf_lag1")
