"""Lesion study (Veit et al. 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks"): validation accuracy with residual branches deleted.

Deleting a block's branch leaves its shortcut: the block's output becomes
``relu(shortcut(x))``, what the block computes with its branch output set to zero (the ReLU
after the addition stays, as it sits outside the branch; on the non-negative output of a
previous block it is the identity). Veit et al. found that deleting one block of a ResNet
barely changes accuracy, and that accuracy decays smoothly with the number of deleted blocks,
as for an ensemble; a plain net breaks after any deletion.

Choices:

* Blocks whose shortcut changes the shape (stride 2 or more channels) keep their shortcut as
  it is: zero-padded subsampling (option A) or the trained 1x1 projection (option B). They are
  lesioned like the others and flagged ``downsampling`` in the outputs, since their shortcut is
  itself a learned or lossy layer (Veit et al. report the larger drops there).
* A plain twin (``model.skip=false``) has no shortcut to fall back on; the probe refuses it.
* Fixup/SkipInit scalars of a deleted block go with its branch, except Fixup's ``bias1a`` in
  front of a projection or zero-pad shortcut, which that shortcut sees as well
  (``Block.shortcut_term``, Zhang et al. 2019).

Outputs: the accuracy with each block deleted in turn, and for k = 1..n the mean (and std)
accuracy over ``probe.samples`` random sets of k deleted blocks, all on the first
``probe.batches`` validation batches (the same batches for every lesion).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy import config
from skipstudy.errors import ConfigError
from skipstudy.models.blocks import Block
from skipstudy.probes.context import ProbeContext, eval_mode

NAME = "lesion"


def blocks(net: nn.Module) -> list[tuple[str, Block]]:
    """Every block of ``net`` in forward order (names relative to ``net``)."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, Block)]


def residual_blocks(net: nn.Module) -> list[tuple[str, Block]]:
    """The blocks that have a shortcut, i.e. can be lesioned."""
    return [(name, m) for name, m in blocks(net) if m.shortcut is not None]


def is_downsampling(block: Block) -> bool:
    """True where the shortcut is not the identity (stride or width change)."""
    from skipstudy.models.blocks import identity_shortcut

    return block.shortcut is not identity_shortcut


def require_skips(net: nn.Module, probe: str, why: str) -> None:
    """Refuse a network without residual blocks, or a plain twin, for ``probe=<probe>``; ``why``
    says what the probe would lack without shortcuts."""
    arch = getattr(net, "arch", type(net).__name__)
    if not blocks(net):
        raise ConfigError(f"probe={probe} needs a network of residual blocks; {arch} has none "
                          "(use a model from skipstudy.models)")
    if not residual_blocks(net):
        raise ConfigError(f"probe={probe} needs skip connections, but this {arch} is a plain twin "
                          f"(model.skip=false): {why}; probe a model.skip=true run")


def check(net: nn.Module, options: Any = None) -> None:
    """Refuse networks without residual blocks, saying why."""
    require_skips(net, NAME, "deleting a block of a plain net cuts the only path through it, so there is "
                  "nothing to measure")
    if options is not None:
        config.check_probe(NAME, options)


class DeletedBranch(nn.Module):
    """Stands in for a block whose residual branch is deleted: ``relu(shortcut(x))``."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        # Kept out of the module tree: this stand-in lives only for one evaluation.
        object.__setattr__(self, "block", block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: with an identity shortcut the output would otherwise overwrite x.
        return torch.relu(self.block.shortcut_term(x))


@contextlib.contextmanager
def deleted(net: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Inside the ``with``, the named blocks of ``net`` have their branches deleted."""
    swapped = []
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            block = parent._modules[child]
            parent._modules[child] = DeletedBranch(block)
            swapped.append((parent, child, block))
        yield net
    finally:
        for parent, child, block in reversed(swapped):
            parent._modules[child] = block


@torch.no_grad()
def accuracy(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy over all samples of ``batches`` (eval mode)."""
    correct = total = 0
    with eval_mode(net):
        for x, y in batches:
            correct += int((net(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    return correct / total


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    net = ctx.net
    names = [name for name, _ in residual_blocks(net)]
    down = {name: is_downsampling(b) for name, b in residual_blocks(net)}
    n = len(names)
    samples = int(options.get("samples", 10))
    max_k = options.get("max_k") or n
    batches = ctx.fixed_batches("val")

    intact = accuracy(net, batches)
    single = []
    for name in names:
        with deleted(net, [name]):
            single.append(accuracy(net, batches))
    rng = np.random.default_rng(ctx.seed)
    by_k = []
    for k in range(1, min(int(max_k), n) + 1):
        accs = []
        for _ in range(1 if k == n else samples):
            chosen = sorted(rng.choice(n, size=k, replace=False).tolist())
            with deleted(net, [names[i] for i in chosen]):
                accs.append(accuracy(net, batches))
        by_k.append({"k": k, "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs})

    result = {
        "acc_intact": intact,
        "acc_one_deleted_mean": float(np.mean(single)),
        "acc_one_deleted_min": float(np.min(single)),
    }
    stem = ctx.stem(NAME)
    ctx.write_json(stem.with_suffix(".json"), {
        **result,
        "samples": samples,
        "images": sum(int(y.numel()) for _, y in batches),
        "blocks": [{"name": nm, "downsampling": down[nm], "acc": a} for nm, a in zip(names, single)],
        "deleted_k": by_k,
    }, summary=result)
    arch = getattr(net, "arch", type(net).__name__)
    ctx.figure(plot(names, single, [down[nm] for nm in names], intact, by_k, f"{arch}, step {ctx.step}"),
               stem.with_suffix(".png"), f"probe/{NAME}")
    ctx.scalars({f"probe/{NAME}/{k}": v for k, v in result.items()})
    return result


def plot(names: list[str], single: list[float], downsampling: list[bool], intact: float,
         by_k: list[dict], title: str = "") -> Figure:
    """Left: accuracy with each block deleted (downsampling blocks in red). Right: accuracy
    against the number of deleted blocks (mean and std over random sets)."""
    fig = Figure(figsize=(max(8.0, 4 + 0.18 * len(names)), 3.6), dpi=90)
    ax_b, ax_k = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, len(names) / 12), 1]})
    colors = ["C3" if d else "C0" for d in downsampling]
    ax_b.bar(range(len(names)), single, color=colors)
    ax_b.axhline(intact, color="k", ls="--", lw=0.8, label=f"intact {intact:.3f}")
    ax_b.set_xticks(range(len(names)))
    ax_b.set_xticklabels(names, rotation=90, fontsize=6)
    ax_b.set_ylabel("val accuracy")
    ax_b.set_title("one block's branch deleted (red: downsampling block)", fontsize=9)
    ax_b.legend(fontsize=7)
    ks = [0] + [r["k"] for r in by_k]
    means = [intact] + [r["mean"] for r in by_k]
    stds = [0.0] + [r["std"] for r in by_k]
    ax_k.errorbar(ks, means, yerr=stds, marker="o", ms=3, capsize=2)
    ax_k.set_xlabel("blocks deleted (random)")
    ax_k.set_ylabel("val accuracy")
    ax_k.set_title("k random blocks deleted", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
