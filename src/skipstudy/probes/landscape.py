"""Loss-landscape slices (Li et al. 2018): the training loss at ``theta + a d1 (+ b d2)`` on an odd
grid over ``[-span, span]``. Directions are Gaussian with each filter rescaled to the norm of
``theta``'s (so BN's scale invariance does not shape the plot), zero on 1-D parameters; the weights
are never modified (``functional_call``) and BN uses running statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter
from torch import nn
from torch.func import functional_call

from skipstudy.probes.context import Batches, ProbeContext, kept_state, panels, titled


def random_direction(net: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    direction = {}
    for name, p in net.named_parameters():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        shape = (-1, *([1] * (p.dim() - 1)))  # one norm per output channel / unit
        direction[name] = d * (p.detach().flatten(1).norm(dim=1).view(shape) / d.flatten(1).norm(dim=1).view(shape))
    return direction


@torch.no_grad()
def loss_at(net: nn.Module, params: dict[str, torch.Tensor], batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` with ``params``, in its current mode."""
    loss_sum = correct = total = 0.0
    for x, y in batches:
        logits = functional_call(net, params, (x,))
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(dim=1) == y).sum())
        total += y.numel()
    return loss_sum / total, correct / total


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    net, steps, size, span = ctx.net, options.steps, options.grid, options.span
    batches = ctx.fixed_batches(options.split)
    gen = torch.Generator().manual_seed(options.seed)
    d1, d2 = random_direction(net, gen), random_direction(net, gen)
    theta = {name: p.detach() for name, p in net.named_parameters()}

    def at(a: float, b: float) -> tuple[float, float]:
        # a == b == 0 gives theta + 0 = theta exactly: the centre is the checkpoint's loss.
        return loss_at(net, {k: theta[k] + a * d1[k] + b * d2[k] for k in theta}, batches)

    alphas, betas = np.linspace(-span, span, steps), np.linspace(-span, span, size)
    with kept_state(net):
        line = np.array([at(float(a), 0.0) for a in alphas])
        plane = np.array([[at(float(a), float(b)) for a in betas] for b in betas])  # [row=b, col=a]
    loss_1d, acc_1d, loss_2d, acc_2d = line[:, 0], line[:, 1], plane[..., 0], plane[..., 1]
    result = {"center_loss": float(loss_2d[size // 2, size // 2]), "center_acc": float(acc_2d[size // 2, size // 2]),
              # Sharpness: how much the loss rises at the edge of the slice.
              "loss_rise_1d": float(max(loss_1d[0], loss_1d[-1]) - loss_1d[steps // 2]),
              "loss_max_2d": float(loss_2d.max())}
    record = {**result, "images": sum(len(y) for _, y in batches), "loss_1d": loss_1d.tolist()}
    what = f"{options.split} loss"
    stem = ctx.publish(options, record, result,
                       {"1d": lambda title: plot_1d(alphas, loss_1d, acc_1d, f"{title}, {what}"),
                        "2d": lambda title: plot_2d(betas, loss_2d, f"{title}, {what}")})
    np.save(stem.parent / f"{stem.name}_2d.npy", loss_2d)
    np.savez(stem.with_suffix(".npz"), alphas_1d=alphas, loss_1d=loss_1d, acc_1d=acc_1d,
             coords_2d=betas, loss_2d=loss_2d, acc_2d=acc_2d)
    return result


def plot_1d(alphas: np.ndarray, loss: np.ndarray, acc: np.ndarray, title: str = "") -> Figure:
    fig, ax = panels(5, 3.4)
    ax.plot(alphas, loss, color="C0")
    ax.set(title="1-D slice", xlabel="step along d1 (filter-normalised)")
    ax.set_ylabel("loss", color="C0")
    ax2 = ax.twinx()
    ax2.plot(alphas, acc, color="C1", ls="--")
    ax2.set_ylabel("accuracy", color="C1")
    return titled(fig, title)


def plot_2d(coords: np.ndarray, loss: np.ndarray, title: str = "") -> Figure:
    """Contours of the 2-D slice (Li et al.'s figures), the checkpoint marked at the centre."""
    fig, ax = panels(4.8, 4.2)
    finite = loss[np.isfinite(loss)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-6
    # Losses far from the minimum can be 1000x the centre's: log-spaced levels keep the basin visible.
    log = lo > 0 and hi / lo > 10
    levels = np.geomspace(lo, hi, 24) if log else np.linspace(lo, hi, 24)
    cs = ax.contour(coords, coords, np.where(np.isfinite(loss), loss, hi), levels=levels, cmap="viridis",
                    linewidths=0.8, norm=LogNorm(lo, hi) if log else None)
    ax.clabel(cs, cs.levels[::4], fontsize=6, fmt="%.3g")
    bar = fig.colorbar(cs, ax=ax, label="loss", ticks=levels[::4])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    ax.plot([0], [0], "k+", ms=8)
    ax.set(title="2-D slice", xlabel="d1", ylabel="d2", aspect="equal")
    return titled(fig, title)
