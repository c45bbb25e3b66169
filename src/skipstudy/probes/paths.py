"""Path lengths and effective depth (Veit et al. 2016, "Residual Networks Behave Like
Ensembles of Relatively Shallow Networks", section 4.2).

A network of ``n`` residual blocks ``y = relu(shortcut(x) + branch(x))`` unrolls into ``2^n``
paths: at each block the signal takes either the shortcut or the branch. The Jacobian of a
block is ``D (S + B)`` (``D`` the ReLU mask of the full forward pass, ``S`` and ``B`` those of
shortcut and branch), so the gradient is exactly the sum over the ``2^n`` products that pick
``S`` or ``B`` at every block; a path's length ``k`` is the number of branches it goes through.
Path lengths follow the binomial distribution ``C(n, k) / 2^n``.

The probe measures the gradient carried by single paths, as Veit et al. did: for a set of
``k`` blocks, the backward pass goes only through those blocks' branches (the shortcut's
input is detached there) and only through the shortcut elsewhere (the branch's input is
detached); the forward values are the full network's. The gradient of the summed training
loss is taken at the first block's input (the stem output; the image for the mini net), and
its norm is averaged over the images. For each ``k = 0..n``, ``probe.samples`` random sets
of ``k`` blocks are drawn, or all ``C(n, k)`` of them when there are not more than that (so
a net of few blocks is enumerated exactly).

Outputs: the mean gradient magnitude of a path of length ``k``; the total magnitude carried
by all paths of length ``k``, ``C(n, k)`` times that (summed in log space, so deep nets do not
overflow); and the effective range: the shortest run of lengths ``[k_lo, k_hi]`` that
carries ``probe.mass`` of the total (Veit et al. found 5-17 of ResNet-110's 54 blocks).

Shortcuts that change the shape (zero padding, 1x1 projection) count as the shortcut side of
their block, like the identity. BN runs in eval mode so every image's gradient is its own; at
initialisation the running statistics are calibrated first (``probe.bn=auto``). A plain twin
has a single path and is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.probes.context import SPLITS, ProbeContext, check_bn_mode, cross_entropy, eval_bn, int_option
from skipstudy.probes.lesion import require_skips, residual_blocks

NAME = "paths"


def _detach_first(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].detach(), *args[1:])


@contextlib.contextmanager
def routed(net: nn.Module, branches: Iterable[str]) -> Iterator[nn.Module]:
    """Inside the ``with``, gradients go through the branch of the blocks named in ``branches``
    and through the shortcut of every other residual block; forward values are unchanged."""
    chosen = set(branches)
    handles, shadowed = [], []
    try:
        for name, block in residual_blocks(net):
            if name in chosen:
                # Shadow the block's shortcut path with one that detaches its input (an
                # instance attribute wins over the method; the module tree is untouched).
                # Block.shortcut_term, not the shortcut module, so a Fixup block's own
                # input shift stays exactly where the block puts it.
                term = block.shortcut_term
                vars(block)["shortcut_term"] = lambda x, term=term: term(x.detach())
                shadowed.append(block)
            else:
                handles.append(block.branch_convs()[0].register_forward_pre_hook(_detach_first))
        yield net
    finally:
        for h in handles:
            h.remove()
        for block in shadowed:
            del vars(block)["shortcut_term"]


def path_gradient_norms(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        branches: Iterable[str] | None) -> torch.Tensor:
    """Per image: the norm of the summed loss's gradient at the first block's input, through the
    path that takes the branches of ``branches`` (None: the full network, every path)."""
    first = residual_blocks(net)[0][1]
    leaves: list[torch.Tensor] = []

    def leaf_input(_module, args):
        leaves.append(args[0].detach().requires_grad_(True))
        return (leaves[-1], *args[1:])

    norms = []
    handle = first.register_forward_pre_hook(leaf_input)
    try:
        with routed(net, branches) if branches is not None else contextlib.nullcontext(), \
                torch.inference_mode(False), torch.enable_grad():
            for x, y in batches:
                loss = cross_entropy(net, x, y, reduction="sum")
                (g,) = torch.autograd.grad(loss, leaves[-1])
                norms.append(g.flatten(1).double().norm(dim=1).cpu())
    finally:
        handle.remove()
    return torch.cat(norms)


def path_sets(n: int, k: int, samples: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """All ``C(n, k)`` sets of ``k`` of ``n`` blocks if there are at most ``samples``, else ``samples`` random ones."""
    if math.comb(n, k) <= samples:
        return list(itertools.combinations(range(n), k))
    return [tuple(sorted(rng.choice(n, size=k, replace=False).tolist())) for _ in range(samples)]


def log_binomial(n: int, k: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])


def effective_range(share: np.ndarray, mass: float) -> tuple[int, int]:
    """The shortest ``[lo, hi]`` with ``share[lo:hi+1].sum() >= mass`` (the larger sum on ties)."""
    cumulative = np.concatenate([[0.0], np.cumsum(share)])
    for width in range(1, len(share) + 1):
        sums = cumulative[width:] - cumulative[:-width]
        if sums.max() >= mass - 1e-12:  # round-off: the whole range always qualifies
            lo = int(np.argmax(sums))
            return lo, lo + width - 1
    return 0, len(share) - 1


def profile(magnitude: np.ndarray, mass: float) -> dict[str, Any]:
    """From the mean magnitude of a path of each length ``k = 0..n``: the binomial distribution of
    lengths, each length's share of the total magnitude, and the effective range."""
    n = len(magnitude) - 1
    k = np.arange(n + 1)
    log_count = log_binomial(n, k)
    with np.errstate(divide="ignore"):
        log_total = log_count + np.log(magnitude)
    share = np.exp(log_total - np.max(log_total))
    share = share / share.sum()
    lo, hi = effective_range(share, mass)
    return {
        "distribution": np.exp(log_count - n * math.log(2)).tolist(),
        "share": share.tolist(),
        "effective_lo": lo,
        "effective_hi": hi,
        "mean_length": float((k * share).sum()),
        "peak_length": int(np.argmax(share)),
    }


def check(net: nn.Module, options: Any) -> None:
    require_skips(net, NAME, "a plain net has a single path through its blocks, so there is no distribution "
                  "of path lengths")
    int_option(options, "samples", 10)
    mass = options.get("mass", 0.9)
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise ConfigError(f"probe.mass={mass!r} must be a fraction in (0, 1]; e.g. probe.mass=0.9")
    split = options.get("split", "train")
    if split not in SPLITS:
        raise ConfigError(f"probe.split={split!r} is not a split; valid: {', '.join(SPLITS)}")
    check_bn_mode(options)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    net = ctx.net
    samples, mass = int(options.get("samples", 10)), float(options.get("mass", 0.9))
    batches = ctx.fixed_batches(options.get("split", "train"))
    names = [name for name, _ in residual_blocks(net)]
    n = len(names)
    rng = np.random.default_rng(int(options.get("seed", ctx.seed)))
    bn, bn_context = eval_bn(ctx, options, torch.cat([x for x, _ in batches]))
    by_k = []
    with bn_context:
        full = float(path_gradient_norms(net, batches, None).mean())
        for k in range(n + 1):
            sets = path_sets(n, k, samples, rng)
            norms = [float(path_gradient_norms(net, batches, [names[i] for i in s]).mean()) for s in sets]
            by_k.append({"k": k, "mean": float(np.mean(norms)), "std": float(np.std(norms)), "paths": len(sets),
                         "exact": len(sets) == math.comb(n, k)})
    stats = profile(np.array([r["mean"] for r in by_k]), mass)
    result = {
        "effective_lo": float(stats["effective_lo"]),
        "effective_hi": float(stats["effective_hi"]),
        "mean_length": stats["mean_length"],
        "blocks": float(n),
        "grad_full": full,
    }
    record = {"blocks": names, "samples": samples, "mass": mass, "bn": bn,
              "images": sum(int(y.numel()) for _, y in batches), "magnitude": by_k, **stats}
    ctx.publish(NAME, record, result, lambda title: plot(by_k, stats, mass, title))
    return result


def plot(by_k: list[dict], stats: dict, mass: float, title: str = "") -> Figure:
    """Veit et al.'s figure 6: (a) the distribution of path lengths, (b) the gradient magnitude
    of one path of each length, (c) the share of the total gradient magnitude per length, with
    the effective range shaded."""
    fig = Figure(figsize=(12, 3.4), dpi=90)
    ax_d, ax_m, ax_t = fig.subplots(1, 3)
    k = np.array([r["k"] for r in by_k])
    ax_d.bar(k, stats["distribution"], color="C0")
    ax_d.set_title("(a) path lengths: C(n, k) / 2^n", fontsize=9)
    ax_d.set_ylabel("fraction of paths")
    ax_m.errorbar(k, [r["mean"] for r in by_k], yerr=[r["std"] for r in by_k], marker="o", ms=3, capsize=2)
    ax_m.set_yscale("log")
    ax_m.set_title("(b) gradient magnitude of one path of length k", fontsize=9)
    ax_m.set_ylabel("|dL/d input of the first block|")
    ax_t.bar(k, stats["share"], color="C2")
    lo, hi = stats["effective_lo"], stats["effective_hi"]
    ax_t.axvspan(lo - 0.5, hi + 0.5, color="C3", alpha=0.15, label=f"{mass:.0%} of the total: k = {lo}..{hi}")
    ax_t.set_title("(c) total gradient magnitude per path length", fontsize=9)
    ax_t.set_ylabel("share of the total")
    ax_t.legend(fontsize=7)
    for ax in (ax_d, ax_m, ax_t):
        ax.set_xlabel("path length k (branches taken)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
