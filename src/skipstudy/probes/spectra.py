"""Spectra of symmetric operators known only through products (the Jacobian probe's ``J^T J``,
the Hessian probe's ``H``): neither matrix is ever formed."""

from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def top_eigenpairs(matvec: MatVec, start: torch.Tensor, iters: int, tol: float = 1e-4,
                   history: list[list[float]] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, vectors, iterations)``: the eigenvalues of largest magnitude (float64, CPU) and
    Ritz vectors, by subspace iteration with a Rayleigh-Ritz step (Saad, "Numerical Methods for
    Large Eigenvalue Problems", ch. 5) from the ``(k, n)`` block ``start``; with one row, the power
    iteration. Stops once every value moved by less than ``tol`` times the largest."""
    q = torch.linalg.qr(start.T).Q.T
    values = torch.full((start.shape[0],), float("nan"), dtype=torch.float64)
    for it in range(1, iters + 1):
        z = matvec(q).detach()
        t = (q @ z.T).double().cpu()
        evals, w = torch.linalg.eigh((t + t.T) / 2)  # symmetrised against round-off
        order = torch.argsort(evals.abs(), descending=True)
        evals, w = evals[order], w[:, order]
        moved = (evals - values).abs().max()
        if history is not None:
            history.append(evals.tolist())
        values = evals
        ritz = w.T.to(q.dtype).to(q.device) @ q
        if moved <= tol * values.abs().max() or it == iters:
            return values, ritz, it
        if not torch.isfinite(z).all():
            return torch.full_like(values, float("nan")), ritz, it
        q = torch.linalg.qr(z.T).Q.T


def trace_moments(matvec: MatVec, vectors: torch.Tensor) -> tuple[float, float]:
    """Hutchinson (1989): ``tr(A) = E[v^T A v]``, ``tr(A^2) = E[|A v|^2]`` over the Rademacher rows ``vectors``."""
    z = matvec(vectors).detach().double()
    return float((vectors.double() * z).sum() / len(vectors)), float(z.pow(2).sum() / len(vectors))
