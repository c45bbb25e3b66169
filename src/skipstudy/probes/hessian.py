"""Top eigenvalues of the training loss's Hessian, by subspace (``probe.k=1``: power) iteration on
Hessian-vector products, the gradient of ``<grad L, v>`` (Pearlmutter 1994), as PyHessian does.
``top_eig`` is the largest in magnitude: at a minimum, the sharpness that bounds stable step
sizes (``lr < 2 / top_eig`` for plain gradient descent). The loss is the mean of the batches' mean
losses, with BN as training runs it (``probe.bn=train``) or on running statistics (``eval``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.probes.context import Batches, ProbeContext, accepts_any_network, cross_entropy, loss_bn, loss_mode
from skipstudy.probes.spectra import top_eigenpairs

NAME = "hessian"
check = accepts_any_network


def hvp_operator(net: nn.Module, batches: Batches):
    """``(matvec, n)``: rows ``v`` over the flattened trainable parameters -> rows ``H v``. Each
    batch's first-order graph is built once and kept for every product."""
    params = [p for p in net.parameters() if p.requires_grad]
    graphs = [torch.autograd.grad(cross_entropy(net, x, y) / len(batches), params, create_graph=True)
              for x, y in batches]

    def matvec(rows: torch.Tensor) -> torch.Tensor:
        out = []
        for v in rows:
            parts = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
            total = 0
            for grads in graphs:
                hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True, allow_unused=True)
                total = total + torch.cat([(torch.zeros_like(p) if h is None else h).flatten() for h, p in zip(hv, params)])
            out.append(total.detach())
        return torch.stack(out)
    return matvec, sum(p.numel() for p in params)


def top_hessian_eigenvalues(net: nn.Module, batches: Batches, k: int, iters: int, tol: float,
                            generator: torch.Generator) -> tuple[list[float], list[list[float]], int]:
    """``(values, history, iterations)``, ``history`` the Ritz values of every iteration (current mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        matvec, n = hvp_operator(net, batches)
        start = torch.randn(min(k, n), n, generator=generator, dtype=torch.float64)
        history: list[list[float]] = []
        values, _, done = top_eigenpairs(matvec, start.to(next(net.parameters()).dtype).to(batches[0][0].device),
                                         iters, tol, history)
    return values.tolist(), history, done


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    k, iters, tol, bn = options.get("k", 1), options.get("iters", 20), options.get("tol", 1e-3), loss_bn(ctx.net, options)
    batches = ctx.fixed_batches("train")
    with loss_mode(ctx.net, bn):
        values, history, done = top_hessian_eigenvalues(ctx.net, batches, k, iters, tol,
                                                        torch.Generator().manual_seed(options.get("seed", ctx.seed)))
    result = {"top_eig": values[0], "iterations": float(done)}
    record = {"k": k, "iters": iters, "tol": tol, "bn": bn, "images": sum(len(y) for _, y in batches),
              "eigenvalues": values, "history": history}
    ctx.publish(NAME, record, result, lambda title: plot(history, title))
    return result


def plot(history: list[list[float]], title: str = "") -> Figure:
    """The Ritz values against the iteration: each top eigenvalue's estimate converging."""
    fig = Figure(figsize=(5, 3.4), dpi=90)
    ax = fig.subplots()
    values = np.array(history)
    for j in range(values.shape[1]):
        ax.plot(np.arange(1, len(values) + 1), values[:, j], marker="o", ms=3, label=f"eigenvalue {j + 1}")
    ax.set(xlabel="iteration", ylabel="Ritz value")
    ax.set_title(title or "top Hessian eigenvalues", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
