"""What the monitor computes: per-layer quantities as device tensors, never host numbers.

Two levels, after Cockpit (Schneider et al. 2021, "Cockpit: A Practical Debugging Tool for
the Training of Deep Neural Networks"): quantities are computed apart from where they are
shown.

1. *Sums*, taken in the hooks from one tensor at a time (a layer's output in the forward
   pass, the gradient w.r.t. that output in the backward pass). They are sums so that
   micro-batches (gradient accumulation) and processes (DDP) combine by adding.
2. *Quantities*, functions of a :class:`StepTensors` (the step's sums for all tracked
   layers stacked, plus the accumulated weight gradients) that return one value per layer.

Adding a quantity means one function and one ``@quantity`` line::

    @quantity("grad_rms/output", needs="output")
    def grad_rms_output(s: StepTensors) -> Tensor:
        return s.once(grad_norm_output) / s.out[:, 0].sqrt()

Its tag is ``<name>/<layer>``. All of a step's quantities are stacked into one tensor and
moved to the host once (``callback._to_host``); nothing here may call ``.item()``,
``.cpu()``, ``float()`` or use a boolean mask (all of which wait for the device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ---------------------------------------------------------------- sums taken in the hooks

# Sums are accumulated in float64: per-step sums of squares over ~10^8 elements, added over
# micro-batches and processes, must not lose digits (they are 0-d tensors, the cost is nil).
SUM_DTYPE = torch.float64


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Reduction dtype: at least float32 (bf16/fp16 gradients under AMP), float64 kept."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def output_grad_sums(grad: Tensor) -> Tensor:
    """``[numel, sum of squares]`` of the gradient w.r.t. a layer's output (one backward call)."""
    sq = torch.linalg.vector_norm(grad, dtype=_acc_dtype(grad)).to(SUM_DTYPE).square()
    return torch.stack((sq.new_full((), grad.numel()), sq))


def activation_sums(y: Tensor) -> Tensor:
    """``[numel, sum, sum of squares, nonzeros]`` of a layer's output (one forward call).

    The sum of squares is a norm squared, not ``var_mean``: on the CPU ``var_mean`` is ~50x
    slower than ``vector_norm`` and this runs every recorded step for every layer.
    """
    dt = _acc_dtype(y)
    s1 = y.sum(dtype=dt).to(SUM_DTYPE)
    s2 = torch.linalg.vector_norm(y, dtype=dt).to(SUM_DTYPE).square()
    return torch.stack((s1.new_full((), y.numel()), s1, s2, _nonzeros(y)))


# float32 sums of ones are exact below 2**24.
_COUNT_CHUNK = 1 << 23


def _nonzeros(y: Tensor) -> Tensor:
    """Number of nonzero elements, as a float64 0-d tensor."""
    if y.device.type != "cpu":
        return torch.count_nonzero(y).to(SUM_DTYPE)  # one pass on an accelerator
    # On the CPU count_nonzero branches per element: on post-ReLU data (half zeros) it took
    # 8.7 ms for a 128x16x32x32 tensor against 0.35 ms for |sign(y)| summed (1 thread).
    ones = torch.sign(y).abs_()
    if ones.numel() <= _COUNT_CHUNK:
        return ones.sum(dtype=torch.float32).to(SUM_DTYPE)
    parts = [c.sum(dtype=torch.float32) for c in ones.reshape(-1).split(_COUNT_CHUNK)]
    return torch.stack(parts).to(SUM_DTYPE).sum()


@dataclass(frozen=True)
class HistogramBins:
    """Fixed bins over log10|g| so that counts from micro-batches, processes and steps add up.

    Gradient elements equal to zero (inactive ReLUs) are left out: their log is -inf and they
    would otherwise be one tall spike; elements below ``10**lo`` are left out too, elements
    above ``10**hi`` (and +inf) go into the last bin.
    """

    lo: float = -30.0
    hi: float = 6.0
    per_decade: int = 10

    @property
    def bins(self) -> int:
        return int(round((self.hi - self.lo) * self.per_decade))

    def edges(self) -> list[float]:
        return [self.lo + i / self.per_decade for i in range(self.bins + 1)]


# torch.histc counts in the input's dtype; float32 stops counting at 2**24, so large layers
# (a ResNet-50 stem output at batch 256 has 2 * 10**8 elements) are binned in chunks.
_HIST_CHUNK = 1 << 23


def _histc(x: Tensor, spec: HistogramBins) -> Tensor:
    return torch.histc(x, bins=spec.bins, min=spec.lo, max=spec.hi)


def _bincount_histogram(x: Tensor, spec: HistogramBins) -> Tensor:
    """``torch.histc``'s counts with ``torch.bincount`` (deterministic on CUDA, no host sync):
    elements outside ``[lo, hi]`` (and NaN) go to an extra bin that is dropped."""
    index = ((x - spec.lo) * spec.bins / (spec.hi - spec.lo)).floor_().clamp_(max=spec.bins - 1)
    inside = (x >= spec.lo) & (x <= spec.hi)
    index = torch.where(inside, index, spec.bins).long()
    return torch.bincount(index, minlength=spec.bins + 1)[: spec.bins]


def log_abs_histogram(grad: Tensor, spec: HistogramBins) -> Tensor:
    """``[count per bin..., sum x, sum x^2]`` for x = log10|g| over the binned elements."""
    x = grad.detach().abs().to(torch.float32).log10_().clamp_(max=spec.hi).flatten()
    counts = torch.zeros(spec.bins, dtype=SUM_DTYPE, device=grad.device)
    # torch.histc on CUDA refuses to run under trainer.deterministic=true (torch's
    # deterministic mode); bincount is allowed there and gives the same counts.
    count = _bincount_histogram if x.is_cuda and torch.are_deterministic_algorithms_enabled() else _histc
    for chunk in x.split(_HIST_CHUNK):
        counts += count(chunk, spec).to(SUM_DTYPE)
    # Elements histc counted: finite and >= lo (comparisons with NaN and -inf are False).
    inside = torch.where(x >= spec.lo, x, 0.0).to(SUM_DTYPE)
    return torch.cat((counts, inside.sum().unsqueeze(0), inside.square().sum().unsqueeze(0)))


# ------------------------------------------------------------------- one step, all layers


@dataclass
class StepTensors:
    """All tracked layers' data for one optimizer step, on the device, in forward order.

    Attributes:
        out: ``[L, 2]`` output-gradient sums (numel, sum of squares), summed over the step's
            micro-batches and over processes; zeros for a layer that got no output gradient.
        act: ``[L, 4]`` activation sums (numel, sum, sum of squares, nonzeros), same summing.
        weight_grads: each layer's accumulated ``weight.grad`` (None: no weight or no grad).
        weight_numel: ``[L]`` number of weight elements (0: no weight).
        all_grads: every parameter gradient of the LightningModule, for the total norm.
        out_grad_scale: 0-d factor that turns the summed output gradients into gradients of
            the loss the optimizer minimises: ``1 / (loss scale * world size)``.
    """

    out: Tensor
    act: Tensor
    weight_grads: list[Tensor | None]
    weight_numel: Tensor
    all_grads: list[Tensor]
    out_grad_scale: Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def once(self, fn: Callable[[StepTensors], Tensor]) -> Tensor:
        """``fn(self)``, computed once per step (a quantity used by others, e.g. a norm by its rms)."""
        if fn not in self._cache:
            self._cache[fn] = fn(self)
        return self._cache[fn]


@dataclass(frozen=True)
class Quantity:
    name: str
    fn: Callable[[StepTensors], Tensor]
    needs: str  # "output" | "weight" | "activation" | "params"
    per_layer: bool


QUANTITIES: dict[str, Quantity] = {}


def quantity(name: str, needs: str, per_layer: bool = True):
    """Register ``fn(StepTensors) -> Tensor`` ([L] per layer, or 0-d when ``per_layer=False``)."""

    def register(fn: Callable[[StepTensors], Tensor]) -> Callable[[StepTensors], Tensor]:
        QUANTITIES[name] = Quantity(name, fn, needs, per_layer)
        return fn

    return register


def _norms(tensors: list[Tensor | None], like: Tensor) -> Tensor:
    """L2 norm of each tensor (0 for None) as one float64 vector, via one fused foreach call."""
    present = [t for t in tensors if t is not None]
    if not present:
        return like.new_zeros(len(tensors), dtype=SUM_DTYPE)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
    it = iter(torch._foreach_norm(present, 2, dtype=dtype))
    zero = like.new_zeros((), dtype=dtype)
    return torch.stack([next(it) if t is not None else zero for t in tensors]).to(SUM_DTYPE)


@quantity("grad_norm/output", needs="output")
def grad_norm_output(s: StepTensors) -> Tensor:
    # With micro-batches k: sqrt(sum_k ||dL/dy_k||^2) is the norm of the gradient of the
    # optimised (accumulated) loss w.r.t. the layer's output over the whole effective batch.
    return s.out[:, 1].sqrt() * s.out_grad_scale


@quantity("grad_rms/output", needs="output")
def grad_rms_output(s: StepTensors) -> Tensor:
    return s.once(grad_norm_output) / s.out[:, 0].sqrt()


@quantity("grad_norm/weight", needs="weight")
def grad_norm_weight(s: StepTensors) -> Tensor:
    return _norms(s.weight_grads, s.out)


@quantity("grad_rms/weight", needs="weight")
def grad_rms_weight(s: StepTensors) -> Tensor:
    return s.once(grad_norm_weight) / s.weight_numel.sqrt()


@quantity("grad_norm/total", needs="params", per_layer=False)
def grad_norm_total(s: StepTensors) -> Tensor:
    return torch.linalg.vector_norm(_norms(s.all_grads, s.out))


@quantity("act/mean", needs="activation")
def act_mean(s: StepTensors) -> Tensor:
    return s.act[:, 1] / s.act[:, 0]


@quantity("act/std", needs="activation")
def act_std(s: StepTensors) -> Tensor:
    # Population std over all elements of the output (batch, channels, positions).
    mean = s.once(act_mean)
    return (s.act[:, 2] / s.act[:, 0] - mean.square()).clamp(min=0).sqrt()


@quantity("act/zero_frac", needs="activation")
def act_zero_frac(s: StepTensors) -> Tensor:
    return 1.0 - s.act[:, 3] / s.act[:, 0]
