"""One recorded step's statistics as one float64 device vector, unpacked on the host.

On an accelerator the step is host-bound: each small op is a kernel launch plus dispatcher
time, so what costs is the number of ops, not their size. The hooks therefore leave every
statistic in parts (``skipstudy.monitor.sums.Part``) and nothing here issues ops per tensor:
the one-element tensors of a step are stacked once per shape, every norm is squared in one op,
the gradient norms of all parameters are one ``torch._foreach_norm`` (float64 in the kernel:
1e-25 gradients do not read 0), and everything is one ``torch.cat``: about a dozen ops a step
whatever the network. Element counts are known on the host and never go to the device (but
under DDP, where processes add them). The vector reaches the host in one copy; placing its
values in per-statistic ``[units, width]`` tables is numpy indexing there.

Layout of the vector: ``[one-element parts | longer parts | host numbers (DDP only) | gradient
norms of the parameters | out_grad_scale]``; the part before the gradient norms is the one
summed over processes (the parameters' gradients are already all-reduced by DDP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from skipstudy.monitor.sums import SUM_DTYPE, Sq

# (statistic name, row, first column, source kind, index, length); kinds below
_SCALAR, _VECTOR, _NUMBER = 0, 1, 2


@dataclass
class Layout:
    """Where each value of the packed vector goes on the host."""

    widths: dict[str, int]
    rows: dict[str, int]
    segments: list[tuple[str, int, int, int, int, int]]
    numbers: list[float]
    bases: tuple[int, int, int]  # offsets of the scalar, vector and number regions
    on_device_numbers: bool
    grad_base: int
    n_grads: int
    weight_pos: np.ndarray  # per tracked layer: index into the gradient norms, -1 for none

    def unpack(self, h: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
        """``(tables, weight-gradient norm per layer, every parameter's gradient norm,
        out_grad_scale)`` from the host copy ``h`` of the packed vector."""
        tables = {name: np.zeros((self.rows[name], w)) for name, w in self.widths.items()}
        for name, row, col, kind, index, length in self.segments:
            if kind == _NUMBER and not self.on_device_numbers:
                tables[name][row, col] += self.numbers[index]
            else:
                start = self.bases[kind] + index
                tables[name][row, col:col + length] += h[start:start + length]
        grads = h[self.grad_base:self.grad_base + self.n_grads]
        weight = np.where(self.weight_pos >= 0, grads[np.maximum(self.weight_pos, 0)] if grads.size else 0.0, 0.0)
        return tables, weight, grads, float(h[-1])


class _Constants:
    """Small device tensors that depend only on a step's layout (the same every step), built once
    per layout: on a GPU a copy from pinned memory without blocking, never one per step."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    def get(self, key: tuple, make: Callable[[], Tensor], device: torch.device) -> Tensor:
        found = self._cache.get(key)
        if found is None or found.device != device:
            host = make()
            if device.type == "cuda":
                host = host.pin_memory()
            # Freeing the pinned source early is safe: the caching host allocator holds it until the copy ran.
            found = host if device.type == "cpu" else host.to(device, non_blocking=True)
            self._cache[key] = found
            if len(self._cache) > 16:  # a layout that changes every step: keep the newest
                self._cache = {key: found}
        return found


class Packer:
    """Packs one step's statistics (:meth:`pack`); one per :class:`~.taps.LayerTaps`."""

    def __init__(self) -> None:
        self._constants = _Constants()

    def pack(self, stats: dict[str, list[list[tuple]]], widths: dict[str, int], grads: list[Tensor],
             weight_pos: list[int], scale: Tensor, reduce: Callable[[Tensor], None] | None) -> tuple[Tensor, Layout]:
        """``stats``: per statistic, per unit (row), the parts of each call (micro-batch) to add;
        ``grads``: every parameter gradient; ``weight_pos``: per tracked layer, the index of its
        weight's gradient in ``grads`` (-1: none); ``scale``: 0-d float64 on the device;
        ``reduce``: an in-place sum over processes."""
        dev = scale.device
        scalars: list[Tensor] = []
        squares: list[tuple[int, float]] = []
        vectors: list[Tensor] = []
        numbers: list[float] = []
        segments: list[tuple[str, int, int, int, int, int]] = []
        out_widths, rows = {}, {}
        n_vector = 0
        for name, per_unit in stats.items():
            width = widths[name]
            for row, calls in enumerate(per_unit):
                for parts in calls:
                    col = 0
                    for p in parts:
                        if isinstance(p, Sq):
                            squares.append((len(scalars), p.factor))
                            segments.append((name, row, col, _SCALAR, len(scalars), 1))
                            scalars.append(p.norm)
                            col += 1
                        elif isinstance(p, Tensor) and p.numel() == 1:
                            segments.append((name, row, col, _SCALAR, len(scalars), 1))
                            scalars.append(p)
                            col += 1
                        elif isinstance(p, Tensor):
                            n = p.numel()
                            vectors.append(p if p.dim() == 1 else p.reshape(-1))
                            segments.append((name, row, col, _VECTOR, n_vector, n))
                            n_vector += n
                            col += n
                        else:
                            segments.append((name, row, col, _NUMBER, len(numbers), 1))
                            numbers.append(float(p))
                            col += 1
                    width = max(width, col)
            out_widths[name], rows[name] = width, len(per_unit)

        pieces: list[Tensor] = []
        if scalars:
            v, position = self._scalars(scalars, squares, dev)
            pieces.append(v)
            segments = [(n, r, c, k, position[i] if k == _SCALAR else i, ln) for n, r, c, k, i, ln in segments]
        pieces += vectors
        on_device_numbers = reduce is not None and bool(numbers)
        if on_device_numbers:  # processes add them: their batches may differ
            pieces.append(self._constants.get(("numbers", *numbers), lambda: torch.tensor(numbers, dtype=SUM_DTYPE),
                                              dev))
        n_reduced = len(scalars) + n_vector + (len(numbers) if on_device_numbers else 0)
        norms = torch._foreach_norm(grads, 2, dtype=SUM_DTYPE) if grads else []
        pieces.append(torch.stack([*norms, scale]))
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if out.dtype != SUM_DTYPE:  # only parts of a narrower type, e.g. a statistic's integer counts
            out = out.to(SUM_DTYPE)
        if reduce is not None and n_reduced:
            reduce(out[:n_reduced])  # a contiguous view: summed in place
        layout = Layout(out_widths, rows, segments, numbers, (0, len(scalars), len(scalars) + n_vector),
                        on_device_numbers, n_reduced, len(grads), np.asarray(weight_pos, dtype=np.int64))
        return out, layout

    def _scalars(self, scalars: list[Tensor], squares: list[tuple[int, float]],
                 dev: torch.device) -> tuple[Tensor, list[int]]:
        """The one-element parts as one float64 vector, Sq parts squared, and where each part went:
        one stack per shape (``sum(keepdim=True)`` gives ``[1, 1, 1, 1]``), one cat, and for the
        squares ``where(mask, v * v * factor, v)`` with a mask and factors that are constants of
        the layout (exact: a square is rounded once, a factor of 1 changes nothing)."""
        groups: dict[torch.Size, list[int]] = {}
        for i, t in enumerate(scalars):
            groups.setdefault(t.shape, []).append(i)
        position = [0] * len(scalars)
        for k, i in enumerate(i for members in groups.values() for i in members):
            position[i] = k
        stacked = [torch.stack([scalars[i] for i in members]) for members in groups.values()]
        flat = [s if s.dim() == 1 else s.reshape(-1) for s in stacked]
        v = torch.cat(flat) if len(flat) > 1 else flat[0]
        if not squares:
            return v, position
        key = ("squares", len(scalars), *((position[i], f) for i, f in squares))

        def factors() -> Tensor:
            f = torch.zeros(len(scalars), dtype=SUM_DTYPE)
            for i, factor in squares:
                f[position[i]] = factor
            return f

        f = self._constants.get(key, factors, dev)
        mask = self._constants.get(("mask", *key), lambda: factors() != 0, dev)
        return torch.where(mask, v * v * f, v), position
