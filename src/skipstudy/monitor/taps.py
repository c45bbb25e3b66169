"""LayerTaps: hooks on any ``nn.Module`` that collect the monitor's statistics, no framework.
A tracked layer's forward hook takes its output's statistics and registers a tensor hook on
the output for its gradient's: unlike ``register_full_backward_hook`` (an extra autograd node,
broken by in-place ops), it gets the gradient w.r.t. the output as the layer made it even if
``ReLU(inplace=True)`` changes it later. A residual block's gradient split needs no extra
backward pass: pre-hooks hand the block, its branch's first module and a shortcut module each
their own alias of the input, and autograd gives each alias the gradient of its own uses
(``b + s`` at the block's, whose hook runs last; an identity shortcut has ``s = grad - b``).
Hooks run eagerly at ``torch.compile`` graph breaks. A hook issues only the reductions of its
statistics (parts, ``skipstudy.monitor.sums.Part``); a step's parts are packed into one device
vector (``skipstudy.monitor.packing``) whose copy to the host starts without blocking
(:func:`_to_host`) and is read where the values are needed (:meth:`PendingStep.read`): on a GPU
one step later, when the copy has long landed, so the host never waits for the device in a step.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from skipstudy.monitor.layers import ResidualBlock, find_blocks, select_layers
from skipstudy.monitor import quantities
from skipstudy.monitor.packing import Layout, Packer
from skipstudy.monitor.quantities import SITES, StepTensors
from skipstudy.monitor.sums import SUM_DTYPE

StepValues = tuple[dict[str, float], np.ndarray, dict[str, np.ndarray], float]


@dataclass
class PendingStep:
    """A recorded step whose packed values are on their way to the host: ``host`` holds them
    once ``event`` has passed (None: already there, as on the CPU)."""

    step: int | None
    host: np.ndarray
    event: Any
    finish: Callable[[np.ndarray], StepValues]
    packed: Tensor | None = None  # the device vector (for grads_nonfinite)
    grad_norms: slice = field(default_factory=lambda: slice(0, 0))  # where the parameters' gradient norms are in it
    epoch: int = 0
    fp16: bool = False
    metrics: bool = False  # the module's per-step scalars (``finish`` gives ``{tag: value}``), not statistics

    def grads_nonfinite(self) -> Tensor:
        """1.0 on the device where a parameter's gradient is not finite, else 0.0 (float32, what
        fused optimizers take as ``found_inf``): no host read."""
        return torch.isfinite(self.packed[self.grad_norms].sum()).logical_not().to(torch.float32)

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        return self.event is None or self.event.query()

    def read(self) -> StepValues:
        """The step's values; waits for the copy only if it has not landed yet (a step later it
        has)."""
        if self.event is not None:
            self.event.synchronize()
        return self.finish(self.host)


class UpdateGuard:
    """What keeps a non-finite update from being applied when the values that would stop it are
    read late (on a GPU, a step later): a fused optimizer gets a device-side ``found_inf`` (as
    the GradScaler gives it) and skips the update itself; any other has them read now, before
    its update (a wait for the device). Used by the monitor and ``runs.stopping.DivergenceGuard``."""

    def __init__(self) -> None:
        self.optimizer = None  # the one given a found_inf this step

    def arm(self, optimizer, pending: PendingStep, world_size: int, found_inf: Callable[[], Tensor],
            read_now: Callable[[], None]) -> None:
        late = not pending.ready() if world_size == 1 else pending.event is not None  # the same on every rank
        if not late:
            return
        if getattr(optimizer, "defaults", {}).get("fused"):
            optimizer.found_inf = found_inf()
            self.optimizer = optimizer
        else:
            read_now()

    def disarm(self) -> None:
        """After the step's update: its flag must not reach the next one."""
        if self.optimizer is not None:
            del self.optimizer.found_inf
            self.optimizer = None


def _to_host(t: Tensor) -> tuple[np.ndarray, Any]:
    """The monitor's only device-to-host transfer, once per recorded step, started without
    blocking: on a CUDA device into pinned memory, with an event that marks its end (the array
    holds the values once the event has passed); a CPU tensor is already on the host; other
    devices copy at once."""
    if t.device.type == "cpu":
        return t.numpy(), None
    if t.device.type != "cuda":
        return t.to("cpu").numpy(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host.numpy(), event


class _Unit:
    """A tracked layer or residual block and the current step's sums."""

    def __init__(self, name: str, module: nn.Module, spec: ResidualBlock | None = None) -> None:
        self.name, self.module, self.spec = name, module, spec
        self.rank: int | None = None  # a layer's position in the first recorded forward pass
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, list[tuple]] = {}  # per statistic, the parts of each call
        self.call: dict | None = None  # a block's forward call in flight: its paths' gradients

    @property
    def weight(self) -> nn.Parameter | None:
        w = getattr(self.module, "weight", None)
        return w if isinstance(w, nn.Parameter) and w.requires_grad else None


class LayerTaps:
    """The monitor's hooks on ``model`` (a ``torch.compile``-d one too: names are the eager
    ones); ``layers``, ``activations`` and ``blocks`` as in ``GradientFlowMonitor``.

    Use :meth:`record` around one step's forward and backward passes, or :meth:`arm` before
    them and :meth:`collect` after. Hooks are inactive otherwise, in eval mode and under
    ``torch.no_grad()``. :attr:`values` holds the last recorded step's ``{tag: value}``.
    """

    def __init__(self, model: nn.Module, layers: str | list[str] | None = None,
                 activations: bool = True, blocks: bool | None = None) -> None:
        net = getattr(model, "_orig_mod", model)
        self.model = model
        modules = dict(net.named_modules())
        self._layers = [_Unit(name, modules[name]) for name in select_layers(net, layers)]
        # blocks=None: the declared ones, the rest named in a warning; True: refuse undeclared ones.
        self._blocks = [] if blocks is False else [_Unit(b.name, b.module, spec=b)
                                                   for b in find_blocks(net, strict=blocks is True)]
        stats = quantities.STATISTICS  # looked up now: a module may have registered more
        self.statistics = [st for st in stats.values()
                           if (activations or st.site != "output") and (self._blocks or SITES[st.site] == "layers")]
        self._sites = {site: [st for st in self.statistics if st.site == site] for site in SITES}
        self.quantities = [q for q in quantities.QUANTITIES.values()
                           if q.needs not in stats or stats[q.needs] in self.statistics]
        self.hist = False  # also take the histogram statistics this step
        self.armed = False
        self.values: dict[str, float] = {}
        self.step: int | None = None
        self._ordered = False
        self._calls = itertools.count()
        self._weight_numel: Tensor | None = None
        self._packer = Packer()
        off = torch.compiler.disable  # Dynamo runs the hooks eagerly at a graph break
        h = self._handles = [layer.module.register_forward_hook(off(partial(self._layer_out, layer)))
                             for layer in self._layers]
        for block in self._blocks:
            spec = block.spec
            h.append(spec.module.register_forward_pre_hook(off(partial(self._block_enter, block))))
            h.append(spec.module.register_forward_hook(off(partial(self._block_exit, block))))
            h.append(spec.entry.register_forward_pre_hook(off(partial(self._path_enter, block, "b"))))
            if spec.shortcut is not None:
                h.append(spec.shortcut.register_forward_pre_hook(off(partial(self._path_enter, block, "s"))))
            if spec.exit is not None:
                h.append(spec.exit.register_forward_hook(off(partial(self._branch_exit, block))))

    @property
    def layer_names(self) -> list[str]:
        """Tracked layers; in forward order once a step is collected."""
        return [layer.name for layer in self._layers]

    @property
    def block_names(self) -> list[str]:
        return [block.name for block in self._blocks]

    def remove(self) -> None:
        """Remove every hook (the network is then exactly as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    # ------------------------------------------------------------------ hooks

    def _active(self, module: nn.Module) -> bool:
        return self.armed and module.training and torch.is_grad_enabled()

    def _take(self, unit: _Unit, site: str, *tensors: Tensor | None) -> None:
        # no_grad instead of detach: no op, and nothing recorded for autograd. Each call's parts
        # are kept, not added: micro-batches cost no op here, they add on the host.
        with torch.no_grad():
            for st in self._sites[site]:
                if self.hist or not st.hist:
                    value = st.fn(*tensors)
                    if value is not None:
                        unit.sums.setdefault(st.name, []).append(value if isinstance(value, tuple) else (value,))

    def _watch(self, unit: _Unit, site: str, module: nn.Module, output: Any) -> bool:
        """The statistics of ``site`` from a module's output, and of ``<site>_grad`` from its
        gradient. A forward hook that returned a value would replace the output."""
        y = next((o for o in output if isinstance(o, Tensor)), None) if isinstance(output, (tuple, list)) else output
        if not (isinstance(y, Tensor) and self._active(module)):
            return False
        self._take(unit, site, y)
        if y.requires_grad and self._sites[site + "_grad"]:
            y.register_hook(partial(self._take, unit, site + "_grad"))
        return True

    def _alias(self, args: tuple, hook: Callable[[Tensor], None]) -> tuple | None:
        """The module's input replaced by an alias whose gradient (to ``hook``) is of this use alone."""
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and x.requires_grad):
            return None
        alias = torch.ops.aten.alias(x)  # like view_as(x), but its backward issues no op
        alias.register_hook(hook)
        return (alias, *args[1:])

    def _layer_out(self, layer: _Unit, module: nn.Module, args, output) -> None:
        if self._watch(layer, "output", module, output) and layer.rank is None:
            layer.rank = next(self._calls)

    def _block_enter(self, block: _Unit, module: nn.Module, args):
        if not self._active(module):
            return None
        block.call = call = {}
        return self._alias(args, partial(self._block_input_grad, block, call))  # b + s

    def _path_enter(self, block: _Unit, path: str, module: nn.Module, args):
        call = block.call
        if call is None or path in call:
            return None
        call[path] = None
        return self._alias(args, partial(call.__setitem__, path))

    def _block_input_grad(self, block: _Unit, call: dict, grad: Tensor) -> None:
        b = call.get("b")
        if b is None:
            return  # the branch was not entered through its entry module: nothing to split
        spec = block.spec
        s = call.get("s") if spec.shortcut is not None else (grad - b if spec.has_shortcut else None)
        if spec.shared:  # both paths read a tensor inside the block: the split is of its gradient
            if s is None:
                return
            grad = b + s
        self._take(block, "split", grad, b, s)
        call.clear()  # drop the two gradients now

    def _block_exit(self, block: _Unit, module: nn.Module, args, output) -> None:
        block.call = None
        self._watch(block, "block", module, output)

    def _branch_exit(self, block: _Unit, module: nn.Module, args, output) -> None:
        if block.call is not None:
            self._watch(block, "branch", module, output)

    # ------------------------------------------------------------------ one step

    def arm(self, hist: bool = False) -> None:
        """Start a step: clear the sums and let the hooks collect."""
        for unit in itertools.chain(self._layers, self._blocks):
            unit.reset()
        self.hist = hist
        self.armed = True

    @contextlib.contextmanager
    def record(self, step: int | None = None) -> Iterator[LayerTaps]:
        """Collect the forward and backward passes run inside the ``with``; on leaving it,
        :attr:`values` holds the step's ``{tag: value}`` and :attr:`step` the step given. One
        backward pass per record: a second one adds to the same sums."""
        self.step = step
        self.arm()
        try:
            yield self
        finally:
            self.armed = False
        self.values = self.collect(list(self.model.parameters()))[0]

    def tags(self) -> list[str]:
        """Names of :meth:`collect`'s row: ``<quantity>/<layer or block>``, or ``<quantity>``."""
        units = {"layers": self.layer_names, "blocks": self.block_names, "step": [None]}
        return [q.name if n is None else f"{q.name}/{n}" for q in self.quantities for n in units[q.over]]

    def collect(self, params: list[nn.Parameter], scale: Tensor | None = None,
                reduce: Callable[[Tensor], None] | None = None) -> StepValues:
        """The step's quantities on the host now: :meth:`pack`, then read (on a GPU that waits for
        the device; the callback reads a step later instead)."""
        return self.pack(params, scale, reduce).read()

    def pack(self, params: list[nn.Parameter], scale: Tensor | None = None,
             reduce: Callable[[Tensor], None] | None = None) -> PendingStep:
        """End the step: pack its sums and start their copy to the host, without waiting for it.
        ``params``: those whose ``.grad`` make ``grad_norm/total``; ``scale``: ``out_grad_scale``
        on the device (None: 1); ``reduce``: an in-place sum over processes
        (``torch.distributed.all_reduce``). ``read()`` of the result gives ``{tag: value}``
        of what exists (not e.g. a ReLU's weight gradient or a plain block's shortcut), the same
        in :meth:`tags` order with NaN where absent, the sums of the histogram statistics, and
        ``out_grad_scale``."""
        self.armed = False
        if not self._ordered:  # forward order; layers that did not run last, as registered (a stable sort)
            self._layers.sort(key=lambda l: (l.rank is None, l.rank or 0))
            self._ordered = True
        dev = params[0].device
        units = {"layers": self._layers, "blocks": self._blocks}
        stats = [st for st in self.statistics if self.hist or not st.hist]
        parts = {st.name: [u.sums.get(st.name, ()) for u in units[SITES[st.site]]] for st in stats}
        with_grad = [p for p in params if p.grad is not None]
        index = {id(p): i for i, p in enumerate(with_grad)}
        weights = [layer.weight for layer in self._layers]
        weight_pos = [index.get(id(w), -1) if w is not None else -1 for w in weights]
        if self._weight_numel is None:  # host numbers, once per fit
            self._weight_numel = np.array([w.numel() if w is not None else 0 for w in weights], dtype=np.float64)
        scale = torch.ones((), dtype=SUM_DTYPE, device=dev) if scale is None else scale.to(SUM_DTYPE)
        with torch.no_grad():
            packed, layout = self._packer.pack(parts, {st.name: st.width for st in stats},
                                               [p.grad for p in with_grad], weight_pos, scale, reduce)
        for unit in itertools.chain(self._layers, self._blocks):
            unit.reset()  # the parts are packed; hold no gradients until the next step
        host, event = _to_host(packed)
        grad_norms = slice(layout.grad_base, layout.grad_base + layout.n_grads)
        return PendingStep(self.step, host, event, partial(self._on_host, layout, stats),
                           packed, grad_norms)

    def _on_host(self, layout: Layout, stats: list, h: np.ndarray) -> StepValues:
        """The quantities from the host copy of a packed step, in numpy: no torch op, no wait."""
        tables, weight_norm, grad_norms, scale = layout.unpack(h)
        s = StepTensors(tables, weight_numel=self._weight_numel, out_grad_scale=np.float64(scale),
                        weight_norm=weight_norm, grad_norms=grad_norms)
        values = [s.value(q.name).reshape(-1) for q in self.quantities]
        counted = {st.name: tables[st.name][:, 0] > 0 for st in stats}
        counted["weight"] = layout.weight_pos >= 0
        counted["params"] = np.ones(1, dtype=bool)
        mask = np.concatenate([~np.isnan(v) if q.needs == "derived" else counted[q.needs]
                               for q, v in zip(self.quantities, values)])
        row = np.where(mask, np.concatenate(values), np.nan)
        whole = {st.name: tables[st.name] for st in stats if st.hist}
        scalars = {tag: float(v) for tag, v, ok in zip(self.tags(), row, mask) if ok}
        return scalars, row, whole, scale
