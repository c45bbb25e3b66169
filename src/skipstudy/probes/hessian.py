"""Top eigenvalues of the Hessian of the training loss, by power iteration on Hessian-vector products.

The loss is the mean cross-entropy over the first ``probe.batches`` training batches
(stored order, no augmentation; the mean of the batches' mean losses), with BN as training
runs it (``probe.bn=train``: batch statistics; ``eval``: running statistics); running
statistics and modes are restored afterwards. A Hessian-vector product is the gradient of
``<grad L, v>`` (Pearlmutter 1994); each batch's first-order graph is built once and reused
by every product (memory: one double-backward graph per batch).

Subspace iteration (:func:`~skipstudy.probes.spectra.top_eigenpairs`; with ``probe.k=1`` the
plain power iteration) gives the ``probe.k`` eigenvalues of largest magnitude, as PyHessian
does; ``top_eig`` is the largest in magnitude, which at a minimum is the sharpness that
bounds stable step sizes (``lr < 2 / top_eig`` for plain gradient descent).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.probes.context import (ProbeContext, check_loss_bn, cross_entropy, int_option, loss_mode,
                                      number_option, resolve_loss_bn)
from skipstudy.probes.spectra import top_eigenpairs

NAME = "hessian"


def hvp_operator(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """``(matvec, n)``: rows ``v`` over the flattened trainable parameters -> rows ``H v``, where
    ``H`` is the Hessian of the mean over ``batches`` of each batch's mean loss (current mode)."""
    params = [p for p in net.parameters() if p.requires_grad]
    graphs = []
    for x, y in batches:
        loss = cross_entropy(net, x, y) / len(batches)
        graphs.append(torch.autograd.grad(loss, params, create_graph=True))

    def matvec(rows: torch.Tensor) -> torch.Tensor:
        out = []
        for v in rows:
            parts = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
            total = None
            for grads in graphs:
                hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True, allow_unused=True)
                flat = torch.cat([(torch.zeros_like(p) if h is None else h).flatten() for h, p in zip(hv, params)])
                total = flat if total is None else total + flat
            out.append(total.detach())
        return torch.stack(out)
    return matvec, sum(p.numel() for p in params)


def top_hessian_eigenvalues(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], k: int, iters: int,
                            tol: float, generator: torch.Generator) -> tuple[list[float], list[list[float]], int]:
    """``(values, history, iterations)``: the ``k`` eigenvalues of largest magnitude of the loss
    Hessian of ``net`` (in its current mode) on ``batches``, the Ritz values at every iteration."""
    with torch.inference_mode(False), torch.enable_grad():
        matvec, n = hvp_operator(net, batches)
        device, dtype = batches[0][0].device, next(net.parameters()).dtype
        start = torch.randn(min(k, n), n, generator=generator, dtype=torch.float64).to(dtype).to(device)
        history: list[list[float]] = []
        values, _, done = top_eigenpairs(matvec, start, iters, tol, history)
    return values.tolist(), history, done


def check(net: nn.Module, options: Any) -> None:
    int_option(options, "k", 1)
    int_option(options, "iters", 20)
    number_option(options, "tol", 1e-3)
    check_loss_bn(options)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    k, iters, tol = int(options.get("k", 1)), int(options.get("iters", 20)), float(options.get("tol", 1e-3))
    bn = resolve_loss_bn(ctx.net, options)
    batches = ctx.fixed_batches("train")
    generator = torch.Generator().manual_seed(int(options.get("seed", ctx.seed)))
    with loss_mode(ctx.net, bn):
        values, history, done = top_hessian_eigenvalues(ctx.net, batches, k, iters, tol, generator)
    result = {"top_eig": values[0], "iterations": float(done)}
    record = {"k": k, "iters": iters, "tol": tol, "bn": bn, "images": sum(int(y.numel()) for _, y in batches),
              "eigenvalues": values, "history": history}
    ctx.publish(NAME, record, result, lambda title: plot(history, title))
    return result


def plot(history: list[list[float]], title: str = "") -> Figure:
    """The Ritz values against the iteration: the estimate of each top eigenvalue converging."""
    fig = Figure(figsize=(5, 3.4), dpi=90)
    ax = fig.subplots()
    values = np.array(history)
    for j in range(values.shape[1]):
        ax.plot(np.arange(1, len(values) + 1), values[:, j], marker="o", ms=3, label=f"eigenvalue {j + 1}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Ritz value")
    ax.set_title(title or "top Hessian eigenvalues", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
