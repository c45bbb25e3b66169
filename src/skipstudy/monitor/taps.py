"""LayerTaps: hooks on any ``nn.Module`` that collect the monitor's sums, with no framework.

The Lightning callback (:mod:`skipstudy.monitor.callback`) drives one of these; a plain
PyTorch loop drives it directly::

    taps = LayerTaps(model)
    with taps.record(step):
        loss_fn(model(x), y).backward()
    taps.values  # {"grad_norm/output/conv1": ..., "grad_split/cos/layer1.0": ..., ...}

Per tracked layer (``layers``): a forward hook adds the output's activation sums and
registers a tensor hook on the output that adds the output gradient's sums (and, when
asked, a device histogram of log10|g|). ``register_full_backward_hook`` is not used: it
wraps outputs in an extra autograd node and breaks on in-place ops; a tensor hook on an
output later changed in place still gets the gradient w.r.t. the output as the layer made it.

Per residual block (:func:`~skipstudy.monitor.residual.find_blocks`), the gradient split
needs no extra backward pass: a forward pre-hook on the block hands it an alias ``x_in`` of
its input, a pre-hook on the branch's first module hands the branch its own alias ``x_b``
of what it reads, and a pre-hook on a shortcut module (projection, option A) its own
``x_s``. Autograd gives each alias the gradient of its own uses: ``b`` at ``x_b``, ``s`` at
``x_s``, and ``b + s`` at ``x_in`` (whose hook runs last). With an identity shortcut, which
has no module to hook, ``s = grad(x_in) - b``, exact up to one float rounding of the sum.
The block's output, the branch's exit and their gradients give the signal-propagation sums.

All sums of a step stay on the device; :meth:`LayerTaps.collect` moves them to the host
with one transfer (:func:`_to_host`). Every hook is ``torch.compiler.disable``-d, so under
``torch.compile`` it runs eagerly at a graph break on the real tensors.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from skipstudy.monitor import quantities
from skipstudy.monitor.layers import select_layers
from skipstudy.monitor.quantities import (
    ACT_WIDTH,
    SPP_BRANCH,
    SPP_GRAD_BRANCH,
    SPP_GRAD_OUT,
    SPP_OUT,
    SUM_DTYPE,
    HistogramBins,
    StepTensors,
    activation_sums,
    channel_sums,
    log_abs_histogram,
    output_grad_sums,
    split_sums,
)
from skipstudy.monitor.residual import ResidualBlock, find_blocks


def _to_host(t: Tensor) -> np.ndarray:
    """The monitor's only device-to-host transfer (and so its only sync): once per recorded step."""
    return t.detach().to("cpu").numpy()


def _add(acc: Tensor | None, value: Tensor) -> Tensor:
    return value if acc is None else acc + value


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


class _Layer:
    """One tracked layer and the current step's device accumulators."""

    __slots__ = ("index", "name", "module", "call_rank", "out", "act", "hist")

    def __init__(self, index: int, name: str, module: nn.Module) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.call_rank: int | None = None  # position in the first recorded forward pass
        self.reset()

    def reset(self) -> None:
        self.out: Tensor | None = None
        self.act: Tensor | None = None
        self.hist: Tensor | None = None

    @property
    def weight(self) -> nn.Parameter | None:
        w = getattr(self.module, "weight", None)
        return w if isinstance(w, nn.Parameter) and w.requires_grad else None


class _Block:
    """One residual block, its accumulators and the gradients of the forward call in flight."""

    def __init__(self, spec: ResidualBlock) -> None:
        self.spec = spec
        self.name = spec.name
        self.split: Tensor | None = None  # [4] split_sums, summed over micro-batches
        self.spp: list[Tensor | None] = [None] * 4  # channel_sums per SPP_* kind
        self.calls: list[dict] = []  # per forward call: the branch's and shortcut's gradients
        self.inside = False  # between the block's forward pre-hook and forward hook

    def reset(self) -> None:
        self.inside = False
        self.split = None
        self.spp = [None] * 4
        self.calls = []


class LayerTaps:
    """The monitor's hooks on a network; framework-free.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``-d one too: names are the eager ones).
        layers: ``None`` for every Conv2d and Linear, or module names and globs over weighted
            layers (``layer3.*.conv*``); see :func:`~skipstudy.monitor.layers.select_layers`.
        activations: also collect ``act/*`` sums of each tracked layer's output.
        blocks: also collect ``grad_split/*`` and ``spp/*`` of every residual block.

    Use :meth:`record` (a context manager) around one step's forward and backward passes, or
    :meth:`arm` before them and :meth:`collect` after. Hooks are inactive otherwise, in eval
    mode and under ``torch.no_grad()``.

    Attributes:
        layer_names, block_names: what is tracked; layers in forward order after a step.
        values: ``{tag: float}`` of the last :meth:`record`ed step (what exists: no shortcut
            tags for a plain block, no weight tags for a layer without weights).
    """

    def __init__(self, model: nn.Module, layers: str | list[str] | None = None,
                 activations: bool = True, blocks: bool = True) -> None:
        net = getattr(model, "_orig_mod", model)
        self.model = model
        self.activations = activations
        names = select_layers(net, layers)
        modules = dict(net.named_modules())
        self._layers = [_Layer(i, name, modules[name]) for i, name in enumerate(names)]
        self._blocks = [_Block(spec) for spec in find_blocks(net)] if blocks else []
        self.layer_names = names
        self.block_names = [b.name for b in self._blocks]
        self.quantities = [q for q in quantities.QUANTITIES.values()
                           if (activations or q.needs != "activation") and (self._blocks or q.over != "blocks")]
        self.bins = HistogramBins()
        self.hist = False  # also bin the output gradients this step
        self.armed = False
        self.values: dict[str, float] = {}
        self.step: int | None = None
        self._ordered = False
        self._call_counter = itertools.count()
        self._weight_numel: Tensor | None = None
        self._channels: Tensor | None = None
        self._handles: list = []
        self._hook(self._layers, self._blocks)

    # ------------------------------------------------------------------ hooks

    def _hook(self, layers: list[_Layer], blocks: list[_Block]) -> None:
        # Disabled for Dynamo: under torch.compile a hook runs eagerly at a graph break instead
        # of being traced, so its Python state and the tensor hooks it registers behave as in eager.
        off = torch.compiler.disable
        h = self._handles
        for layer in layers:
            h.append(layer.module.register_forward_hook(off(partial(self._layer_forward, layer))))
        for block in blocks:
            spec = block.spec
            h.append(spec.module.register_forward_pre_hook(off(partial(self._block_enter, block))))
            h.append(spec.module.register_forward_hook(off(partial(self._block_exit, block))))
            h.append(spec.entry.register_forward_pre_hook(off(partial(self._path_enter, block, "b"))))
            if spec.shortcut is not None:
                h.append(spec.shortcut.register_forward_pre_hook(off(partial(self._path_enter, block, "s"))))
            if spec.exit is not None:
                h.append(spec.exit.register_forward_hook(off(partial(self._branch_exit, block))))

    def remove(self) -> None:
        """Remove every hook (the network is then exactly as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    def _active(self, module: nn.Module) -> bool:
        return self.armed and module.training and torch.is_grad_enabled()

    def _layer_forward(self, layer: _Layer, module: nn.Module, args, output) -> None:
        if not self._active(module):
            return None
        y = _first_tensor(output)
        if y is None:
            return None
        if layer.call_rank is None:
            layer.call_rank = next(self._call_counter)
        if self.activations:
            layer.act = _add(layer.act, activation_sums(y.detach()))
        if y.requires_grad:
            y.register_hook(partial(self._layer_grad, layer))
        return None  # a forward hook that returns a value would replace the layer's output

    def _layer_grad(self, layer: _Layer, grad: Tensor) -> None:
        layer.out = _add(layer.out, output_grad_sums(grad))
        if self.hist:
            layer.hist = _add(layer.hist, log_abs_histogram(grad, self.bins))

    def _block_enter(self, block: _Block, module: nn.Module, args):
        if not self._active(module):
            return None
        block.inside = True
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and x.requires_grad):
            return None
        call: dict = {"open": True}
        block.calls.append(call)
        x_in = x.view_as(x)  # an alias whose gradient is the block's alone: b + s
        x_in.register_hook(partial(self._block_input_grad, block, call))
        return (x_in, *args[1:])

    def _path_enter(self, block: _Block, path: str, module: nn.Module, args):
        call = block.calls[-1] if block.calls else None
        x = args[0] if args else None
        if call is None or not call["open"] or path in call or not isinstance(x, Tensor) or not x.requires_grad:
            return None
        call[path] = None
        alias = x.view_as(x)

        def keep(grad: Tensor) -> None:
            call[path] = grad

        alias.register_hook(keep)
        return (alias, *args[1:])

    def _block_input_grad(self, block: _Block, call: dict, grad: Tensor) -> None:
        b = call.get("b")
        if b is None:
            return None  # the branch was not reached through its entry module: nothing to split
        s = call.get("s") if block.spec.shortcut is not None else (grad - b if block.spec.has_shortcut else None)
        block.split = _add(block.split, split_sums(grad, b, s))
        call.clear()  # drop the two gradients now; the call is done
        return None

    def _block_exit(self, block: _Block, module: nn.Module, args, output) -> None:
        if block.calls:
            block.calls[-1]["open"] = False
        block.inside = False
        y = _first_tensor(output)
        if not self._active(module) or y is None:
            return None
        self._moments(block, SPP_OUT, SPP_GRAD_OUT, y)
        return None

    def _branch_exit(self, block: _Block, module: nn.Module, args, output) -> None:
        y = _first_tensor(output)
        if block.inside and self._active(module) and y is not None:
            self._moments(block, SPP_BRANCH, SPP_GRAD_BRANCH, y)
        return None

    def _moments(self, block: _Block, kind: int, grad_kind: int, y: Tensor) -> None:
        block.spp[kind] = _add(block.spp[kind], channel_sums(y))
        if y.requires_grad:
            def add_grad(grad: Tensor) -> None:
                block.spp[grad_kind] = _add(block.spp[grad_kind], channel_sums(grad))

            y.register_hook(add_grad)

    # ------------------------------------------------------------------ one step

    def arm(self, hist: bool = False) -> None:
        """Start a step: clear the accumulators and let the hooks collect."""
        for unit in itertools.chain(self._layers, self._blocks):
            unit.reset()
        self.hist = hist
        self.armed = True

    @contextlib.contextmanager
    def record(self, step: int | None = None, params: list[nn.Parameter] | None = None) -> Iterator[LayerTaps]:
        """Collect the step run inside the ``with`` (forward and backward); on leaving it,
        :attr:`values` holds the step's ``{tag: value}`` (one host transfer) and :attr:`step`
        the ``step`` given. One backward pass per record: a second one adds to the same sums."""
        self.step = step
        self.arm()
        try:
            yield self
        finally:
            self.armed = False
        host, present = self.collect(params=list(self.model.parameters()) if params is None else params)
        self.values = {tag: float(v) for tag, v, ok in zip(self.tags(), host["row"], present) if ok}

    def order(self) -> None:
        """Put the layers in the order of the first recorded forward pass (modules that did
        not run keep their registration order, after the others)."""
        if not self._ordered:
            self._layers.sort(key=lambda l: (l.call_rank is None, l.call_rank or 0, l.index))
            self.layer_names = [l.name for l in self._layers]
            self._ordered = True

    def tags(self) -> list[str]:
        """Column names of :meth:`collect`'s row: ``<quantity>/<layer or block>``, or ``<quantity>``."""
        tags = []
        for q in self.quantities:
            names = {"layers": self.layer_names, "blocks": self.block_names, "step": None}[q.over]
            tags += [f"{q.name}/{n}" for n in names] if names is not None else [q.name]
        return tags

    def collect(self, params: list[nn.Parameter], scale: Tensor | None = None,
                reduce: Callable[[Tensor], None] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The step's quantities, moved to the host in one transfer.

        Args:
            params: the parameters whose ``.grad`` make ``grad_norm/total``.
            scale: 0-d device factor turning the summed output gradients into gradients of
                the optimised loss (``1 / (loss scale * world size)``); None for 1.
            reduce: in-place sum over processes (``torch.distributed.all_reduce``), or None.

        Returns:
            ``({"row": values in :meth:`tags` order, "values": {quantity: array}, "present":
            {needs: bool array}, "hist": histogram sums, "scale": float}, row presence)``.
        """
        self.armed = False
        self.order()
        layers, blocks = self._layers, self._blocks
        dev = params[0].device if params else torch.device("cpu")
        hist_len = self.bins.bins + 2

        def stacked(accs: list[Tensor | None], width: int) -> Tensor:
            zero = torch.zeros(width, dtype=SUM_DTYPE, device=dev)
            if not accs:
                return zero.new_zeros(0, width)
            return torch.stack([a if a is not None else zero for a in accs])

        out = stacked([l.out for l in layers], 2)
        act = (stacked([l.act for l in layers], ACT_WIDTH) if self.activations
               else out.new_zeros(len(layers), ACT_WIDTH))
        split = stacked([b.split for b in blocks], 4)
        # Each block's channel count as its sums have it (the same on every rank), else the spec's.
        chans = [next((t.shape[-1] - 2 for t in b.spp if t is not None), b.spec.channels) for b in blocks]
        width = max([1, *chans]) + 2
        spp = torch.stack([torch.stack([F.pad(t, (0, width - t.shape[-1])) if t is not None
                                        else torch.zeros(width, dtype=SUM_DTYPE, device=dev) for t in b.spp])
                           for b in blocks]) if blocks else torch.zeros(0, 4, width, dtype=SUM_DTYPE, device=dev)
        if self._channels is None or self._channels.device != dev or self._channels.numel() != len(chans):
            # Filled on the device: torch.tensor(list, device=cuda) would be a blocking copy.
            self._channels = torch.stack([torch.full((), c, dtype=SUM_DTYPE, device=dev) for c in chans]) \
                if chans else torch.zeros(0, dtype=SUM_DTYPE, device=dev)
        parts = [out, act, split, spp]
        if self.hist:
            parts.append(stacked([l.hist for l in layers], hist_len))
        local = torch.cat([p.flatten() for p in parts])
        if reduce is not None:
            reduce(local)  # sums over processes; the same step on every rank
        pieces = iter(local.split([p.numel() for p in parts]))
        out, act, split, spp = (next(pieces).view_as(p) for p in parts[:4])
        hist = next(pieces, local.new_zeros(0))

        weights = [l.weight for l in layers]
        weight_grads = [w.grad if w is not None else None for w in weights]
        if self._weight_numel is None or self._weight_numel.device != dev:
            # Filled on the device: torch.tensor(list, device=cuda) would be a blocking copy.
            self._weight_numel = torch.stack(
                [torch.full((), w.numel() if w is not None else 0, dtype=SUM_DTYPE, device=dev) for w in weights]
            ) if weights else torch.zeros(0, dtype=SUM_DTYPE, device=dev)
        scale = torch.ones((), dtype=SUM_DTYPE, device=dev) if scale is None else scale.to(SUM_DTYPE)
        s = StepTensors(out=out, act=act, weight_grads=weight_grads, weight_numel=self._weight_numel,
                        all_grads=[p.grad for p in params if p.grad is not None], out_grad_scale=scale,
                        split=split, spp=spp, channels=self._channels)
        values = [s.once(q.fn).to(SUM_DTYPE).reshape(-1) for q in self.quantities]
        per_channel = self._channels.long().unsqueeze(1) + 1  # where each block's elements-per-channel sits
        counts = [out[:, 0], act[:, 0], split[:, 3], spp[:, SPP_OUT].gather(1, per_channel).squeeze(1),
                  spp[:, SPP_BRANCH].gather(1, per_channel).squeeze(1)]
        flat = _to_host(torch.cat([*values, *counts, scale.reshape(1), hist]))
        return self._unpack(flat, weight_grads)

    def _unpack(self, flat: np.ndarray, weight_grads: list) -> tuple[dict[str, Any], np.ndarray]:
        L, B = len(self._layers), len(self._blocks)
        widths = {"layers": L, "blocks": B, "step": 1}
        values: dict[str, np.ndarray] = {}
        i = 0
        for q in self.quantities:
            values[q.name] = flat[i : i + widths[q.over]]
            i += widths[q.over]
        sizes = (L, L, B, B, B)
        out_n, act_n, split_n, spp_n, branch_n = _slices(flat, i, sizes)
        i += sum(sizes)
        has_shortcut = np.array([b.spec.has_shortcut for b in self._blocks], dtype=bool)
        present = {
            "output": out_n > 0,
            "activation": act_n > 0,
            "weight": np.array([g is not None for g in weight_grads], dtype=bool),
            "params": np.ones(1, dtype=bool),
            "derived": np.ones(1, dtype=bool),
            "split": split_n > 0,
            "shortcut": (split_n > 0) & has_shortcut,
            "spp": spp_n > 0,
            "branch": branch_n > 0,
        }
        row = np.concatenate([np.where(present[q.needs], values[q.name], np.nan) for q in self.quantities]) \
            if self.quantities else np.zeros(0)
        # Present: what exists this step; a derived summary that came out NaN (fewer than two
        # layers to fit) is left out like a missing value.
        row_present = np.concatenate([
            present[q.needs] & ~np.isnan(values[q.name]) if q.needs == "derived" else present[q.needs]
            for q in self.quantities
        ]) if self.quantities else np.zeros(0, bool)
        return {"row": row, "values": values, "present": present, "scale": float(flat[i]), "hist": flat[i + 1 :]}, row_present


def _slices(flat: np.ndarray, start: int, sizes: tuple[int, ...]) -> list[np.ndarray]:
    out, i = [], start
    for n in sizes:
        out.append(flat[i : i + n])
        i += n
    return out
