"""Path lengths and effective depth (Veit et al. 2016, section 4.2): a block's Jacobian is
``D (S + B)``, so the gradient is the sum over the ``2^n`` paths of shortcut-or-branch choices. One
path's gradient is the backward pass routed through its blocks' branches and the other blocks'
shortcuts, forward values unchanged, as Veit et al. did; totals are summed in log space. Any
declared block (``models/contract.py``) is routed from its contract: the unchosen part reads a
detached copy of its input, the forward values being the same tensors'."""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.special import softmax
from scipy.stats import binom
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.contract import contract_of
from skipstudy.probes.context import (Batches, ProbeContext, bn_mode, cross_entropy, panels, require_skips,
                                      residual_blocks, titled)

NAME = "paths"


def check(net: nn.Module, options: Any) -> None:
    require_skips(net, NAME, "a plain net has a single path through its blocks, so there is no distribution "
                  "of path lengths")


def _detach_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].detach(), *args[1:])


@contextlib.contextmanager
def _identity_detached(block: nn.Module, entry: nn.Module) -> Iterator[None]:
    """Gradient through the branch only, for a block adding its own input ``x`` (no shortcut
    module to hook, as torchvision's ``identity = x``): the block receives ``x.detach()``, the
    identity term with it, and the branch's entry gets the real ``x`` back in its place. Exact
    where the entry reads the block's input itself, as the contract declares; checked each pass."""
    held: dict[str, torch.Tensor] = {}

    def block_reads_detached(_module, args):
        held["x"], held["detached"] = args[0], args[0].detach()
        return (held["detached"], *args[1:])

    def entry_reads_real(_module, args):
        if args[0] is not held.get("detached"):
            raise ConfigError(f"probe={NAME}: the branch entry {type(entry).__name__} of {type(block).__name__} does "
                              "not read the block's input, as its contract (identity shortcut, no projection) "
                              "declares; declare the entry that does, or the shortcut's module as projection")
        return (held["x"], *args[1:])

    with contextlib.ExitStack() as undo:
        undo.enter_context(block.register_forward_pre_hook(block_reads_detached))
        undo.enter_context(entry.register_forward_pre_hook(entry_reads_real))
        yield


@contextlib.contextmanager
def routed(net: nn.Module, branches: Iterable[str]) -> Iterator[nn.Module]:
    """Gradients through the branch of the blocks named in ``branches`` and the shortcut of every
    other residual block (shape-changing shortcuts count as shortcuts); forward values unchanged."""
    chosen = set(branches)
    with contextlib.ExitStack() as undo:
        for name, block in residual_blocks(net):
            contract = contract_of(block)
            if name not in chosen:
                # The branch's entry as the block declares it (conv1 post-activation, bn1 pre-activation).
                undo.enter_context(contract.entry.register_forward_pre_hook(_detach_input))
            elif callable(getattr(block, "shortcut_term", None)):
                # skipstudy's blocks: an instance attribute shadows the method, the module tree is
                # untouched; the shortcut_term, not the shortcut module, so a Fixup block's input
                # shift stays put.
                vars(block)["shortcut_term"] = lambda x, term=block.shortcut_term: term(x.detach())
                undo.callback(vars(block).pop, "shortcut_term")
            elif contract.projection is not None:
                # The module computing the shortcut (a projection, or an nn.Identity the block calls).
                undo.enter_context(contract.projection.register_forward_pre_hook(_detach_input))
            else:
                undo.enter_context(_identity_detached(block, contract.entry))
        yield net


def path_gradient_norms(net: nn.Module, batches: Batches, branches: Iterable[str] | None) -> torch.Tensor:
    """Per image, the norm of the summed loss's gradient at the first block's input, through the
    path that takes the branches of ``branches`` (None: the full network, every path)."""
    leaves: list[torch.Tensor] = []

    def leaf_input(_module, args):
        leaves.append(args[0].detach().requires_grad_(True))
        return (leaves[-1], *args[1:])

    norms = []
    with residual_blocks(net)[0][1].register_forward_pre_hook(leaf_input), \
            routed(net, branches) if branches is not None else contextlib.nullcontext(), \
            torch.inference_mode(False), torch.enable_grad():
        for x, y in batches:
            (g,) = torch.autograd.grad(cross_entropy(net, x, y, reduction="sum"), leaves[-1])
            norms.append(g.flatten(1).double().norm(dim=1).cpu())
    return torch.cat(norms)


def path_sets(n: int, k: int, samples: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    if math.comb(n, k) <= samples:
        return list(itertools.combinations(range(n), k))
    return [tuple(sorted(rng.choice(n, size=k, replace=False).tolist())) for _ in range(samples)]


def effective_range(share: np.ndarray, mass: float) -> tuple[int, int]:
    """The shortest ``[lo, hi]`` with ``share[lo:hi+1].sum() >= mass`` (the larger sum on ties)."""
    cumulative = np.concatenate([[0.0], np.cumsum(share)])
    for width in range(1, len(share) + 1):
        sums = cumulative[width:] - cumulative[:-width]
        if sums.max() >= mass - 1e-12:  # round-off: the whole range always qualifies
            return int(np.argmax(sums)), int(np.argmax(sums)) + width - 1


def profile(magnitude: np.ndarray, mass: float) -> dict[str, Any]:
    """From the mean magnitude of one path of each length ``k = 0..n``: the distribution of lengths,
    each length's share of the total magnitude, and the effective range."""
    n = len(magnitude) - 1
    k = np.arange(n + 1)
    log_share = binom.logpmf(k, n, 0.5)  # C(n, k) / 2^n, in log space: C(1000, 500) overflows a float
    with np.errstate(divide="ignore"):
        share = softmax(log_share + np.log(magnitude))
    lo, hi = effective_range(share, mass)
    return {"distribution": np.exp(log_share).tolist(), "share": share.tolist(),
            "effective_lo": lo, "effective_hi": hi, "mean_length": float((k * share).sum()),
            "peak_length": int(np.argmax(share))}


def mean_length_se(stats: dict[str, Any], by_k: list[dict]) -> float:
    """Standard error of the mean path length from each length's sampling error (independent
    draws per length), to first order: ``d mean / d log m_k = share_k (k - mean)``."""
    mean = stats["mean_length"]
    terms = [(share * (r["k"] - mean) * r["se"] / r["mean"]) ** 2 if r["mean"] > 0 else 0.0
             for share, r in zip(stats["share"], by_k)]
    return float(math.sqrt(sum(terms)))


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    net, batches = ctx.net, ctx.fixed_batches(options.split)
    names = [name for name, _ in residual_blocks(net)]
    n, rng = len(names), np.random.default_rng(options.seed)
    bn, mode = bn_mode(ctx, options, torch.cat([x for x, _ in batches]))
    by_k = []
    with mode:
        full = float(path_gradient_norms(net, batches, None).mean())
        for k in range(n + 1):
            sets = path_sets(n, k, options.samples, rng)
            norms = [float(path_gradient_norms(net, batches, [names[i] for i in s]).mean()) for s in sets]
            exact = len(sets) == math.comb(n, k)
            # Standard error of the mean over the sampled paths; none where every path was taken.
            se = 0.0 if exact else float(np.std(norms, ddof=1) / math.sqrt(len(norms))) if len(norms) > 1 else math.nan
            by_k.append({"k": k, "mean": float(np.mean(norms)), "std": float(np.std(norms)), "se": se,
                         "paths": len(sets), "exact": exact})
    stats = profile(np.array([r["mean"] for r in by_k]), options.mass)
    stats["mean_length_se"] = mean_length_se(stats, by_k)
    result = {"effective_lo": float(stats["effective_lo"]), "effective_hi": float(stats["effective_hi"]),
              "mean_length": stats["mean_length"], "mean_length_se": stats["mean_length_se"], "blocks": float(n),
              "grad_full": full}
    record = {"blocks": names, "bn": bn, "images": sum(len(y) for _, y in batches), "magnitude": by_k, **stats}
    ctx.publish(options, record, result, lambda title: plot(by_k, stats, options.mass, title))
    return result


def plot(by_k: list[dict], stats: dict, mass: float, title: str = "") -> Figure:
    """Veit et al.'s figure 6: (a) the distribution of path lengths, (b) the gradient magnitude of
    one path of each length, (c) each length's share of the total, the effective range shaded."""
    fig, (ax_d, ax_m, ax_t) = panels(12, 3.4, 1, 3)
    k = np.array([r["k"] for r in by_k])
    ax_d.bar(k, stats["distribution"], color="C0")
    ax_d.set(title="(a) path lengths: C(n, k) / 2^n", ylabel="fraction of paths")
    ax_m.errorbar(k, [r["mean"] for r in by_k], yerr=[r["std"] for r in by_k], marker="o", ms=3, capsize=2)
    ax_m.set(title="(b) gradient magnitude of one path of length k", yscale="log",
             ylabel="|dL/d input of the first block|")
    ax_t.bar(k, stats["share"], color="C2")
    lo, hi = stats["effective_lo"], stats["effective_hi"]
    ax_t.axvspan(lo - 0.5, hi + 0.5, color="C3", alpha=0.15, label=f"{mass:.0%} of the total: k = {lo}..{hi}")
    ax_t.set(title="(c) total gradient magnitude per path length", ylabel="share of the total")
    ax_t.legend(fontsize=7)
    for ax in (ax_d, ax_m, ax_t):
        ax.set_xlabel("path length k (branches taken)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return titled(fig, title)
