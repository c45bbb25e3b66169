"""Top eigenvalues of the training loss's Hessian by subspace (``k=1``: power) iteration on
Hessian-vector products (Pearlmutter 1994), as PyHessian does: at a minimum ``top_eig`` is the
sharpness that bounds stable step sizes (``lr < 2 / top_eig`` for plain gradient descent)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.probes.context import Batches, ProbeContext, bn_mode, cross_entropy, panels, titled
from skipstudy.probes.spectra import top_eigenpairs


def top_hessian_eigenvalues(net: nn.Module, batches: Batches, k: int, iters: int, tol: float,
                            generator: torch.Generator) -> tuple[list[float], list[list[float]], int]:
    """``(values, history, iterations)``, ``history`` the Ritz values of every iteration (current
    mode). The loss's first-order graph is built once and kept for every product."""
    params = [p for p in net.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    with torch.inference_mode(False), torch.enable_grad():
        loss = sum(cross_entropy(net, x, y) for x, y in batches) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=True)

        def matvec(rows: torch.Tensor) -> torch.Tensor:
            out = []
            for v in rows:
                hv = torch.autograd.grad(grads, params, [c.view_as(p) for c, p in zip(v.split(sizes), params)],
                                         retain_graph=True, materialize_grads=True)
                out.append(torch.cat([h.flatten() for h in hv]))
            return torch.stack(out)

        start = torch.randn(min(k, sum(sizes)), sum(sizes), generator=generator, dtype=torch.float64)
        history: list[list[float]] = []
        values, _, done = top_eigenpairs(matvec, start.to(params[0].dtype).to(params[0].device), iters, tol, history)
    return values.tolist(), history, done


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    batches = ctx.fixed_batches("train")
    bn, mode = bn_mode(ctx, options)
    with mode:
        values, history, done = top_hessian_eigenvalues(ctx.net, batches, options.k, options.iters, options.tol,
                                                        torch.Generator().manual_seed(options.seed))
    result = {"top_eig": values[0], "iterations": float(done)}
    record = {"bn": bn, "images": sum(len(y) for _, y in batches), "eigenvalues": values, "history": history}
    ctx.publish(options, record, result, lambda title: plot(history, title))
    return result


def plot(history: list[list[float]], title: str = "") -> Figure:
    """The Ritz values against the iteration: each top eigenvalue's estimate converging."""
    fig, ax = panels(5, 3.4)
    values = np.array(history)
    for j in range(values.shape[1]):
        ax.plot(np.arange(1, len(values) + 1), values[:, j], marker="o", ms=3, label=f"eigenvalue {j + 1}")
    ax.set(title="top Hessian eigenvalues", xlabel="iteration", ylabel="Ritz value")
    ax.legend(fontsize=7)
    return titled(fig, title)
