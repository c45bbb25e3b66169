"""What the monitor computes (after Cockpit, Schneider et al. 2021): a *statistic* maps the
tensor(s) at one hook site (:data:`SITES`) to a float64 vector of sums whose first element
counts what was summed (``None`` adds nothing), either one tensor or a tuple of parts
(``skipstudy.monitor.sums.Part``: host-known numbers, device tensors, norms to square), which
the hot path packs for a whole step at once. The sums are added over micro-batches and
processes into ``[units, width]``, zero-padded. A *quantity* maps the step's
:class:`StepTensors` to one value per layer, block or step, written where its statistic's count
is nonzero. A new per-layer quantity is one module with both::

    @statistic("out_abs", site="output_grad", width=2)
    def out_abs(g):
        return torch.stack((count(g), g.abs().sum(dtype=torch.float64)))

    quantity("grad_mean_abs/output", "out_abs", lambda s: s["out_abs"][:, 1] / s["out_abs"][:, 0] * s.out_grad_scale)

Quantities run on the sums once they reached the host (one step late on an accelerator:
``skipstudy.monitor.packing``), in numpy (float64 arrays: no torch op); statistics run in the
hooks, on the device, where an ``.item()``, ``.cpu()``, ``float()`` or boolean mask would be a host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from torch import Tensor

from skipstudy.monitor.sums import (
    HistogramBins,
    Part,
    activation_parts,
    channel_parts,
    log_abs_histogram,
    norms,
    output_grad_parts,
    squares,
)

# Hook sites and what their statistics get. Layers: a tracked layer's output (``output``) and
# the gradient w.r.t. it (``output_grad``). Blocks: the block's output, the branch's last
# tensor before the addition, their gradients, and ``split``: (input gradient, its part
# through the branch, its part through the shortcut or None for a plain block).
SITES = {"output": "layers", "output_grad": "layers", "block": "blocks", "block_grad": "blocks",
         "branch": "blocks", "branch_grad": "blocks", "split": "blocks"}


@dataclass(frozen=True)
class Statistic:
    name: str
    site: str
    fn: Callable[..., Tensor | tuple | None]
    width: int  # at least; the same on every process, or their sums could not be added
    hist: bool = False  # only on histogram steps; its sums go to the host whole


STATISTICS: dict[str, Statistic] = {}


def statistic(name: str, site: str, width: int, hist: bool = False):
    if site not in SITES:
        raise ValueError(f"site={site!r}; valid: {', '.join(SITES)}")

    def register(fn):
        STATISTICS[name] = Statistic(name, site, fn, width, hist)
        return fn

    return register


@dataclass(frozen=True)
class Quantity:
    name: str
    fn: Callable[[StepTensors], np.ndarray]
    # A statistic's name (written where its count is nonzero), "weight" (layers with a weight
    # gradient), "params" (one value a step) or "derived" (one value a step, unless NaN).
    needs: str

    @property
    def over(self) -> str:
        if self.needs in STATISTICS:
            return SITES[STATISTICS[self.needs].site]
        return "layers" if self.needs == "weight" else "step"

    @property
    def per_layer(self) -> bool:
        return self.over == "layers"


QUANTITIES: dict[str, Quantity] = {}


def quantity(name: str, needs: str, fn: Callable[[StepTensors], np.ndarray] | None = None):
    """Register ``fn(StepTensors) -> np.ndarray`` (``[L]``, ``[B]`` or 0-d); without ``fn``, a decorator."""

    def register(fn):
        QUANTITIES[name] = Quantity(name, fn, needs)
        return fn

    return register if fn is None else register(fn)


@dataclass
class StepTensors:
    """One optimizer step's data on the host, layers in forward order: ``sums`` per statistic
    ``[units, width]``, each layer's ``weight.grad`` (None: no weight or grad) and weight size
    (0: none), every parameter gradient, and ``out_grad_scale``, the factor turning summed
    gradients into gradients of the loss the optimizer minimises. The hot path passes the
    gradients' norms instead (``weight_norm`` per layer, ``grad_norms`` of every parameter),
    taken on the device. Numbers become float64 numpy arrays (CPU tensors are accepted)."""

    sums: dict[str, np.ndarray]
    weight_grads: list[Tensor | None] = field(default_factory=list)
    weight_numel: np.ndarray | None = None
    all_grads: list[Tensor] = field(default_factory=list)
    out_grad_scale: np.ndarray = field(default_factory=lambda: np.float64(1.0))
    weight_norm: np.ndarray | None = None
    grad_norms: np.ndarray | None = None
    _values: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.sums = {name: np.asarray(t, dtype=np.float64) for name, t in self.sums.items()}
        for key in ("weight_numel", "out_grad_scale", "weight_norm", "grad_norms"):
            if getattr(self, key) is not None:
                setattr(self, key, np.asarray(getattr(self, key), dtype=np.float64))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sums[name]

    def value(self, name: str) -> np.ndarray:
        """Quantity ``name``, computed once per step (others build on it)."""
        if name not in self._values:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN are values here
                self._values[name] = np.asarray(QUANTITIES[name].fn(self), dtype=np.float64)
        return self._values[name]


# ------------------------------------------------------------------ per layer
# Over micro-batches k, sqrt(sum_k ||dL/dy_k||^2) is the norm of the gradient of the
# accumulated loss w.r.t. the layer's output over the whole effective batch.

BINS = HistogramBins()
statistic("output", "output_grad", width=2)(output_grad_parts)
statistic("activation", "output", width=5)(activation_parts)
statistic("hist", "output_grad", width=3 + BINS.bins, hist=True)(partial(log_abs_histogram, spec=BINS))

quantity("grad_norm/output", "output", lambda s: np.sqrt(s["output"][:, 1]) * s.out_grad_scale)
quantity("grad_rms/output", "output", lambda s: s.value("grad_norm/output") / np.sqrt(s["output"][:, 0]))
quantity("grad_norm/weight", "weight", lambda s: s.weight_norm if s.weight_norm is not None else norms(s.weight_grads))
quantity("grad_rms/weight", "weight", lambda s: s.value("grad_norm/weight") / np.sqrt(s.weight_numel))
quantity("grad_norm/total", "params", lambda s: np.linalg.norm(
    s.grad_norms if s.grad_norms is not None else norms(s.all_grads)))
quantity("act/mean", "activation", lambda s: s["activation"][:, 1] / s["activation"][:, 0])


@quantity("act/std", needs="activation")
def act_std(s: StepTensors) -> np.ndarray:
    # Population std over all elements, combined from each call's centred sums (activation_sums).
    n, s1, m2, q = s["activation"][:, :4].T
    return np.sqrt(np.maximum((m2 + (q - s1 * s1 / n)) / n, 0.0))


quantity("act/zero_frac", "activation", lambda s: 1.0 - s["activation"][:, 4] / s["activation"][:, 0])


@quantity("grad_decay/slope", needs="derived")
def grad_decay_slope(s: StepTensors) -> np.ndarray:
    """Least-squares slope of log10 output-gradient RMS against the layer's index in forward
    order: decades gained per layer towards the output. Layers with no, zero or non-finite
    output gradient are left out; NaN with fewer than two left."""
    rms = s.value("grad_rms/output")
    ok = (s["output"][:, 0] > 0) & np.isfinite(rms) & (rms > 0)
    w = ok.astype(np.float64)
    y = np.log10(np.where(ok, rms, 1.0))
    x = np.arange(rms.size, dtype=np.float64)
    n, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
    return (n * (w * x * y).sum() - sx * sy) / (n * (w * x * x).sum() - sx * sx)


# ------------------------------------------------------------------ per residual block
# The input gradient g = s + b: b through the branch, s through the shortcut. A plain block
# has no s: its shortcut, ratio and cos are not written, never a fake 0.


_SPLIT: list = [None]  # the last split's tensors and squared norms: both statistics below share them


def _split_squares(grad: Tensor, branch: Tensor, shortcut: Tensor | None) -> list[Part]:
    """``[||b||^2, ||s||^2, ||g||^2]`` (``[||b||^2]`` without a shortcut) in float64, on an
    accelerator from one fused op (``sums.squares``), computed once for the two split statistics."""
    last = _SPLIT[0]
    if last is None or last[0] is not grad or last[1] is not branch or last[2] is not shortcut:
        last = _SPLIT[0] = (grad, branch, shortcut, squares([branch] if shortcut is None else [branch, shortcut, grad]))
    return last[3]


@statistic("split_branch", "split", width=2)
def split_branch(grad: Tensor, branch: Tensor, shortcut: Tensor | None) -> tuple:
    """``[numel, ||b||^2]``."""
    return branch.numel(), _split_squares(grad, branch, shortcut)[0]


@statistic("split_shortcut", "split", width=3)
def split_shortcut(grad: Tensor, branch: Tensor, shortcut: Tensor | None) -> tuple | None:
    """``[numel, ||s||^2, ||g||^2]``: <s, b> = (||g||^2 - ||s||^2 - ||b||^2) / 2 needs no
    elementwise product; g is s + b rounded once per element by autograd, so the cosine is
    within about 1e-7 (ratio + 1 / ratio) of the exact one in float32."""
    if shortcut is None:
        _SPLIT[0] = None  # the last user (registered after split_branch): hold no gradients
        return None
    _, s, g = _split_squares(grad, branch, shortcut)
    _SPLIT[0] = None
    return grad.numel(), s, g


quantity("grad_split/shortcut", "split_shortcut", lambda s: np.sqrt(s["split_shortcut"][:, 1]) * s.out_grad_scale)
quantity("grad_split/branch", "split_branch", lambda s: np.sqrt(s["split_branch"][:, 1]) * s.out_grad_scale)
# ||dL/dx through the shortcut|| / ||dL/dx through the branch||
quantity("grad_split/ratio", "split_shortcut", lambda s: np.sqrt(s["split_shortcut"][:, 1] / s["split_branch"][:, 1]))


@quantity("grad_split/cos", needs="split_shortcut")
def grad_split_cos(s: StepTensors) -> np.ndarray:
    ss, gg, bb = s["split_shortcut"][:, 1], s["split_shortcut"][:, 2], s["split_branch"][:, 1]
    return (gg - ss - bb) / 2 / np.sqrt(ss * bb)


# Signal propagation (Brock et al. 2021, "Characterizing signal propagation to close the
# performance gap in unnormalized ResNets"): channel statistics of the block output, the
# branch output and their gradients, averaged over channels. The gradients' as square roots:
# gradients of 1e-30 have variances of 1e-60, below float32, TensorBoard's precision.
for _site in ("block", "block_grad", "branch", "branch_grad"):
    statistic(_site, _site, width=4)(channel_parts)  # padded to the widest block's channels


def _channel_stats(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average over channels of (channel mean)^2 and of channel variance, ``[B]`` each."""
    m, n, s2, per_channel = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3:]
    m = np.where(m > 0, m, 1.0)
    channels = np.where(n > 0, n / m, 1.0)
    mean_sq = np.square(per_channel / m[:, None]).sum(1) / channels
    return mean_sq, np.maximum(s2 / np.where(n > 0, n, 1.0) - mean_sq, 0.0)


quantity("spp/mean_sq", "block", lambda s: _channel_stats(s["block"])[0])
quantity("spp/var", "block", lambda s: _channel_stats(s["block"])[1])
quantity("spp/branch_var", "branch", lambda s: _channel_stats(s["branch"])[1])
# sqrt(average over channels of the squared channel mean of dL/d(block output))
quantity("spp/grad_mean_rms", "block_grad", lambda s: np.sqrt(_channel_stats(s["block_grad"])[0]) * s.out_grad_scale)
# sqrt(average channel variance of dL/d(block output)), of dL/d(branch output)
quantity("spp/grad_std", "block_grad", lambda s: np.sqrt(_channel_stats(s["block_grad"])[1]) * s.out_grad_scale)
quantity("spp/grad_branch_std", "branch_grad", lambda s: np.sqrt(_channel_stats(s["branch_grad"])[1]) * s.out_grad_scale)
