"""Lesion study (Veit et al. 2016): validation accuracy with residual branches deleted; it decays
smoothly with the number deleted, as for an ensemble. A deleted block computes what its class
declares (``Block.without_branch``: ``relu(shortcut(x))`` post-activation, ``x`` or the projection
of ``relu(bn1(x))`` pre-activation); downsampling blocks keep their lossy or learned shortcut and
are flagged."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.models.blocks import Block
from skipstudy.models.contract import require_declared
from skipstudy.probes.context import Batches, ProbeContext, kept_state, panels, require_skips, residual_blocks, titled

NAME = "lesion"


def check(net: nn.Module, options: Any = None) -> None:
    require_skips(net, NAME, "deleting a block of a plain net cuts the only path through it, so there is "
                  "nothing to measure")
    require_declared(net, NAME)


def is_downsampling(block: Block) -> bool:
    return block.block_contract().shortcut == "projection"


class DeletedBranch(nn.Module):
    """Stands in for a block whose residual branch is deleted: the block's ``without_branch(x)``,
    which keeps what follows the addition (post-activation: the ReLU) and what the shortcut reads
    (Fixup's ``bias1a``; a pre-activation projection's ``relu(bn1(x))``)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # out of the module tree: lives for one evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.without_branch(x)


@contextlib.contextmanager
def deleted(net: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Inside the ``with``, the named blocks of ``net`` have their branches deleted."""
    with contextlib.ExitStack() as undo:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            modules = net.get_submodule(parent_name)._modules
            undo.callback(modules.__setitem__, child, modules[child])
            modules[child] = DeletedBranch(modules[child])
        yield net


@torch.no_grad()
def accuracy(net: nn.Module, batches: Batches) -> float:
    return sum(int((net(x).argmax(dim=1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    net, batches = ctx.net, ctx.fixed_batches("val")
    names, down = zip(*[(name, is_downsampling(b)) for name, b in residual_blocks(net)])
    n, rng = len(names), np.random.default_rng(options.seed)

    def accuracy_without(blocks: list[str]) -> float:
        with deleted(net, blocks):
            return accuracy(net, batches)

    with kept_state(net):
        intact = accuracy_without([])
        single = [accuracy_without([name]) for name in names]
        by_k = []
        for k in range(1, min(options.max_k or n, n) + 1):
            accs = [accuracy_without([names[i] for i in sorted(rng.choice(n, size=k, replace=False).tolist())])
                    for _ in range(1 if k == n else options.samples)]
            by_k.append({"k": k, "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs})
    result = {"acc_intact": intact, "acc_one_deleted_mean": float(np.mean(single)),
              "acc_one_deleted_min": float(np.min(single))}
    record = {**result, "images": sum(len(y) for _, y in batches), "deleted_k": by_k,
              "blocks": [{"name": nm, "downsampling": d, "acc": a} for nm, d, a in zip(names, down, single)]}
    ctx.publish(options, record, result, lambda title: plot(names, single, down, intact, by_k, title))
    return result


def plot(names: list[str], single: list[float], downsampling: list[bool], intact: float,
         by_k: list[dict], title: str = "") -> Figure:
    """Left: accuracy with each block deleted (downsampling blocks in red). Right: accuracy
    against the number of deleted blocks (mean and std over random sets)."""
    fig, (ax_b, ax_k) = panels(max(8.0, 4 + 0.18 * len(names)), 3.6, 1, 2,
                               gridspec_kw={"width_ratios": [max(1.0, len(names) / 12), 1]})
    ax_b.bar(range(len(names)), single, color=["C3" if d else "C0" for d in downsampling])
    ax_b.axhline(intact, color="k", ls="--", lw=0.8, label=f"intact {intact:.3f}")
    ax_b.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax_b.set(title="one block's branch deleted (red: downsampling block)", ylabel="val accuracy")
    ax_b.legend(fontsize=7)
    ax_k.errorbar([0] + [r["k"] for r in by_k], [intact] + [r["mean"] for r in by_k],
                  yerr=[0.0] + [r["std"] for r in by_k], marker="o", ms=3, capsize=2)
    ax_k.set(title="k random blocks deleted", xlabel="blocks deleted (random)", ylabel="val accuracy")
    return titled(fig, title)
