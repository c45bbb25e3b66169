"""Input-output Jacobian spectra per stage (dynamical isometry, Pennington et al. 2017,
"Resurrecting the sigmoid in deep learning through dynamical isometry").

For one image at a time, ``J_s`` is the Jacobian of stage ``s``'s output with respect to the
stem output (the first stage's input: the image itself for the mini net), i.e. of the map
through ``layer1 .. layer s``. A network is dynamically isometric when all singular values
of ``J`` stay near 1 with depth; a deep plain net's spread over orders of magnitude, which is
the exploding/vanishing of gradients seen one direction at a time.

Per stage, averaged over ``probe.samples`` validation images:

* ``sigma_max``, the top ``probe.k`` singular values: subspace iteration on ``J^T J``
  (:func:`~skipstudy.probes.spectra.top_eigenpairs`), each product a ``torch.func.jvp``
  followed by a ``torch.func.vjp`` (vmapped over the block of vectors); ``J`` is never formed.
* ``sv_rms``: the root mean squared singular value, ``sqrt(tr(J^T J) / r)`` with
  ``r = min(inputs, outputs)`` (the number of singular values), by Hutchinson's estimator
  over ``probe.probes`` Rademacher vectors (:func:`~skipstudy.probes.spectra.trace_moments`).
* ``isometry``: ``mean(s^4) / mean(s^2)^2`` from the same products; 1 when every singular
  value is the same (perfect isometry), large when a few directions dominate.

BN runs in eval mode, so that each image's Jacobian is its own (a train-mode batch couples
them); at initialisation the running statistics are first calibrated on the probe's batches
(``probe.bn=auto``, as in the shattering probe).

``python -m skipstudy.probe -m probe=jacobian model=cifar_resnet model.depth=20,56 model.skip=true,false``
compares plain and residual nets at initialisation in one command; the sweep ends with
``<sweep>/probes/jacobian/jacobian_comparison.png`` (:mod:`skipstudy.probes.comparison`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.func import jvp, vjp, vmap

from skipstudy.errors import ConfigError
from skipstudy.probes.comparison import is_plain, label
from skipstudy.probes.context import ProbeContext, check_bn_mode, eval_bn, int_option, number_option
from skipstudy.probes.feature_maps import stages
from skipstudy.probes.spectra import rademacher, top_eigenpairs, trace_moments

NAME = "jacobian"


def stage_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stages after the stem, in forward order (``layer1``.. or ``block1``..)."""
    return [(name, m) for name, m in stages(net) if name != "stem"]


@torch.no_grad()
def stem_outputs(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The first stage's input for ``images`` (the stem output; the images themselves if no stem)."""
    first = stage_modules(net)[0][1]
    seen: list[torch.Tensor] = []

    def hook(_m, args):
        seen.append(args[0].detach().clone())
    handle = first.register_forward_pre_hook(hook)
    try:
        net(images)
    finally:
        handle.remove()
    return seen[0]


def through(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(h: torch.Tensor) -> torch.Tensor:
        for m in modules:
            h = m(h)
        return h
    return f


def gram_operator(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> tuple[Callable, int, int]:
    """``(matvec, inputs, outputs)``: ``V -> (J^T J V^T)^T`` for rows ``V`` over ``h``'s entries.

    One vjp closure (one forward pass, kept) serves every product; the jvp is vmapped over the
    block of vectors.
    """
    out, vjp_fn = vjp(f, h)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        tangents = v.view(-1, *h.shape)
        jv = vmap(lambda t: jvp(f, (h,), (t,))[1])(tangents)
        (jtjv,) = vmap(vjp_fn)(jv)
        return jtjv.reshape(v.shape)
    return matvec, h.numel(), out.numel()


def stage_spectrum(f: Callable, h: torch.Tensor, k: int, iters: int, tol: float, probes: int,
                   generator: torch.Generator) -> dict[str, Any]:
    """Top ``k`` singular values and the Hutchinson moments of ``J`` of ``f`` at ``h``."""
    matvec, n_in, n_out = gram_operator(f, h)
    rank = min(n_in, n_out)
    # Two extra vectors: the k-th value converges like (s_{block+1} / s_k)^(2 iters), not (s_{k+1} / s_k).
    block = min(k + 2, rank)
    start = torch.randn(block, n_in, generator=generator, dtype=torch.float64).to(h.dtype).to(h.device)
    values, _, done = top_eigenpairs(matvec, start, iters, tol)
    values = values[:k]
    tr1, tr2 = trace_moments(matvec, rademacher(probes, n_in, generator, h))
    mean_sq, mean_quartic = tr1 / rank, tr2 / rank
    return {
        "singular_values": values.clamp_min(0).sqrt().tolist(),
        "sv_sq_mean": mean_sq,
        "isometry": mean_quartic / mean_sq ** 2 if mean_sq > 0 else math.nan,
        "iterations": done,
        "inputs": n_in,
        "outputs": n_out,
    }


def check(net: nn.Module, options: Any) -> None:
    if not stage_modules(net):
        raise ConfigError(f"probe=jacobian finds no stages in {getattr(net, 'arch', type(net).__name__)}: it "
                          "looks for children named layer1.. or block1..; use a model from skipstudy.models")
    for key, default in (("samples", 2), ("k", 4), ("iters", 50), ("probes", 8)):
        int_option(options, key, default)
    number_option(options, "tol", 1e-4)
    check_bn_mode(options)


def run(ctx: ProbeContext, options: Any) -> dict[str, float]:
    check(ctx.net, options)
    net = ctx.net
    samples, k = int(options.get("samples", 2)), int(options.get("k", 4))
    iters, tol, probes = int(options.get("iters", 50)), float(options.get("tol", 1e-4)), int(options.get("probes", 8))
    batch = torch.cat([x for x, _ in ctx.fixed_batches("val")])
    if len(batch) < samples:
        raise ConfigError(f"probe.samples={samples}: the probe's validation batches hold only {len(batch)} images; "
                          "lower probe.samples or raise probe.batches")
    generator = torch.Generator().manual_seed(int(options.get("seed", ctx.seed)))
    labels = [name for name, _ in stage_modules(net)]
    per_stage: dict[str, list[dict]] = {name: [] for name in labels}
    bn, bn_context = eval_bn(ctx, options, batch)
    with bn_context, torch.inference_mode(False), torch.enable_grad():
        h0 = stem_outputs(net, batch[:samples])
        modules = [m for _, m in stage_modules(net)]
        for i in range(samples):
            for s, name in enumerate(labels):
                per_stage[name].append(stage_spectrum(through(modules[: s + 1]), h0[i : i + 1], k, iters, tol,
                                                      probes, generator))
    table = []
    for name in labels:
        rows = per_stage[name]
        svs = np.array([r["singular_values"] for r in rows])
        sq = np.array([r["sv_sq_mean"] for r in rows])
        table.append({
            "stage": name,
            "singular_values": svs.mean(axis=0).tolist(),
            "sigma_max": float(svs[:, 0].mean()),
            "sigma_max_std": float(svs[:, 0].std()),
            "sv_rms": float(np.sqrt(sq.mean())),
            "isometry": float(np.mean([r["isometry"] for r in rows])),
            "iterations_max": int(max(r["iterations"] for r in rows)),
            "inputs": rows[0]["inputs"], "outputs": rows[0]["outputs"],
        })
    last = table[-1]
    result = {"sigma_max": last["sigma_max"], "sv_rms": last["sv_rms"], "isometry": last["isometry"]}
    for row in table:
        result |= {f"{key}/{row['stage']}": row[key] for key in ("sigma_max", "sv_rms", "isometry")}
    record = {"samples": samples, "k": k, "iters": iters, "tol": tol, "probes": probes, "bn": bn, "stages": table}
    ctx.publish(NAME, record, result, lambda title: plot_run(table, title))
    return result


# -- figures ------------------------------------------------------------------------------

def plot_run(table: list[dict], title: str = "") -> Figure:
    """Left: the top singular values and the RMS singular value per stage (log scale).
    Right: the isometry ratio ``mean(s^4) / mean(s^2)^2`` per stage."""
    fig = Figure(figsize=(9, 3.4), dpi=90)
    ax_s, ax_i = fig.subplots(1, 2)
    x = np.arange(len(table))
    svs = np.array([row["singular_values"] for row in table])
    for j in range(svs.shape[1]):
        ax_s.plot(x, svs[:, j], marker="o", ms=3, color="C0", alpha=1.0 - 0.6 * j / max(1, svs.shape[1]),
                  label="top singular values" if j == 0 else None)
    ax_s.plot(x, [row["sv_rms"] for row in table], marker="s", ms=3, color="C1", ls="--", label="RMS singular value")
    ax_s.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax_s.set_yscale("log")
    ax_i.plot(x, [row["isometry"] for row in table], marker="o", ms=3, color="C2")
    ax_i.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax_i.set_yscale("log")
    for ax in (ax_s, ax_i):
        ax.set_xticks(x)
        ax.set_xticklabels([row["stage"] for row in table], fontsize=8)
        ax.set_xlabel("Jacobian: stem output -> stage output")
    ax_s.set_ylabel("singular value")
    ax_s.set_title("singular values of the stage Jacobian", fontsize=9)
    ax_s.legend(fontsize=7)
    ax_i.set_ylabel("mean(s^4) / mean(s^2)^2")
    ax_i.set_title("spread of the spectrum (1 = isometry)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def comparison_figure(records: list[dict]) -> Figure:
    """Top singular value, RMS singular value and isometry ratio per stage, one line per run
    (solid: skip, dashed: plain; colour: depth)."""
    fig = Figure(figsize=(13, 3.8), dpi=90)
    axes = fig.subplots(1, 3)
    depths = sorted({r["depth"] for r in records})
    cmap = matplotlib.colormaps["viridis"]
    for r in sorted(records, key=lambda r: (r["depth"], label(r))):
        colour = cmap(depths.index(r["depth"]) / max(1, len(depths) - 1))
        style = "--" if is_plain(r) else "-"
        x = np.arange(len(r["stages"]))
        for ax, key in zip(axes, ("sigma_max", "sv_rms", "isometry")):
            ax.plot(x, [row[key] for row in r["stages"]], style, marker="o", ms=3, color=colour,
                    label=f"{label(r)} {r['depth']}")
    stage_names = max((r["stages"] for r in records), key=len)
    for ax, what in zip(axes, ("top singular value", "RMS singular value", "mean(s^4) / mean(s^2)^2")):
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.set_xticks(np.arange(len(stage_names)))
        ax.set_xticklabels([row["stage"] for row in stage_names], fontsize=8)
        ax.set_xlabel("Jacobian: stem output -> stage output")
        ax.set_title(what, fontsize=9)
    if len(records) <= 12:
        axes[0].legend(fontsize=6)
    fig.suptitle("Input-output Jacobian per stage (Pennington et al. 2017): isometry keeps singular values "
                 "near 1 (solid: skip, dashed: plain)", fontsize=9)
    fig.tight_layout()
    return fig


# Summary keys of the sweep's comparison table (skipstudy.probes.comparison).
COMPARISON_COLUMNS = ("sigma_max", "sv_rms", "isometry")
