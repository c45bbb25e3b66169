"""Spectra of operators known only through products: subspace iteration and Hutchinson moments.

The Jacobian probe applies ``J^T J`` (a jvp then a vjp), the Hessian probe applies ``H`` (a
Hessian-vector product); neither matrix is ever formed. Both operators are symmetric, so one
routine serves both:

* :func:`top_eigenpairs`: block power (subspace) iteration with a Rayleigh-Ritz step
  (Saad, "Numerical Methods for Large Eigenvalue Problems", ch. 5). With one vector it is
  the plain power iteration. It finds the eigenvalues of largest magnitude.
* :func:`trace_moments`: Hutchinson's estimator, ``tr(A) = E[v^T A v]`` and
  ``tr(A^2) = E[|A v|^2]`` for Rademacher ``v`` (Hutchinson 1989), from the same products.
"""

from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def rademacher(count: int, dim: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``(count, dim)`` of +-1, drawn on the CPU from ``generator`` (device-independent), as ``like``."""
    signs = torch.randint(0, 2, (count, dim), generator=generator).to(like.dtype) * 2 - 1
    return signs.to(like.device)


def top_eigenpairs(matvec: MatVec, start: torch.Tensor, iters: int, tol: float = 1e-4,
                   history: list[list[float]] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The ``k`` eigenvalues of largest magnitude of a symmetric operator, by subspace iteration.

    Args:
        matvec: ``(k, n) -> (k, n)``, the operator applied to each row.
        start: ``(k, n)`` starting block (random; it must not be orthogonal to the top eigenvectors).
        iters: most iterations (each costs one ``matvec`` of the block).
        tol: stop once every Ritz value moved by less than ``tol`` times the largest one.
        history: if given, the Ritz values of every iteration are appended to it.

    Returns:
        ``(values, vectors, iterations)``: Ritz values sorted by decreasing magnitude
        (float64, CPU), the matching ``(k, n)`` Ritz vectors, and the iterations done.
    """
    q = torch.linalg.qr(start.T).Q.T
    values = torch.full((start.shape[0],), float("nan"), dtype=torch.float64)
    for it in range(1, iters + 1):
        z = matvec(q).detach()
        # Rayleigh-Ritz on span(q): the small projected matrix, symmetrised against round-off.
        t = (q @ z.T).double().cpu()
        evals, w = torch.linalg.eigh((t + t.T) / 2)
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
    return values, q, iters  # iters == 0


def trace_moments(matvec: MatVec, vectors: torch.Tensor) -> tuple[float, float]:
    """Hutchinson estimates of ``(tr(A), tr(A^2))`` from the rows of ``vectors`` (Rademacher)."""
    z = matvec(vectors).detach()
    count = vectors.shape[0]
    return float((vectors.double() * z.double()).sum() / count), float(z.double().pow(2).sum() / count)
