"""Spectra of symmetric operators known only through products (the Jacobian probe's ``J^T J``,
the Hessian probe's ``H``), and the standard errors of sampled estimates; neither matrix is ever
formed.

Eigenvalues come from ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
Lehoucq and Sorensen 1996) rather than power iteration: power iteration converges like
``|l2 / l1|^t`` and, stopped when its value stops moving, can stall far from the answer (a CIFAR
ResNet's Hessian at initialisation read 3.80 after 20 steps where the largest-magnitude
eigenvalue is -18.63), while Lanczos builds a Krylov space that holds both ends of the spectrum,
so ``which="LM"`` finds the largest magnitude whatever its sign, and it stops on the residual, not
on a moving value. Every value comes back with its own residual ``|A v - l v| / |l|``, recomputed
with one more product (ARPACK's estimate is float64 arithmetic on products that may be float32):
for a symmetric ``A`` an eigenvalue lies within ``|A v - l v|`` of ``l`` (Parlett, "The Symmetric
Eigenvalue Problem", thm 4.5.1), so the residual bounds the relative error of the value.
ARPACK keeps its ``ncv`` (20) Lanczos vectors in float64 host memory: 160 bytes per parameter, about
140 MB for a CIFAR ResNet-56's Hessian and 4 GB for an ImageNet ResNet-50's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

MatVec = Callable[[torch.Tensor], torch.Tensor]
WINDOW = 40               # products kept for an unconverged estimate: two of ARPACK's restart cycles
RECENT_BYTES = 1 << 30    # at most this much host memory for them (float32 pairs); above it, NaN


@dataclass
class Eigenpairs:
    """``values``: largest magnitude first (float64; where ARPACK stopped unconverged, Ritz values
    of its last products, NaN for networks too large to keep them); ``vectors``:
    ``(k, n)`` unit rows on the operator's device; ``residuals``: ``|A v - l v| / |l|`` per value;
    ``products``: operator products spent, the residuals' included; ``converged``: ARPACK met ``tol``
    for every value within its restarts."""

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    products: int
    converged: bool


def top_eigenpairs(matvec: MatVec, n: int, k: int, tol: float, restarts: int, generator: torch.Generator,
                   like: torch.Tensor) -> Eigenpairs:
    """The ``k`` eigenvalues of largest magnitude of the symmetric ``n x n`` operator ``matvec``
    (rows ``(m, n)`` -> rows of ``A V^T``, in ``like``'s dtype and device), by Lanczos with at most
    ``restarts`` implicit restarts (each about ``ncv - k`` products, ``ncv = max(2k + 1, 20)``),
    stopped when every residual is below ``tol``. The start vector is drawn from ``generator``.

    Lanczos from one start vector sees one copy of a repeated eigenvalue (its Krylov space holds
    only the start's projection on the eigenspace), so for ``k >= 2`` the values are checked by
    deflation: Lanczos on ``P A P``, ``P`` the projector off the vectors found, must find nothing
    larger than the ``k``-th value; what it does find takes that place, until nothing is missed."""
    k = min(k, n - 1)  # ARPACK's limit; the probes ask for far fewer than their operators' size
    count = [0]
    # The last products, for an estimate where ARPACK stops unconverged (it returns only what converged).
    recent: deque = deque(maxlen=WINDOW if n * WINDOW * 8 <= RECENT_BYTES else 0)

    def apply(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(1, n)).to(like)
        y = matvec(v).detach().double().cpu().numpy().reshape(-1)
        recent.append((x.reshape(-1).astype(np.float32), y.astype(np.float32)))
        return y.reshape(x.shape)

    v0 = torch.randn(n, generator=generator, dtype=torch.float64).numpy()
    values, vectors, converged = lanczos(apply, n, k, tol, restarts, v0)
    if len(values) < k and len(recent) > k:
        values, vectors = rayleigh_ritz(recent, k)
    for _ in range(k if k >= 2 and converged and len(values) == k else 0):
        basis = vectors

        def deflated(x: np.ndarray) -> np.ndarray:
            x = x.reshape(-1) - basis @ (basis.T @ x.reshape(-1))
            y = apply(x)
            return y - basis @ (basis.T @ y)

        extra, vector, ok = lanczos(deflated, n, 1, tol, restarts, v0 - basis @ (basis.T @ v0))
        converged = converged and ok
        if len(extra) == 0 or abs(extra[0]) <= abs(values[-1]) * (1 + tol):
            break
        values, vectors = np.append(values[:-1], extra), np.concatenate([vectors[:, :-1], vector], axis=1)
        order = np.argsort(-np.abs(values), kind="stable")
        values, vectors = values[order], vectors[:, order]
    rows = torch.from_numpy(np.ascontiguousarray(vectors.T)).to(like)
    residuals = np.array([residual(matvec, rows[j : j + 1], float(values[j])) for j in range(len(values))])
    count[0] += len(values)
    missing = k - len(values)
    return Eigenpairs(np.concatenate([values, np.full(missing, np.nan)]), rows,
                      np.concatenate([residuals, np.full(missing, np.nan)]), count[0], converged)


def rayleigh_ritz(products: deque, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest-magnitude Ritz pairs of ``A`` on the span of the vectors ``x`` of the
    products ``(x, A x)``: an unconverged estimate, whose residual is then measured like any other."""
    x = np.stack([p[0] for p in products], axis=1).astype(np.float64)
    ax = np.stack([p[1] for p in products], axis=1).astype(np.float64)
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    keep = sv > 1e-6 * sv[0]  # Lanczos vectors of different restarts may be nearly dependent
    q, aq = u[:, keep], ax @ vt[keep].T / sv[keep]
    t = q.T @ aq
    theta, w = np.linalg.eigh((t + t.T) / 2)
    order = np.argsort(-np.abs(theta), kind="stable")[:k]
    return theta[order], q @ w[:, order]


def lanczos(apply: Callable[[np.ndarray], np.ndarray], n: int, k: int, tol: float, restarts: int,
            v0: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(values, vectors as columns, converged)`` from ARPACK, largest magnitude first; when it
    runs out of restarts, only the pairs that did converge (perhaps none)."""
    operator = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    try:
        values, vectors = eigsh(operator, k=k, which="LM", tol=tol, maxiter=restarts, v0=v0)
        converged = True
    except ArpackNoConvergence as err:
        values, vectors, converged = err.eigenvalues, err.eigenvectors, False
    order = np.argsort(-np.abs(values), kind="stable")
    return values[order], vectors[:, order], converged


def residual(matvec: MatVec, v: torch.Tensor, value: float) -> float:
    """``|A v - value v| / |value|`` for the unit row ``v`` (float64 on the host)."""
    av = matvec(v).detach().double().cpu()
    r = float((av - value * v.double().cpu()).norm())
    return r / abs(value) if value != 0 else (0.0 if r == 0 else math.inf)


def trace_moments(matvec: MatVec, vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hutchinson (1989): per row ``v`` of ``vectors`` (Rademacher), ``v^T A v`` and ``|A v|^2``,
    whose means estimate ``tr(A)`` and ``tr(A^2)``."""
    z = matvec(vectors).detach().double().cpu()
    v = vectors.detach().double().cpu()
    return (v * z).sum(dim=1).numpy(), z.pow(2).sum(dim=1).numpy()


def jackknife(samples: np.ndarray, statistic: Callable[[np.ndarray], float]) -> float:
    """Standard error of ``statistic(samples.mean(axis=0))`` by the leave-one-out jackknife (Efron
    and Stein 1981): ``std / sqrt(m)`` for a plain mean, and it carries a ratio or a square root
    of means without a hand-derived delta method. NaN below two samples."""
    m = len(samples)
    if m < 2:
        return math.nan
    total = samples.sum(axis=0)
    return float(jackknife_se(np.array([statistic((total - samples[i]) / (m - 1)) for i in range(m)])))


def jackknife_se(leave_out: np.ndarray) -> np.ndarray | float:
    """The jackknife's standard errors from the ``m`` leave-one-out values of statistics (along the
    first axis): ``sqrt((m - 1) / m * sum((t_i - mean t)^2))``. Four lines, so not worth a
    dependency; SciPy's resampling (``scipy.stats.bootstrap``) draws at random and wants many
    more samples than the 8-16 the probes have."""
    m = len(leave_out)
    if m < 2:
        return math.nan
    return np.sqrt((m - 1) / m * ((leave_out - leave_out.mean(axis=0)) ** 2).sum(axis=0))
