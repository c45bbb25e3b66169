"""Eigenvalues of largest magnitude of the training loss's Hessian, by Lanczos (ARPACK, see
:mod:`skipstudy.probes.spectra`) on Hessian-vector products (Pearlmutter 1994), each with its
residual ``|Hv - lv| / |l|``: at a minimum ``top_eig`` is the sharpness that bounds stable step
sizes (``lr < 2 / top_eig`` for plain gradient descent); at initialisation it may be negative."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from skipstudy.probes.context import Batches, ProbeContext, bn_mode, cross_entropy, panels, titled
from skipstudy.probes.spectra import Eigenpairs, top_eigenpairs

log = logging.getLogger(__name__)


def top_hessian_eigenvalues(net: nn.Module, batches: Batches, k: int, iters: int, tol: float,
                            generator: torch.Generator) -> Eigenpairs:
    """The ``k`` largest-magnitude eigenpairs of the Hessian of the mean loss over ``batches``
    (current mode), at most ``iters`` Lanczos restarts, converged when every residual is below
    ``tol``. The loss's first-order graph is built once and kept for every product."""
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

        return top_eigenpairs(matvec, sum(sizes), k, tol, iters, generator, params[0])


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    batches = ctx.fixed_batches("train")
    bn, mode = bn_mode(ctx, options)
    with mode:
        eig = top_hessian_eigenvalues(ctx.net, batches, options.k, options.iters, options.tol,
                                      torch.Generator().manual_seed(options.seed))
    values, residuals = eig.values.tolist(), eig.residuals.tolist()
    if not eig.converged:
        log.warning("probe=hessian stopped before converging: top_eig=%.4g with residual %.2g (probe.tol=%g, worst "
                    "of %d: %.2g) after %d Hessian-vector products; raise probe.iters (now %d)", values[0],
                    residuals[0], options.tol, len(values), np.nanmax(eig.residuals), eig.products, options.iters)
    result = {"top_eig": values[0], "top_eig_residual": residuals[0], "products": float(eig.products),
              "converged": float(eig.converged)}
    record = {"bn": bn, "images": sum(len(y) for _, y in batches), "eigenvalues": values, "residuals": residuals}
    ctx.publish(options, record, result, lambda title: plot(values, residuals, options.tol, title))
    return result


def plot(values: list[float], residuals: list[float], tol: float, title: str = "") -> Figure:
    """Left: the eigenvalues found, each bar the error bound ``|l| * residual``. Right: the residuals
    against ``tol``."""
    fig, (ax_v, ax_r) = panels(9, 3.4, 1, 2)
    x = np.arange(1, len(values) + 1)
    ax_v.errorbar(x, values, yerr=np.abs(values) * np.nan_to_num(residuals, nan=0.0), marker="o", ms=4, ls="none",
                  capsize=3)
    ax_v.axhline(0.0, color="gray", ls=":", lw=0.8)
    ax_v.set(title="largest-magnitude Hessian eigenvalues", xlabel="eigenvalue (by magnitude)", ylabel="eigenvalue")
    ax_r.plot(x, residuals, marker="o", ms=4, ls="none", color="C1")
    ax_r.axhline(tol, color="C3", ls="--", lw=0.8, label=f"tol {tol:g}")
    ax_r.set(title="residual |Hv - lv| / |l|", xlabel="eigenvalue (by magnitude)", yscale="log")
    ax_r.legend(fontsize=7)
    for ax in (ax_v, ax_r):
        ax.set_xticks(x)
    return titled(fig, title)
