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

Its tag is ``<name>/<layer>``; a quantity ``over="blocks"`` returns one value per residual
block (tag ``<name>/<block>``), one ``over="step"`` a single value (tag ``<name>``). All of a
step's quantities are stacked into one tensor and
moved to the host once (``callback._to_host``); nothing here may call ``.item()``,
``.cpu()``, ``float()`` or use a boolean mask (all of which wait for the device), except
:func:`cpu_value` on a CPU tensor, where there is no device to wait for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ---------------------------------------------------------------- sums taken in the hooks

# Sums are kept in float64: a sum of squares of float32 elements (1e-45 .. 3e38) always fits
# (1e-90 .. 1e77 times the element count), added over micro-batches and processes without
# losing digits (they are 0-d tensors, the cost is nil).
SUM_DTYPE = torch.float64

# Rows of this many elements are reduced first, then the row results in float64: a single
# float32 reduction over 10^6 elements drifts by ~3e-5 relative (measured on the CPU), rows
# of 1024 keep the sum within ~1e-9 of a float64 reference.
_ROW = 1024


def _flat(t: Tensor) -> Tensor:
    """``t`` as a 1-D tensor in memory order: a view for contiguous and channels_last tensors
    (the layouts convs produce), a copy otherwise."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where a copy of the elements is worked on: float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# One reusable buffer per (device, dtype) on the CPU: a fresh multi-megabyte tensor there is a
# fresh mmap whose pages fault in on first write, which cost as much as the arithmetic.
# Accelerators allocate from their caching allocator, which is cheap. Hooks run one at a time.
_SCRATCH: dict[tuple[str, torch.dtype], Tensor] = {}


def _buffer(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D tensor of ``ceil(n / _ROW) * _ROW`` elements whose tail after ``n`` is zero."""
    size = -(-n // _ROW) * _ROW
    if device.type != "cpu":
        z = torch.empty(size, dtype=dtype, device=device)
    else:
        key = (str(device), dtype)
        held = _SCRATCH.get(key)
        if held is None or held.numel() < size:
            held = _SCRATCH[key] = torch.empty(size, dtype=dtype, device=device)
        z = held[:size]
    if n < size:
        z[n:].zero_()
    return z


def _moments(rows: Tensor, exponent: Tensor | int, plain_sum: bool) -> tuple[Tensor, Tensor | None]:
    """``(sum of squares, sum)`` in float64 of ``rows * 2**exponent``: per-row norms, then the
    rows in float64."""
    per_row = torch.linalg.vector_norm(rows, dim=1).to(SUM_DTYPE)
    sq = torch.ldexp(per_row.square().sum(), torch.as_tensor(2 * exponent, dtype=SUM_DTYPE, device=rows.device))
    if not plain_sum:
        return sq, None
    total = rows.sum(dtype=_wide(rows.dtype)).to(SUM_DTYPE)
    return sq, torch.ldexp(total, torch.as_tensor(exponent, dtype=SUM_DTYPE, device=rows.device))


def cpu_value(t: Tensor) -> float:
    """A 0-d CPU tensor's value. Only for decisions on the CPU, where reading a number waits
    for nothing; an accelerator's tensors must never come here (that would be a sync)."""
    if t.device.type != "cpu":
        raise RuntimeError(f"cpu_value called on a {t.device} tensor: a host sync in the monitor's hot path")
    return float(t)


def _in_float32_range(sq: Tensor, n: int) -> bool:
    """Whether an unscaled float32 sum of squares is exact to ~1e-7: finite (no square
    overflowed) and so large that squares flushed below 2**-126 (at most n of them) do not
    matter. Reads one number, so it is used on the CPU only, where nothing waits for it."""
    v = cpu_value(sq)
    return math.isfinite(v) and v >= n * 2.0**-126 * 1e7


def _shifted_rows(flat: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(rows, exponent)``: ``(flat - shift) * 2**-exponent`` as ``[R, _ROW]`` zero-padded rows,
    with the power of two chosen so the largest magnitude lies in [0.5, 1).

    The scaling is why a sum of squares survives: squares of float32 (or bf16) elements below
    1e-19 underflow and above 1e19 overflow a float32 accumulator, while the scaled ones stay
    near 1; only elements 2**-63 times smaller than the largest can underflow, and their
    squares are below 1e-38 of the sum. A power of two multiplies exactly. The copy is float32
    for bf16/fp16 input (so y - mean is rounded once, in float32), float64 for float64.
    """
    hi, lo = flat.amax(), flat.amin()
    if shift is None:
        big = torch.maximum(hi, lo.neg())
    else:
        big = torch.maximum(hi - shift, shift - lo)
    wide = _wide(flat.dtype)
    _, exponent = torch.frexp(big.to(wide))
    if wide == torch.float32:
        # 2**-e must itself be a normal float32: largest elements below 2**-126 (subnormal)
        # are scaled by 2**126 only, which still lifts them above 2**-24.
        exponent = exponent.clamp(-126, 126)
    scale = torch.ldexp(torch.ones((), dtype=wide, device=flat.device), exponent.neg())
    n = flat.numel()
    z = _buffer(n, wide, flat.device)
    if shift is None:
        torch.mul(flat, scale, out=z[:n])
    else:
        torch.sub(flat.to(wide), shift, out=z[:n]).mul_(scale)  # widened: sub computes in its input's dtype
    return z.view(-1, _ROW), exponent


def _sums(flat: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(sum(d**2), sum(d))`` of ``d = flat - shift`` (``sum(d)`` only with a shift), float64
    0-d tensors, right to ~1e-7 relative for every finite float32, bf16 or fp16 input
    (elements from 1e-45 to 3e38), without a host sync on an accelerator.

    A plain ``vector_norm`` of float32 elements near 1e-25 returns exactly 0 (their squares
    underflow) and near 1e25 inf; one float32 accumulator over 2M elements drifts by ~3e-5.
    So: rows of ``_ROW`` elements reduced in float32, the rows in float64, and elements scaled
    by a power of two first (:func:`_shifted_rows`). On the CPU the unscaled rows are tried
    first and kept when :func:`_in_float32_range` says nothing was lost (saving two passes).
    Non-finite elements give a non-finite sum.
    """
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        if shift is None and n % _ROW == 0:
            rows = flat.view(-1, _ROW)  # no copy at all
        else:
            z = _buffer(n, torch.float32, flat.device)
            if shift is None:
                z[:n].copy_(flat)
            else:
                torch.sub(flat, shift, out=z[:n])
            rows = z.view(-1, _ROW)
        sq, total = _moments(rows, 0, shift is not None)
        if _in_float32_range(sq, n):
            return sq, total
    rows, exponent = _shifted_rows(flat, shift)
    return _moments(rows, exponent, shift is not None)


def sum_of_squares(t: Tensor) -> Tensor:
    """``sum(t**2)`` as a float64 0-d tensor; see :func:`_sums`."""
    flat = _flat(t)
    if flat.numel() == 0:
        return torch.zeros((), dtype=SUM_DTYPE, device=t.device)
    return _sums(flat)[0]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Reduction dtype: at least float32 (bf16/fp16 gradients under AMP), float64 kept."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def output_grad_sums(grad: Tensor) -> Tensor:
    """``[numel, sum of squares]`` of the gradient w.r.t. a layer's output (one backward call)."""
    sq = sum_of_squares(grad)
    return torch.stack((sq.new_full((), grad.numel()), sq))


# Width of activation_sums' vector.
ACT_WIDTH = 5


def activation_sums(y: Tensor) -> Tensor:
    """``[numel, sum, M2, sum * mean, nonzeros]`` of a layer's output (one forward call).

    ``M2 = sum((y - mean)**2)`` is taken about this call's own mean (two passes), not as
    ``sum(y**2) - numel * mean**2``: that one-pass form loses every digit of the variance
    when |mean| >> std (a block output, a layer with a large bias). The fields add up over
    micro-batches and processes k: the variance of all of them is
    ``(sum_k M2_k + sum_k sum_k * mean_k - (sum_k sum_k)**2 / numel) / numel`` (Chan et al.
    1979); the cancellation left there is between group means, in float64.
    ``torch.var_mean`` would do the two passes in one call, but on the CPU it is ~50x slower
    than these reductions, and this runs every recorded step for every layer.
    """
    flat = _flat(y)
    n = flat.numel()
    if n == 0:
        return torch.zeros(ACT_WIDTH, dtype=SUM_DTYPE, device=y.device)
    # Pass 1: a float32 mean (bf16/fp16 summed in float32). Pass 2 (one scaled copy): the sum
    # and the sum of squares of y - mean, from which the corrected two-pass formulas give the
    # float64 sum and M2 (Chan, Golub & LeVeque 1983): the float32 mean's own rounding
    # (1e-7 of |mean|, which can exceed the std) cancels out.
    total = flat.sum(dtype=_acc_dtype(y))
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # On the CPU, where reading a number waits for nothing, try the one-pass form first
        # and keep it where it is safe: with sum(y**2) right to ~2e-7 (row-wise, as in
        # _sums), M2 = sum(y**2) - sum**2 / numel is right to ~1e-6 while mean**2 <= 9 var,
        # i.e. sum(y**2) <= 10 * M2 (post-ReLU outputs, conv outputs); other layers take the
        # centred pass below. This saves writing a copy of every output.
        sq = _sums(flat)[0]
        s1 = total.to(SUM_DTYPE)
        m2 = sq - s1 * s1 / n
        if 10 * cpu_value(m2) >= cpu_value(sq):
            return torch.stack((s1.new_full((), n), s1, m2, s1 * s1 / n, _nonzeros(flat)))
    shift = total / n
    d2, d1 = _sums(flat, shift)
    s1 = shift.to(SUM_DTYPE) * n + d1
    m2 = d2 - d1 * d1 / n
    return torch.stack((s1.new_full((), n), s1, m2, s1 * s1 / n, _nonzeros(flat)))


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


def _sq(t: Tensor) -> Tensor:
    """Sum of squares, accumulated in float64 without a float64 copy of ``t`` (a 1e-30 gradient
    squares to 1e-60, below float32's range; allocating copies dominated the CPU cost)."""
    return torch.linalg.vector_norm(t.detach(), dtype=SUM_DTYPE).square()


def split_sums(grad: Tensor, branch: Tensor, shortcut: Tensor | None) -> Tensor:
    """``[||s||^2, ||b||^2, <s, b>, numel]`` of the two parts of the gradient ``grad = s + b``
    reaching a residual block's input: ``b`` through the branch, ``s`` through the shortcut
    (None: a plain block, whose input gradient is the branch part alone; shortcut entries 0).

    ``<s, b> = (||grad||^2 - ||s||^2 - ||b||^2) / 2``: no elementwise product. ``grad`` is
    ``s + b`` rounded once per element by autograd, so the cosine is within about
    ``1e-7 (ratio + 1 / ratio)`` of the exact one in float32 (1e-16 in float64).
    """
    bb = _sq(branch)
    if shortcut is None:
        zero = bb.new_zeros(())
        return torch.stack((zero, bb, zero, bb.new_full((), branch.numel())))
    ss = _sq(shortcut)
    return torch.stack((ss, bb, (_sq(grad) - ss - bb) / 2, bb.new_full((), branch.numel())))


def channel_sums(t: Tensor) -> Tensor:
    """``[C + 2]``: per-channel sums (channel = dim 1), the sum of squares of all elements, and
    the number of elements per channel. All add over micro-batches and processes.

    The average channel variance follows without per-channel squares: with m elements per
    channel, ``mean_c var_c = sum(x^2) / (C m) - mean_c (sum_c / m)^2``. The sum of squares is
    a float64 norm (1e-30 gradients square to 1e-60, below float32); per-channel ``var_mean``
    was ~30x slower on the CPU. Relative error of the variance ~1e-7 (mean / std)^2: exact
    enough for block outputs and gradients, whose channel means are not >> their std.
    """
    t = t.detach()
    dims = [d for d in range(t.dim()) if d != 1]
    s1 = t.sum(dim=dims, dtype=torch.float32 if t.dtype != torch.float64 else torch.float64).to(SUM_DTYPE)
    s2 = torch.linalg.vector_norm(t, dtype=SUM_DTYPE).square()
    return torch.cat((s1, s2.reshape(1), s2.new_full((1,), t.numel() // t.shape[1])))


@dataclass(frozen=True)
class HistogramBins:
    """Fixed bins over log10|g| so that counts from micro-batches, processes and steps add up.

    Gradient elements equal to zero (inactive ReLUs) are left out: their log is -inf and they
    would otherwise be one tall spike. The default range holds every nonzero float32 (from
    1.4e-45, log10 = -44.9, to 3.4e38), bf16 and fp16 element, so a vanishing gradient of
    1e-35 is binned, not lost; float64 elements below ``10**lo`` go into the first bin,
    elements above ``10**hi`` (and +inf) into the last.
    """

    lo: float = -46.0
    hi: float = 39.0
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
    g = grad.detach().abs()
    if g.dtype == torch.float64:
        # float64 elements can lie below float32's range: take the log first, count those
        # below 10**lo in the first bin rather than dropping them (zeros stay out: log = -inf).
        x = g.log10()
        x = torch.where(x > -math.inf, x.clamp(min=spec.lo), x).to(torch.float32)
    else:  # float32 (1e-45 .. 3e38), bf16 and fp16 all lie inside [lo, hi)
        x = g.to(torch.float32).log10_()
    x = x.clamp_(max=spec.hi).flatten()
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
        act: ``[L, 5]`` activation sums (numel, sum, centred sum of squares, sum * mean,
            nonzeros; see :func:`activation_sums`), same summing.
        weight_grads: each layer's accumulated ``weight.grad`` (None: no weight or no grad).
        weight_numel: ``[L]`` number of weight elements (0: no weight).
        all_grads: every parameter gradient of the LightningModule, for the total norm.
        out_grad_scale: 0-d factor that turns the summed output gradients into gradients of
            the loss the optimizer minimises: ``1 / (loss scale * world size)``.
        split: ``[B, 4]`` per residual block, :func:`split_sums` of its input gradient, summed.
        spp: ``[B, 4, C_max + 2]`` :func:`channel_sums` of (block output, branch output,
            their gradients) per block, zero-padded at the end.
        channels: ``[B]`` each block's output channels.
    """

    out: Tensor
    act: Tensor
    weight_grads: list[Tensor | None]
    weight_numel: Tensor
    all_grads: list[Tensor]
    out_grad_scale: Tensor
    split: Tensor | None = None
    spp: Tensor | None = None
    channels: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def once(self, fn: Callable[[StepTensors], Tensor]) -> Tensor:
        """``fn(self)``, computed once per step (a quantity used by others, e.g. a norm by its rms)."""
        if fn not in self._cache:
            self._cache[fn] = fn(self)
        return self._cache[fn]


OVER = ("layers", "blocks", "step")


@dataclass(frozen=True)
class Quantity:
    name: str
    fn: Callable[[StepTensors], Tensor]
    # "output" | "weight" | "activation" | "params" (layers); "split" | "shortcut" | "spp" |
    # "branch" (blocks); "derived" (step: a summary of other quantities, never a divergence sign)
    needs: str
    over: str = "layers"

    @property
    def per_layer(self) -> bool:
        return self.over == "layers"


QUANTITIES: dict[str, Quantity] = {}


def quantity(name: str, needs: str, per_layer: bool = True, over: str | None = None):
    """Register ``fn(StepTensors) -> Tensor``: ``[L]`` per tracked layer (the default), ``[B]``
    per residual block (``over="blocks"``), or 0-d (``over="step"``, or ``per_layer=False``)."""
    over = over or ("layers" if per_layer else "step")
    if over not in OVER:
        raise ValueError(f"over={over!r}; valid: {', '.join(OVER)}")

    def register(fn: Callable[[StepTensors], Tensor]) -> Callable[[StepTensors], Tensor]:
        QUANTITIES[name] = Quantity(name, fn, needs, over)
        return fn

    return register


def _norms(tensors: list[Tensor | None], like: Tensor) -> Tensor:
    """L2 norm of each tensor (0 for None) as one float64 vector, via one fused foreach call.

    Accumulated in float64: the square of any float32, bf16 or fp16 element (1e-90 .. 1e77)
    is a normal float64, so weight gradients near 1e-25 (a plain net's first layers) do not
    underflow to 0 as they do in a float32 accumulator. Weight gradients are read once per
    recorded step and are small next to the activations, so the float64 copy costs little.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return like.new_zeros(len(tensors), dtype=SUM_DTYPE)
    dtype = SUM_DTYPE
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
    # Population std over all elements of the output (batch, channels, positions), combined
    # over micro-batches and processes from their own centred sums (see activation_sums).
    n, s1, m2, q = s.act[:, 0], s.act[:, 1], s.act[:, 2], s.act[:, 3]
    return ((m2 + (q - s1 * s1 / n)) / n).clamp(min=0).sqrt()


@quantity("act/zero_frac", needs="activation")
def act_zero_frac(s: StepTensors) -> Tensor:
    return 1.0 - s.act[:, 4] / s.act[:, 0]


@quantity("grad_decay/slope", needs="derived", over="step")
def grad_decay_slope(s: StepTensors) -> Tensor:
    """Least-squares slope of log10 output-gradient RMS against the tracked layer's index in
    forward order (0, 1, ...): decades gained per layer towards the output. Layers with no,
    zero or non-finite output gradient are left out; NaN with fewer than two left."""
    rms = s.once(grad_rms_output).to(SUM_DTYPE)
    ok = (s.out[:, 0] > 0) & torch.isfinite(rms) & (rms > 0)
    w = ok.to(SUM_DTYPE)
    y = torch.where(ok, rms, 1.0).log10()
    x = torch.arange(rms.numel(), dtype=SUM_DTYPE, device=rms.device)
    n, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
    return (n * (w * x * y).sum() - sx * sy) / (n * (w * x * x).sum() - sx * sx)


# ---- residual blocks: the two parts of the input gradient (tags grad_split/<part>/<block>).
# A plain block (no shortcut) has only the branch part: its shortcut, ratio and cos are not
# written (missing in TensorBoard, null in the export), never a fake 0.


@quantity("grad_split/shortcut", needs="shortcut", over="blocks")
def grad_split_shortcut(s: StepTensors) -> Tensor:
    return s.split[:, 0].sqrt() * s.out_grad_scale


@quantity("grad_split/branch", needs="split", over="blocks")
def grad_split_branch(s: StepTensors) -> Tensor:
    return s.split[:, 1].sqrt() * s.out_grad_scale


@quantity("grad_split/ratio", needs="shortcut", over="blocks")
def grad_split_ratio(s: StepTensors) -> Tensor:
    """||dL/dx through the shortcut|| / ||dL/dx through the branch||."""
    return (s.split[:, 0] / s.split[:, 1]).sqrt()


@quantity("grad_split/cos", needs="shortcut", over="blocks")
def grad_split_cos(s: StepTensors) -> Tensor:
    return s.split[:, 2] / (s.split[:, 0] * s.split[:, 1]).sqrt()


# ---- signal propagation (Brock et al. 2021, "Characterizing signal propagation to close the
# performance gap in unnormalized ResNets"): channel statistics averaged over channels.
SPP_OUT, SPP_BRANCH, SPP_GRAD_OUT, SPP_GRAD_BRANCH = range(4)


def _channel_stats(s: StepTensors, kind: int) -> tuple[Tensor, Tensor]:
    """Average over channels of (channel mean)^2 and of channel variance, ``[B]`` each.
    ``s.spp[:, kind]`` holds :func:`channel_sums` zero-padded to ``C_max + 2`` and ``s.channels``
    each block's C."""
    sums = s.spp[:, kind]
    C = s.channels.to(SUM_DTYPE)
    idx = s.channels.long().unsqueeze(1)
    s2 = sums.gather(1, idx).squeeze(1)
    m = sums.gather(1, idx + 1).squeeze(1)  # elements per channel
    m_safe = torch.where(m > 0, m, 1.0)
    mean_sq = (sums / m_safe.unsqueeze(1)).square()
    mean_sq = torch.where(torch.arange(sums.shape[1], device=sums.device) < idx, mean_sq, 0.0).sum(1) / C
    return mean_sq, (s2 / (C * m_safe) - mean_sq).clamp(min=0)


@quantity("spp/mean_sq", needs="spp", over="blocks")
def spp_mean_sq(s: StepTensors) -> Tensor:
    return _channel_stats(s, SPP_OUT)[0]


@quantity("spp/var", needs="spp", over="blocks")
def spp_var(s: StepTensors) -> Tensor:
    return _channel_stats(s, SPP_OUT)[1]


@quantity("spp/branch_var", needs="branch", over="blocks")
def spp_branch_var(s: StepTensors) -> Tensor:
    return _channel_stats(s, SPP_BRANCH)[1]


# Backward counterparts as square roots (an RMS and two standard deviations): gradients of
# 1e-30 have variances of 1e-60, below float32, the precision of TensorBoard scalars.


@quantity("spp/grad_mean_rms", needs="spp", over="blocks")
def spp_grad_mean_rms(s: StepTensors) -> Tensor:
    """sqrt(average over channels of the squared channel mean of dL/d(block output))."""
    return _channel_stats(s, SPP_GRAD_OUT)[0].sqrt() * s.out_grad_scale


@quantity("spp/grad_std", needs="spp", over="blocks")
def spp_grad_std(s: StepTensors) -> Tensor:
    """sqrt(average channel variance of dL/d(block output))."""
    return _channel_stats(s, SPP_GRAD_OUT)[1].sqrt() * s.out_grad_scale


@quantity("spp/grad_branch_std", needs="branch", over="blocks")
def spp_grad_branch_std(s: StepTensors) -> Tensor:
    """sqrt(average channel variance of dL/d(branch output))."""
    return _channel_stats(s, SPP_GRAD_BRANCH)[1].sqrt() * s.out_grad_scale
