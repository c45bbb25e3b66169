"""Shattered gradients (Balduzzi et al. 2017): how fast ``d logit / d input`` decorrelates along the
line between two validation images (like 2^-L in a plain net of depth L, 1/sqrt(L) with skips): the
first lag where ``R(k) = sum_i <g_i, g_{i+k}> / sum_i |g_i|^2`` (line mean removed) falls below 1/e."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.probes.comparison import by_depth, is_plain, label
from skipstudy.probes.context import ProbeContext, bn_mode, panels, titled

log = logging.getLogger(__name__)

THRESHOLD = math.exp(-1.0)
RESOLVED = 0.1  # a warning when halving the points moves the length by more than this share of it
COMPARISON_COLUMNS = ("corr_length", "corr_length_frac", "acf_lag1")


def check(net: nn.Module, options: Any) -> None:
    if hasattr(net, "fc") and options.logit >= net.fc.out_features:
        raise ConfigError(f"probe.logit={options.logit!r} must be a class index in [0, {net.fc.out_features}); "
                          "e.g. probe.logit=0")


def line_inputs(x0: torch.Tensor, x1: torch.Tensor, points: int) -> torch.Tensor:
    t = torch.linspace(0.0, 1.0, points, device=x0.device, dtype=x0.dtype).view(-1, *([1] * x0.dim()))
    return (1 - t) * x0.unsqueeze(0) + t * x1.unsqueeze(0)


def input_gradients(net: nn.Module, inputs: torch.Tensor, logit: int, chunk: int = 64) -> torch.Tensor:
    """``(P, D)`` float64 on the CPU. With samples independent (eval-mode BN) the gradient of a
    chunk's summed logit is every sample's own gradient."""
    grads = []
    with torch.inference_mode(False), torch.enable_grad():
        for part in inputs.split(chunk):
            x = part.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(x)[:, logit].sum(), x)
            grads.append(g.flatten(1).double().cpu())
    return torch.cat(grads)


def autocorrelation(grads: torch.Tensor) -> torch.Tensor:
    """``R(0..P-1)`` of a ``(P, D)`` sequence; one that does not change along the line is all ones."""
    g = grads.double() - grads.double().mean(dim=0, keepdim=True)
    p = g.shape[0]
    spectrum = torch.fft.rfft(g, n=2 * p, dim=0)  # zero-padded: linear, not circular, correlation
    s = torch.fft.irfft(spectrum.abs() ** 2, n=2 * p, dim=0)[:p].sum(dim=1)
    return s / s[0] if s[0] > 1e-300 else torch.ones(p, dtype=torch.float64)


def correlation_length(acf: torch.Tensor | np.ndarray, threshold: float = THRESHOLD) -> float:
    r = np.asarray(acf, dtype=np.float64)
    below = np.flatnonzero(r < threshold)
    if below.size == 0:
        return float(len(r))
    k = int(below[0])  # >= 1: R(0) = 1
    return float(k - 1 + (r[k - 1] - threshold) / (r[k - 1] - r[k]))


def resolution_error(grads: torch.Tensor, length: float) -> float:
    """How far the correlation length (in points) moves when every other point of the line is left
    out (lags of the coarse line are two points): the error of reading the length off a sampled,
    linearly interpolated autocorrelation, taken as the coarse estimate's (conservative: linear
    interpolation's error falls with the square of the spacing)."""
    coarse = correlation_length(autocorrelation(grads[::2]))
    return abs(length - 2 * coarse) if coarse < (len(grads) + 1) // 2 else math.inf


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    pair = list(options.pair)
    images = ctx.val_images(max(pair) + 1, f"probe.pair={pair}")
    inputs = line_inputs(images[pair[0]], images[pair[1]], options.points)
    bn, mode = bn_mode(ctx, options, inputs, options.chunk)
    with mode:
        grads = input_gradients(ctx.net, inputs, options.logit, options.chunk)
    acf = autocorrelation(grads)
    length = correlation_length(acf)
    error = resolution_error(grads, length)
    if length >= len(acf):
        log.warning("probe=shattering: the gradients stay correlated along the whole line (autocorrelation never "
                    "below 1/e), so corr_length=%.0f points is only a lower bound",
                    length)
    elif not error <= RESOLVED * length:
        log.warning("probe=shattering did not resolve the correlation length: %.3g points, and halving the points "
                    "moves it by %.2g; raise probe.points (now %d)", length, error, options.points)
    result = {"corr_length": length, "corr_length_error": error, "corr_length_frac": length / (options.points - 1),
              "corr_length_frac_error": error / (options.points - 1), "acf_lag1": float(acf[1])}
    record = {"bn": bn, "threshold": THRESHOLD, **result, "grad_norm_mean": float(grads.norm(dim=1).mean()),
              "acf": acf.tolist()}
    stem = ctx.publish(options, record, result, lambda title: plot_run(grads, acf, length, title))
    np.save(stem.with_suffix(".npy"), acf.numpy())
    return result


def plot_run(grads: torch.Tensor, acf: torch.Tensor, length: float, title: str = "") -> Figure:
    """Left: the gradient along the line at the three input coordinates that vary most.
    Right: the autocorrelation with the 1/e threshold and the correlation length."""
    fig, (ax_g, ax_r) = panels(9, 3.2, 1, 2)
    t = np.linspace(0, 1, grads.shape[0])
    for d in torch.topk(grads.var(dim=0), k=min(3, grads.shape[1])).indices.tolist():
        ax_g.plot(t, grads[:, d].numpy(), lw=0.8)
    ax_g.set(title="gradient along the line (3 coordinates)", xlabel="t (x0 -> x1)", ylabel="d logit / d input")
    lags = np.arange(len(acf) // 2 + 1)
    ax_r.plot(lags, acf.numpy()[: len(lags)], lw=1.2)
    ax_r.axhline(THRESHOLD, color="gray", ls=":", lw=0.8)
    if length < len(acf):
        ax_r.axvline(length, color="C3", ls="--", lw=0.8, label=f"corr. length {length:.1f}")
        ax_r.legend(fontsize=8)
    ax_r.set(title="autocorrelation of the gradient", xlabel="lag (points)", ylabel="autocorrelation")
    return titled(fig, title)


def comparison_figure(records: list[dict]) -> Figure:
    """Correlation length and lag-1 autocorrelation against depth, one line per kind of net; and
    every run's autocorrelation, coloured by depth."""
    fig, (ax_len, ax_lag1, ax_acf) = panels(13, 3.8, 1, 3)
    kinds = sorted({label(r) for r in records})
    for i, kind in enumerate(kinds):
        rs = sorted((r for r in records if label(r) == kind), key=lambda r: r["depth"])
        for ax, key in ((ax_len, "corr_length"), (ax_lag1, "acf_lag1")):
            ax.plot([r["depth"] for r in rs], [r[key] for r in rs], "--" if is_plain(rs[0]) else "-", marker="o",
                    color=f"C{i}", label=kind)
    for r, colour, style in by_depth(records):
        lags = np.arange(len(r["acf"]) // 2 + 1)
        ax_acf.plot(lags, np.asarray(r["acf"])[: len(lags)], style, color=colour, lw=1,
                    label=f"{label(r)} {r['depth']}")
    ax_acf.axhline(THRESHOLD, color="gray", ls=":", lw=0.8)
    ax_len.set(title="correlation length of input gradients", ylabel="correlation length (points, 1/e)", yscale="log")
    ax_len.yaxis.set_major_formatter(ScalarFormatter())
    ax_len.yaxis.set_minor_formatter(ScalarFormatter())
    ax_lag1.set(title="neighbouring gradients' correlation", ylabel="autocorrelation at lag 1")
    for ax in (ax_len, ax_lag1):
        ax.set(xlabel="depth (weighted layers)")
        ax.legend(fontsize=7)
    ax_acf.set(title="autocorrelation (solid: skip, dashed: plain)", xlabel="lag (points)", ylabel="autocorrelation")
    if len(records) <= 12:
        ax_acf.legend(fontsize=6)
    return titled(fig, "Shattered gradients (Balduzzi et al. 2017): plain nets decorrelate like 2^-L, "
                  "residual nets like 1/sqrt(L)")
