"""The sums the hooks take from one tensor, exact over the whole float32 range: float64
vectors whose first element counts what was summed, so micro-batches and processes add. A
float32 accumulator loses both ends of a gradient's range (squares below 1e-19 underflow,
above 1e19 overflow) and drifts by ~3e-5 over 10^6 elements: hence float64 sums, power-of-two
scaling, and rows of ``_ROW`` reduced first. Only :func:`cpu_value` reads a value, on the CPU.

Two paths, chosen by :func:`_fast_path`. On an accelerator the step is host-bound: what costs
is the number of ops the hooks issue (each a kernel launch and dispatcher time), not their
arithmetic, and float64 reductions are cheap. There a float32, bf16 or fp16 tensor is reduced
in float64 inside one op (``_foreach_norm(..., dtype=float64)``, ``sum(dtype=float64)``): the
square of any such element, even the subnormal 1.4e-45, is a normal float64, so no scaling is
needed. float64 tensors, whose squares can leave float64's range, keep the scaled path, and the
CPU keeps its paths below, tuned because float64 is slow there.

The hooks take ``*_parts`` (:class:`Sq`, ``Part``): element counts stay host numbers and norms
are squared once a step for all tensors (``skipstudy.monitor.packing``), so a hook issues only
its reductions; ``*_sums`` assemble the same parts into one vector.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
from torch import Tensor

SUM_DTYPE = torch.float64

# Rows of 1024 reduced in float32, then the rows in float64: within ~1e-9 of a float64 sum.
_ROW = 1024


def _fast_path(t: Tensor) -> bool:
    """Whether ``t`` takes the accelerator path (few float64 reductions, no host reads). One
    predicate, so that tests can force it on CPU tensors and check both paths without a GPU."""
    return t.device.type != "cpu"


def _flat(t: Tensor) -> Tensor:
    """``t`` as 1-D in memory order: a view for the layouts convs produce."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# One reusable buffer per dtype on the CPU: a fresh multi-megabyte tensor there is a fresh
# mmap whose page faults cost as much as the arithmetic. Hooks run one at a time.
_SCRATCH: dict[torch.dtype, Tensor] = {}


def _scratch(n: int, dtype: torch.dtype) -> Tensor:
    """``n`` elements of the CPU scratch buffer of ``dtype`` (contents undefined)."""
    if dtype not in _SCRATCH or _SCRATCH[dtype].numel() < n:
        _SCRATCH[dtype] = torch.empty(n, dtype=dtype)
    return _SCRATCH[dtype][:n]


def _buffer(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``ceil(n / _ROW) * _ROW`` elements whose tail after ``n`` is zero."""
    size = -(-n // _ROW) * _ROW
    if device.type != "cpu":
        z = torch.empty(size, dtype=dtype, device=device)
    else:
        z = _scratch(size, dtype)
    z[n:].zero_()
    return z


def cpu_value(t: Tensor) -> float:
    """A CPU tensor's value; on an accelerator it would be a host sync: it raises."""
    if t.device.type != "cpu":
        raise RuntimeError(f"cpu_value called on a {t.device} tensor: a host sync in the monitor's hot path")
    return float(t)


def _moments(rows: Tensor, exponent: Tensor | int, plain_sum: bool) -> tuple[Tensor, Tensor | None]:
    """``(sum of squares, sum)`` in float64 of ``rows * 2**exponent``."""
    per_row = torch.linalg.vector_norm(rows, dim=1).to(SUM_DTYPE)
    sq = torch.ldexp(per_row.square().sum(), torch.as_tensor(2 * exponent, dtype=SUM_DTYPE, device=rows.device))
    if not plain_sum:
        return sq, None
    total = rows.sum(dtype=_wide(rows.dtype)).to(SUM_DTYPE)
    return sq, torch.ldexp(total, torch.as_tensor(exponent, dtype=SUM_DTYPE, device=rows.device))


def _sums(flat: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(sum(d**2), sum(d))`` of ``d = flat - shift`` (the sum only with a shift), right to
    ~1e-7 for every finite float32, bf16 or fp16 input; non-finite input gives non-finite sums.
    Elements are scaled by the power of two that puts the largest in [0.5, 1), so only squares
    below 1e-38 of the sum can underflow. On the CPU the unscaled float32 rows are tried first,
    kept when the sum is finite and so large that squares flushed below 2**-126 cannot matter.
    """
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        if shift is None and n % _ROW == 0:
            rows = flat.view(-1, _ROW)
        else:
            z = _buffer(n, torch.float32, flat.device)
            if shift is None:
                z[:n].copy_(flat)
            else:
                torch.sub(flat, shift, out=z[:n])
            rows = z.view(-1, _ROW)
        sq, total = _moments(rows, 0, shift is not None)
        v = cpu_value(sq)
        if math.isfinite(v) and v >= n * 2.0**-126 * 1e7:
            return sq, total
    hi, lo = flat.amax(), flat.amin()
    big = torch.maximum(hi, lo.neg()) if shift is None else torch.maximum(hi - shift, shift - lo)
    wide = _wide(flat.dtype)
    _, exponent = torch.frexp(big.to(wide))
    if wide == torch.float32:
        exponent = exponent.clamp(-126, 126)  # 2**-e must itself be a normal float32
    scale = torch.ldexp(torch.ones((), dtype=wide, device=flat.device), exponent.neg())
    z = _buffer(n, wide, flat.device)
    if shift is None:
        torch.mul(flat, scale, out=z[:n])
    else:
        torch.sub(flat.to(wide), shift, out=z[:n]).mul_(scale)  # widened: y - mean rounded once
    return _moments(z.view(-1, _ROW), exponent, shift is not None)


def count(t: Tensor) -> Tensor:
    """``t.numel()`` as a float64 0-d tensor filled on ``t``'s device (no copy)."""
    return torch.full((), t.numel(), dtype=SUM_DTYPE, device=t.device)


class Sq(NamedTuple):
    """A part of a statistic standing for ``factor * norm**2``: the hot path squares every
    step's norms in one op, not one op a tensor. ``norm`` is float64 with one element."""

    norm: Tensor
    factor: float = 1.0


# A statistic's parts, concatenated in order, are its float64 vector: host-known numbers
# (element counts: no op, no copy), device tensors (flattened), and Sq.
Part = Union[int, float, Tensor, Sq]


def assemble(parts: tuple[Part, ...], device: torch.device) -> Tensor:
    """The float64 vector that ``parts`` stand for, one tensor (the hot path packs the parts of a
    whole step at once instead: ``skipstudy.monitor.packing``)."""
    out = []
    for p in parts:
        if isinstance(p, Sq):
            out.append((p.norm.to(SUM_DTYPE).square() * p.factor).reshape(1))
        elif isinstance(p, Tensor):
            out.append(p.to(SUM_DTYPE).reshape(-1))
        else:
            out.append(torch.full((1,), float(p), dtype=SUM_DTYPE, device=device))
    return torch.cat(out)


def norm64(t: Tensor) -> Tensor:
    """L2 norm with the squares summed in float64 within one reduction: for a float32/bf16/fp16
    tensor right to float64 rounding from 1.4e-45 to 3.4e38 (the square of any such element is
    a normal float64), so no scaling is needed. ``torch._foreach_norm`` is underscored but is the
    norm behind ``clip_grad_norm_`` and the optimizers' foreach paths; with ``dtype`` its CUDA
    kernel accumulates in that dtype (``LpNormFunctor``'s ``opmath_type<out_t>``), as the CPU
    path does. One op like ``linalg.vector_norm``, with less host time: on the meta device
    (shapes only) 32 us against 640 us for a 128x256x56x56 tensor."""
    return torch._foreach_norm([t], 2, dtype=SUM_DTYPE)[0]


# On the CPU, tensors this large take float32 rows (_sums): each row's float32 rounding (~1e-7)
# is independent of the others', so over >= 64 rows the sum is within ~1e-8; smaller ones, cheap
# anyway, are reduced in float64.
_ROWS_FROM = 64 * _ROW


def squares(tensors: list[Tensor]) -> list[Part]:
    """``||t||**2`` of each tensor as parts: on an accelerator one fused float64
    ``_foreach_norm`` (Sq parts, squared when packed); on the CPU, where a float64-accumulated
    reduction of a large float32 tensor costs ~10x a float32 pass (163 against 15 ms a CIFAR
    ResNet-20 step at batch 128), :func:`_sums`'s rows."""
    if _fast_path(tensors[0]):
        return [Sq(n) for n in torch._foreach_norm(tensors, 2, dtype=SUM_DTYPE)]
    return [_sums(_flat(t))[0] if t.numel() >= _ROWS_FROM else Sq(norm64(t)) for t in tensors]


def output_grad_parts(grad: Tensor) -> tuple[Part, ...]:
    """``[numel, sum of squares]`` of the gradient w.r.t. a layer's output."""
    if _fast_path(grad) and grad.dtype != torch.float64:
        return grad.numel(), Sq(norm64(grad))
    flat = _flat(grad)
    return grad.numel(), (_sums(flat)[0] if flat.numel() else 0.0)


def output_grad_sums(grad: Tensor) -> Tensor:
    """:func:`output_grad_parts` as one vector."""
    with torch.no_grad():
        return assemble(output_grad_parts(grad), grad.device)


def activation_parts(y: Tensor) -> tuple[Part, ...]:
    """``[numel, sum, M2, sum * mean, nonzeros]`` of a layer's output, ``M2 = sum((y - mean)**2)``
    about this call's own mean (the one-pass ``sum(y**2) - numel * mean**2`` loses every digit
    when |mean| >> std); calls combine as in Chan et al. 1979, the float32 mean's rounding cancels
    in the corrected two-pass formula. ``torch.var_mean`` is ~50x slower on the CPU.
    """
    if _fast_path(y) and y.dtype != torch.float64 and y.numel():
        return _activation_parts_fast(y)
    flat = _flat(y)
    n = flat.numel()
    if n == 0:
        return (torch.zeros(5, dtype=SUM_DTYPE, device=y.device),)
    total = flat.sum(dtype=_wide(y.dtype))
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # The one-pass form is right to ~1e-6 while sum(y**2) <= 10 * M2 (post-ReLU and conv
        # outputs): it saves writing a centred copy; other layers take the centred pass.
        sq = _sums(flat)[0]
        s1 = total.to(SUM_DTYPE)
        m2 = sq - s1 * s1 / n
        if 10 * cpu_value(m2) >= cpu_value(sq):
            return (torch.stack((count(flat), s1, m2, s1 * s1 / n, _nonzeros(flat))),)
    shift = total / n
    d2, d1 = _sums(flat, shift)
    s1 = shift.to(SUM_DTYPE) * n + d1
    return (torch.stack((count(flat), s1, d2 - d1 * d1 / n, s1 * s1 / n, _nonzeros(flat))),)


def activation_sums(y: Tensor) -> Tensor:
    """:func:`activation_parts` as one vector."""
    with torch.no_grad():
        return assemble(activation_parts(y), y.device)


def _activation_parts_fast(y: Tensor) -> tuple[Part, ...]:
    """:func:`activation_parts` in four ops: a float64 sum, a centred float64 copy, its norm and
    ``count_nonzero``. The shift is the sum times 1/numel in float64, off the exact mean by
    d ~ 2e-16 |mean|; M2 about it exceeds M2 about the exact mean by numel * d**2, ~1e-31
    (mean / std)**2 relative, so the correction term of the two-pass formula (sum of the centred
    copy) is left out. Every centred element and its square are normal float64 numbers or
    exactly 0 (nothing underflows). ``sum * mean`` is ``sum**2 / numel``: an Sq of the sum."""
    n = y.numel()
    # keepdim: a sum with dimensions promotes ``y - sum / n`` to float64; a 0-d one would not.
    total = y.sum(dim=tuple(range(y.dim())), keepdim=True, dtype=SUM_DTYPE)
    centred = torch.sub(y, total, alpha=1.0 / n)  # y - mean, one op
    return n, total, Sq(norm64(centred)), Sq(total, 1.0 / n), torch.count_nonzero(y)


# float32 sums of ones are exact below 2**24.
_COUNT_CHUNK = 1 << 23


def _nonzeros(y: Tensor) -> Tensor:
    if y.device.type != "cpu":
        return torch.count_nonzero(y).to(SUM_DTYPE)
    # count_nonzero branches per element on the CPU: 8.7 ms against 0.35 ms for |sign(y)| summed
    # on a post-ReLU 128x16x32x32 tensor (1 thread).
    ones = torch.sign(y.reshape(-1), out=_scratch(y.numel(), y.dtype)).abs_()  # no fresh buffer: no page faults
    return torch.stack([c.sum(dtype=torch.float32) for c in ones.split(_COUNT_CHUNK)]).to(SUM_DTYPE).sum()


def channel_parts(t: Tensor) -> tuple[Part, ...]:
    """``[elements per channel, numel, sum of squares, per-channel sums (channel = dim 1)...]``:
    the channel count is their ratio, so zero padding changes nothing. The average channel
    variance follows without per-channel squares (``var_mean`` per channel was ~30x slower on
    the CPU), to ~1e-7 (mean / std)^2 relative, enough for block outputs and their gradients.
    Per-channel sums are float64 on every path: float32 ones overflow for gradients of ~3e33
    of one sign (128x32x32 elements a channel) and are rounding noise where a channel's
    elements cancel (the gradient into a train-mode BN), which read as a vanished gradient.
    """
    head = (t.numel() // t.shape[1], t.numel())  # numel // channels is exact
    if not _fast_path(t) and t.dtype != torch.float64 and t.dim() >= 2:
        # One float64 copy, channels last, in the reusable scratch: its per-channel sums and its
        # sum of squares cost what a float32 sum and a float64-accumulated norm cost before.
        moved = t.movedim(1, -1)
        z = _scratch(t.numel(), SUM_DTYPE).view(moved.shape)
        z.copy_(moved)
        rows = z.view(-1, t.shape[1])
        return (*head, torch.linalg.vector_norm(rows).square(), rows.sum(0))
    dims = [d for d in range(t.dim()) if d != 1]
    return (*head, Sq(norm64(t)), t.sum(dim=dims, dtype=SUM_DTYPE))


def channel_sums(t: Tensor) -> Tensor:
    """:func:`channel_parts` as one vector."""
    with torch.no_grad():
        return assemble(channel_parts(t), t.device)


@dataclass(frozen=True)
class HistogramBins:
    """Fixed bins over log10|g|, so that counts from micro-batches, processes and steps add,
    for every nonzero float32 (1.4e-45 to 3.4e38), bf16 and fp16 element; float64 ones beyond
    go to the end bins. Zeros (inactive ReLUs) are left out."""

    lo: float = -46.0
    hi: float = 39.0
    per_decade: int = 10

    @property
    def bins(self) -> int:
        return int(round((self.hi - self.lo) * self.per_decade))

    def edges(self) -> list[float]:
        return [self.lo + i / self.per_decade for i in range(self.bins + 1)]


# torch.histc counts in float32, exact below 2**24: large layers are binned in chunks.
_HIST_CHUNK = 1 << 23


def _histc(x: Tensor, spec: HistogramBins) -> Tensor:
    return torch.histc(x, bins=spec.bins, min=spec.lo, max=spec.hi)


def _bincount_histogram(x: Tensor, spec: HistogramBins) -> Tensor:
    """``torch.histc``'s counts by ``torch.bincount``, which CUDA allows in deterministic mode."""
    index = ((x - spec.lo) * spec.bins / (spec.hi - spec.lo)).floor_().clamp_(max=spec.bins - 1)
    index = torch.where((x >= spec.lo) & (x <= spec.hi), index, spec.bins).long()
    return torch.bincount(index, minlength=spec.bins + 1)[: spec.bins]


def log_abs_histogram(grad: Tensor, spec: HistogramBins) -> Tensor:
    """``[binned count, sum x, sum x^2, count per bin...]`` for x = log10|g|, zeros left out."""
    g = grad.detach().abs()
    if g.dtype == torch.float64:
        # Below float32's range: log first, clamp into the first bin (zeros stay -inf, out).
        x = g.log10()
        x = torch.where(x > -math.inf, x.clamp(min=spec.lo), x).to(torch.float32)
    else:
        x = g.to(torch.float32).log10_()
    x = x.clamp_(max=spec.hi).flatten()
    binned = _bincount_histogram if x.is_cuda and torch.are_deterministic_algorithms_enabled() else _histc
    # reduce, not sum(): sum's 0 + first part would be one more op per layer
    counts = functools.reduce(torch.add, [binned(c, spec).to(SUM_DTYPE) for c in x.split(_HIST_CHUNK)])
    inside = torch.where(x >= spec.lo, x, 0.0).to(SUM_DTYPE)  # finite, >= lo: what histc counted
    head = torch.stack((counts.sum(), inside.sum(), inside.square().sum()))
    return torch.cat((head, counts))


def norms(tensors: list[Tensor | None]) -> list[float]:
    """L2 norm of each tensor (0 for None) in float64, one fused foreach call: the square of any
    float32/bf16/fp16 element is a normal float64, so 1e-25 gradients do not read 0. Reads the
    values: not for the hot path, which packs the norms (``skipstudy.monitor.packing``)."""
    present = [t for t in tensors if t is not None]
    it = iter(torch._foreach_norm(present, 2, dtype=SUM_DTYPE) if present else [])
    return [float(next(it)) if t is not None else 0.0 for t in tensors]
