"""Jacobian spectra from the stem output to each stage's output (dynamical isometry, Pennington et
al. 2017): near 1 with depth in an isometric net, spread over orders of magnitude in a deep plain
one. ``J^T J`` is a jvp then a vjp, never formed, for the top singular values (Lanczos, each with its
residual) and Hutchinson's ``mean(s^2)``, ``mean(s^4) / mean(s^2)^2`` (1 at isometry), each with its
standard error over the random vectors."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.func import jvp, vjp, vmap

from skipstudy.errors import ConfigError
from skipstudy.probes.comparison import by_depth, label
from skipstudy.probes.context import ProbeContext, bn_mode, panels, require_stages, stages, titled
from skipstudy.probes.spectra import jackknife, top_eigenpairs, trace_moments

log = logging.getLogger(__name__)

NAME = "jacobian"
COMPARISON_COLUMNS = ("sigma_max", "sv_rms", "isometry")
ACCURACY_COLUMNS = ("sigma_max_residual", "sv_rms_se", "isometry_se")  # each beside its value above


def check(net: nn.Module, options: Any) -> None:
    require_stages(net, NAME)


def stage_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in stages(net) if name != "stem"]


@torch.no_grad()
def stem_outputs(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The first stage's input for ``images`` (the images themselves where there is no stem)."""
    seen: list[torch.Tensor] = []
    with stage_modules(net)[0][1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())):
        net(images)
    return seen[0]


def gram_operator(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> tuple[Callable, int, int]:
    """``(matvec, inputs, outputs)``: rows ``V`` over ``h``'s entries -> rows of ``J^T J V^T``; one
    vjp closure (one kept forward pass) serves every product."""
    out, vjp_fn = vjp(f, h)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        jv = vmap(lambda t: jvp(f, (h,), (t,))[1])(v.view(-1, *h.shape))
        return vmap(vjp_fn)(jv)[0].reshape(v.shape)
    return matvec, h.numel(), out.numel()


def stage_spectrum(f: Callable, h: torch.Tensor, k: int, iters: int, tol: float, probes: int,
                   generator: torch.Generator) -> dict[str, Any]:
    """Top ``k`` singular values of ``f``'s Jacobian at ``h`` (Lanczos on ``J^T J``, at most ``iters``
    restarts, each with its residual ``|J^T J v - s^2 v| / s^2``), and Hutchinson's ``mean(s^2)``
    and ``mean(s^4) / mean(s^2)^2`` over ``probes`` Rademacher vectors with their standard errors
    (jackknife over the vectors: the estimator's error for this image, not the spread over images)."""
    matvec, n_in, n_out = gram_operator(f, h)
    rank = min(n_in, n_out)
    eig = top_eigenpairs(matvec, n_in, k, tol, iters, generator, h)
    # Rademacher vectors, drawn on the CPU (as is the start) so that the draws do not depend on the device.
    signs = torch.randint(0, 2, (probes, n_in), generator=generator).to(h.dtype) * 2 - 1
    quad, sq = trace_moments(matvec, signs.to(h.device))
    moments = np.stack([quad, sq], axis=1) / rank  # per vector: estimates of mean(s^2), mean(s^4)
    mean_sq, mean_quartic = moments.mean(axis=0)
    return {"singular_values": np.sqrt(np.clip(eig.values, 0, None)).tolist(), "residuals": eig.residuals.tolist(),
            "sv_sq_mean": float(mean_sq), "sv_sq_mean_se": jackknife(moments, lambda m: m[0]),
            "isometry": float(mean_quartic / mean_sq ** 2) if mean_sq > 0 else math.nan,
            "isometry_se": jackknife(moments, lambda m: m[1] / m[0] ** 2 if m[0] > 0 else math.nan),
            "products": eig.products, "converged": eig.converged, "inputs": n_in, "outputs": n_out}


def stage_row(name: str, per_image: tuple[dict, ...]) -> dict[str, Any]:
    """One stage's values over the images: means, and the estimators' errors combined as those of
    independent estimates (the Hutchinson errors add in quadrature; the residual is the worst)."""
    svs = np.array([r["singular_values"] for r in per_image])
    n = len(per_image)
    sv_rms = math.sqrt(np.mean([r["sv_sq_mean"] for r in per_image]))
    sq_se = math.sqrt(sum(r["sv_sq_mean_se"] ** 2 for r in per_image)) / n
    return {"stage": name, "singular_values": svs.mean(axis=0).tolist(), "sigma_max": float(svs[:, 0].mean()),
            "sigma_max_std": float(svs[:, 0].std()),
            "sigma_max_residual": float(max(r["residuals"][0] for r in per_image)),
            "residual_max": float(np.max([r["residuals"] for r in per_image])),
            "sv_rms": sv_rms, "sv_rms_se": sq_se / (2 * sv_rms) if sv_rms > 0 else math.nan,
            "isometry": float(np.mean([r["isometry"] for r in per_image])),
            "isometry_se": math.sqrt(sum(r["isometry_se"] ** 2 for r in per_image)) / n,
            "products": sum(r["products"] for r in per_image), "converged": all(r["converged"] for r in per_image),
            "inputs": per_image[0]["inputs"], "outputs": per_image[0]["outputs"]}


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    samples = options.samples
    batch = torch.cat([x for x, _ in ctx.fixed_batches("val")])
    if len(batch) < samples:
        raise ConfigError(f"probe.samples={samples}: the probe's validation batches hold only {len(batch)} images; "
                          "lower probe.samples or raise probe.batches")
    generator = torch.Generator().manual_seed(options.seed)
    names, modules = zip(*stage_modules(ctx.net))
    bn, mode = bn_mode(ctx, options, batch)
    with mode, torch.inference_mode(False), torch.enable_grad():
        h0 = stem_outputs(ctx.net, batch[:samples])
        spectra = [[stage_spectrum(nn.Sequential(*modules[: s + 1]), h0[i : i + 1], options.k, options.iters,
                                   options.tol, options.probes, generator) for s in range(len(names))]
                   for i in range(samples)]
    table = [stage_row(name, per_image) for name, per_image in zip(names, zip(*spectra))]  # per stage
    stalled = [row for row in table if not row["converged"]]
    if stalled:
        worst = max(stalled, key=lambda row: np.nan_to_num(row["residual_max"], nan=math.inf))
        log.warning("probe=jacobian stopped before converging at stage(s) %s: residual up to %.2g (probe.tol=%g) "
                    "at %s; raise probe.iters (now %d)", ", ".join(r["stage"] for r in stalled), worst["residual_max"],
                    options.tol, worst["stage"], options.iters)
    columns = (*COMPARISON_COLUMNS, *ACCURACY_COLUMNS)
    result = {key: table[-1][key] for key in columns}
    for row in table:
        result |= {f"{key}/{row['stage']}": row[key] for key in columns}
    result |= {"products": float(sum(r["products"] for r in table)), "converged": float(not stalled)}
    ctx.publish(options, {"bn": bn, "stages": table}, result, lambda title: plot_run(table, title))
    return result


def plot_run(table: list[dict], title: str = "") -> Figure:
    """Left: the top and the RMS singular values per stage. Right: the isometry ratio per stage."""
    fig, (ax_s, ax_i) = panels(9, 3.4, 1, 2)
    x = np.arange(len(table))
    svs = np.array([row["singular_values"] for row in table])
    for j in range(svs.shape[1]):
        ax_s.plot(x, svs[:, j], marker="o", ms=3, color="C0", alpha=1.0 - 0.6 * j / max(1, svs.shape[1]),
                  label="top singular values" if j == 0 else None)
    # Error bars: the Hutchinson estimates' standard errors (often smaller than the markers).
    ax_s.errorbar(x, [row["sv_rms"] for row in table], yerr=[row["sv_rms_se"] for row in table], marker="s", ms=3,
                  color="C1", ls="--", capsize=2, label="RMS singular value")
    ax_i.errorbar(x, [row["isometry"] for row in table], yerr=[row["isometry_se"] for row in table], marker="o", ms=3,
                  color="C2", capsize=2)
    stage_axes((ax_s, ax_i), table)
    ax_s.set(title="singular values of the stage Jacobian", ylabel="singular value")
    ax_s.legend(fontsize=7)
    ax_i.set(title="spread of the spectrum (1 = isometry)", ylabel="mean(s^4) / mean(s^2)^2")
    return titled(fig, title)


def stage_axes(axes, table: list[dict]) -> None:
    """Log axes over ``table``'s stages, the isometry's 1 marked."""
    for ax in axes:
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.set(yscale="log", xlabel="Jacobian: stem output -> stage output")
        ax.set_xticks(np.arange(len(table)), [row["stage"] for row in table], fontsize=8)


def comparison_figure(records: list[dict]) -> Figure:
    """Top and RMS singular value and isometry ratio per stage, one line per run."""
    fig, axes = panels(13, 3.8, 1, 3)
    for r, colour, style in by_depth(records):
        for ax, key in zip(axes, COMPARISON_COLUMNS):
            ax.plot(np.arange(len(r["stages"])), [row[key] for row in r["stages"]], style, marker="o", ms=3,
                    color=colour, label=f"{label(r)} {r['depth']}")
    stage_axes(axes, max((r["stages"] for r in records), key=len))
    for ax, what in zip(axes, ("top singular value", "RMS singular value", "mean(s^4) / mean(s^2)^2")):
        ax.set(title=what)
    if len(records) <= 12:
        axes[0].legend(fontsize=6)
    return titled(fig, "Input-output Jacobian per stage (Pennington et al. 2017): isometry keeps singular values "
                  "near 1 (solid: skip, dashed: plain)")
