"""Loss-landscape slices (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

The training loss is evaluated at ``theta + a*d1`` (1-D slice) and ``theta + a*d1 + b*d2``
(2-D slice) around the checkpoint's weights ``theta``, for ``a, b`` on an evenly spaced grid
in ``[-span, span]`` (an odd number of points, so the centre is ``theta`` itself).

Directions follow Li et al.'s recipe:

* Gaussian random, one per direction, from a generator seeded with ``probe.seed``;
* filter-normalised: every filter (slice along the output dimension) of ``d`` is rescaled to
  the norm of the same filter of ``theta``, so the plot does not depend on the scale
  invariance that BN gives the weights;
* zero in every 0- and 1-dimensional entry: BN weights and biases, linear biases, Fixup and
  SkipInit scalars (Li et al. leave BN parameters and biases unperturbed).

BN runs in eval mode with the checkpoint's running statistics, which are never perturbed.
The weights are never modified either: each point is evaluated with
``torch.func.functional_call`` on ``theta + a*d1 + b*d2``. The loss is the mean cross-entropy
over the first ``probe.batches`` batches of the training split, read in stored order without
augmentation, the same batches at every point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter
from torch import nn
from torch.func import functional_call

from skipstudy import config
from skipstudy.probes.context import ProbeContext, eval_mode

NAME = "landscape"


def random_direction(net: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A filter-normalised Gaussian direction over ``net``'s parameters (zero on BN and biases)."""
    direction = {}
    for name, p in net.named_parameters():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        # Filter-wise: one norm per output channel / output unit (dim 0).
        d_norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1)))
        p_norm = p.detach().flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1)))
        direction[name] = d * (p_norm / d_norm.clamp_min(1e-12))
    return direction


@torch.no_grad()
def loss_at(net: nn.Module, params: dict[str, torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` with ``params`` over all samples of ``batches``.

    ``net`` must already be in eval mode; its buffers (BN statistics) are used as they are.
    """
    loss_sum = correct = total = 0.0
    for x, y in batches:
        logits = functional_call(net, params, (x,))
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(dim=1) == y).sum())
        total += y.numel()
    return loss_sum / total, correct / total


def grid(points: int, span: float) -> np.ndarray:
    return np.linspace(-span, span, points)


def check(net: nn.Module, options: Any) -> None:
    config.check_probe(NAME, options)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    net = ctx.net
    steps, size, span = int(options.get("steps", 51)), int(options.get("grid", 21)), float(options.get("span", 1.0))
    split = options.get("split", "train")
    batches = ctx.fixed_batches(split)
    gen = torch.Generator().manual_seed(int(options.get("seed", ctx.seed)))
    d1, d2 = random_direction(net, gen), random_direction(net, gen)
    theta = {name: p.detach() for name, p in net.named_parameters()}

    def at(a: float, b: float) -> tuple[float, float]:
        # a == b == 0 gives theta + 0 = theta exactly: the centre is the checkpoint's loss.
        params = {k: theta[k] + a * d1[k] + b * d2[k] for k in theta}
        return loss_at(net, params, batches)

    alphas, betas = grid(steps, span), grid(size, span)
    with eval_mode(net):
        line = np.array([at(float(a), 0.0) for a in alphas])
        plane = np.array([[at(float(a), float(b)) for a in betas] for b in betas])  # [row=b, col=a]
    loss_1d, acc_1d = line[:, 0], line[:, 1]
    loss_2d, acc_2d = plane[..., 0], plane[..., 1]

    stem = ctx.stem(NAME)
    np.save(stem.parent / f"{stem.name}_2d.npy", loss_2d)
    np.savez(stem.with_suffix(".npz"), alphas_1d=alphas, loss_1d=loss_1d, acc_1d=acc_1d,
             coords_2d=betas, loss_2d=loss_2d, acc_2d=acc_2d)
    centre = float(loss_2d[size // 2, size // 2])
    result = {
        "center_loss": centre,
        "center_acc": float(acc_2d[size // 2, size // 2]),
        # Sharpness summaries: how much the loss rises at the edge of the slice.
        "loss_rise_1d": float(max(loss_1d[0], loss_1d[-1]) - loss_1d[steps // 2]),
        "loss_max_2d": float(loss_2d.max()),
    }
    arch = getattr(net, "arch", type(net).__name__)
    skip = ctx.model.get("skip")
    title = f"{arch}{'' if skip is None else (' (skip)' if skip else ' (plain)')}, step {ctx.step}, {split} loss"
    ctx.figure(plot_1d(alphas, loss_1d, acc_1d, title), stem.parent / f"{stem.name}_1d.png", f"probe/{NAME}/1d")
    ctx.figure(plot_2d(betas, loss_2d, title), stem.parent / f"{stem.name}_2d.png", f"probe/{NAME}/2d")
    ctx.write_json(stem.with_suffix(".json"), {
        **result, "split": split, "span": span, "steps": steps, "grid": size,
        "images": sum(int(y.numel()) for _, y in batches), "seed": int(options.get("seed", ctx.seed)),
        "loss_1d": loss_1d.tolist(),
    }, summary=result)
    ctx.scalars({f"probe/{NAME}/{k}": v for k, v in result.items()})
    return result


def plot_1d(alphas: np.ndarray, loss: np.ndarray, acc: np.ndarray, title: str = "") -> Figure:
    fig = Figure(figsize=(5, 3.4), dpi=90)
    ax = fig.subplots()
    ax.plot(alphas, loss, color="C0")
    ax.set_xlabel("step along d1 (filter-normalised)")
    ax.set_ylabel("loss", color="C0")
    ax2 = ax.twinx()
    ax2.plot(alphas, acc, color="C1", ls="--")
    ax2.set_ylabel("accuracy", color="C1")
    ax.set_title(title or "1-D slice", fontsize=9)
    fig.tight_layout()
    return fig


def plot_2d(coords: np.ndarray, loss: np.ndarray, title: str = "") -> Figure:
    """Contour plot of the 2-D slice (Li et al.'s figures), the checkpoint marked at the centre."""
    fig = Figure(figsize=(4.8, 4.2), dpi=90)
    ax = fig.subplots()
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
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_aspect("equal")
    ax.set_title(title or "2-D slice", fontsize=9)
    fig.tight_layout()
    return fig
