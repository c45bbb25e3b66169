"""Lesion study (Veit et al. 2016): validation accuracy with residual branches deleted; it decays
smoothly with the number deleted, as for an ensemble. A deleted block computes what its class
declares (``without_branch``: skipstudy's ``relu(shortcut(x))`` post-activation, ``x`` or the
projection of ``relu(bn1(x))`` pre-activation), else what its block contract implies,
``after(projection(x) or x)`` (torchvision's and timm's blocks); downsampling blocks keep their
lossy or learned shortcut and are flagged."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.models.contract import BlockContract, contract_of
from skipstudy.probes.context import Batches, ProbeContext, kept_state, panels, require_skips, residual_blocks, titled

NAME = "lesion"


def check(net: nn.Module, options: Any = None) -> None:
    require_skips(net, NAME, "deleting a block of a plain net cuts the only path through it, so there is "
                  "nothing to measure")
    for name, block in residual_blocks(net):
        _deletable(name, block)


def _deletable(name: str, block: nn.Module) -> BlockContract:
    """The block's contract, refusing a block whose shortcut reads a tensor only its own
    ``forward`` computes (``shared=True``) and that does not say what it is without its branch."""
    contract = contract_of(block)
    if contract.shared and not callable(getattr(block, "without_branch", None)):
        raise ConfigError(f"probe={NAME}: block {name or type(block).__name__} ({type(block).__name__}) declares "
                          "shared=True (its shortcut reads a tensor its forward computes), so deleting its branch "
                          "is undefined; give the class a without_branch(x) method")
    return contract


def is_downsampling(block: nn.Module) -> bool:
    return contract_of(block).shortcut == "projection"


class DeletedBranch(nn.Module):
    """Stands in for a block whose residual branch is deleted: the block's ``without_branch(x)``
    where it has one, which keeps what follows the addition (post-activation: the ReLU) and what
    the shortcut reads (Fixup's ``bias1a``; a pre-activation projection's ``relu(bn1(x))``); else
    its contract's ``after(projection(x) or x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # out of the module tree: lives for one evaluation
        object.__setattr__(self, "contract", _deletable("", block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = getattr(self.block, "without_branch", None)
        if callable(own):
            return own(x)
        out = x if self.contract.projection is None else self.contract.projection(x)
        return torch.relu(out) if self.contract.after == "relu" else out  # not in place: out may be x


@contextlib.contextmanager
def deleted(net: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Inside the ``with``, the named blocks of ``net`` have their branches deleted."""
    with contextlib.ExitStack() as undo:
        for name in names:
            block = net.get_submodule(name)
            undo.callback(net.set_submodule, name, block)
            net.set_submodule(name, DeletedBranch(block))
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
