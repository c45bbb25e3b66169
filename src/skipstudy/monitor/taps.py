"""LayerTaps: hooks on any ``nn.Module`` that collect the monitor's statistics, no framework.
A tracked layer's forward hook takes its output's statistics and registers a tensor hook on
the output for its gradient's: unlike ``register_full_backward_hook`` (an extra autograd node,
broken by in-place ops), it gets the gradient w.r.t. the output as the layer made it even if
``ReLU(inplace=True)`` changes it later. A residual block's gradient split needs no extra
backward pass: pre-hooks hand the block, its branch's first module and a shortcut module each
their own alias of the input, and autograd gives each alias the gradient of its own uses
(``b + s`` at the block's, whose hook runs last; an identity shortcut has ``s = grad - b``).
Hooks run eagerly at ``torch.compile`` graph breaks; a step's sums stay on the device until
one transfer (:func:`_to_host`).
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

from skipstudy.monitor.layers import ResidualBlock, find_blocks, select_layers
from skipstudy.monitor import quantities
from skipstudy.monitor.quantities import SITES, StepTensors
from skipstudy.monitor.sums import SUM_DTYPE


def _to_host(t: Tensor) -> np.ndarray:
    """The monitor's only device-to-host transfer (and so its only sync): once per recorded step."""
    return t.detach().to("cpu").numpy()


def _stack(accs: list[Tensor | None], width: int, dev: torch.device) -> Tensor:
    """``[units, width or wider]``: zero rows for None, shorter vectors zero-padded."""
    width = max([width, *(a.numel() for a in accs if a is not None)])
    zero = torch.zeros(width, dtype=SUM_DTYPE, device=dev)
    # Only vectors shorter than the row are padded: a pad of 0 is still one op per unit and step.
    return torch.stack([zero if a is None else a if a.numel() == width else F.pad(a, (0, width - a.numel()))
                        for a in accs])


class _Unit:
    """A tracked layer or residual block and the current step's sums."""

    def __init__(self, name: str, module: nn.Module, spec: ResidualBlock | None = None) -> None:
        self.name, self.module, self.spec = name, module, spec
        self.rank: int | None = None  # a layer's position in the first recorded forward pass
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
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
        for st in self._sites[site]:
            if self.hist or not st.hist:
                value = st.fn(*tensors)
                if value is not None:
                    old = unit.sums.get(st.name)
                    unit.sums[st.name] = value if old is None else old + value

    def _watch(self, unit: _Unit, site: str, module: nn.Module, output: Any) -> bool:
        """The statistics of ``site`` from a module's output, and of ``<site>_grad`` from its
        gradient. A forward hook that returned a value would replace the output."""
        y = next((o for o in output if isinstance(o, Tensor)), None) if isinstance(output, (tuple, list)) else output
        if not (isinstance(y, Tensor) and self._active(module)):
            return False
        self._take(unit, site, y.detach())
        if y.requires_grad and self._sites[site + "_grad"]:
            y.register_hook(partial(self._take, unit, site + "_grad"))
        return True

    def _alias(self, args: tuple, hook: Callable[[Tensor], None]) -> tuple | None:
        """The module's input replaced by an alias whose gradient (to ``hook``) is of this use alone."""
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and x.requires_grad):
            return None
        alias = x.view_as(x)
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
                reduce: Callable[[Tensor], None] | None = None) -> tuple:
        """The step's quantities, moved to the host in one transfer. ``params``: those whose
        ``.grad`` make ``grad_norm/total``; ``scale``: ``out_grad_scale`` on the device (None:
        1); ``reduce``: an in-place sum over processes (``torch.distributed.all_reduce``).
        Returns ``{tag: value}`` of what exists (not e.g. a ReLU's weight gradient or a plain
        block's shortcut), the same in :meth:`tags` order with NaN where absent, the sums of the
        histogram statistics, and ``out_grad_scale`` on the host."""
        self.armed = False
        if not self._ordered:  # forward order; layers that did not run last, as registered (a stable sort)
            self._layers.sort(key=lambda l: (l.rank is None, l.rank or 0))
            self._ordered = True
        dev = params[0].device
        units = {"layers": self._layers, "blocks": self._blocks}
        stats = [st for st in self.statistics if self.hist or not st.hist]
        parts = [_stack([u.sums.get(st.name) for u in units[SITES[st.site]]], st.width, dev) for st in stats]
        local = torch.cat([p.flatten() for p in parts])
        if reduce is not None:
            reduce(local)  # sums over processes; the same step on every rank
        pieces = local.split([p.numel() for p in parts])
        sums = {st.name: piece.view_as(p) for st, p, piece in zip(stats, parts, pieces)}

        weights = [layer.weight for layer in self._layers]
        weight_grads = [w.grad if w is not None else None for w in weights]
        if self._weight_numel is None or self._weight_numel.device != dev:  # a host copy once per fit, not a step
            self._weight_numel = torch.tensor([w.numel() if w is not None else 0 for w in weights],
                                              dtype=SUM_DTYPE, device=dev)
        scale = torch.ones((), dtype=SUM_DTYPE, device=dev) if scale is None else scale.to(SUM_DTYPE)
        s = StepTensors(sums, weight_grads, self._weight_numel, [p.grad for p in params if p.grad is not None], scale)
        out = [s.value(q.name).to(SUM_DTYPE).reshape(-1) for q in self.quantities]
        out += [sums[st.name][:, 0] for st in stats]
        out += [scale.reshape(1)] + [sums[st.name].flatten() for st in stats if st.hist]
        host = np.split(_to_host(torch.cat(out)), np.cumsum([t.numel() for t in out])[:-1])

        n = len(self.quantities)
        counted = {st.name: host[n + i] > 0 for i, st in enumerate(stats)}
        counted["weight"] = np.array([g is not None for g in weight_grads])
        counted["params"] = np.ones(1, dtype=bool)
        mask = np.concatenate([~np.isnan(v) if q.needs == "derived" else counted[q.needs]
                               for q, v in zip(self.quantities, host)])
        row = np.where(mask, np.concatenate(host[:n]), np.nan)
        hist = [st for st in stats if st.hist]
        whole = {st.name: host[n + len(stats) + 1 + i].reshape(sums[st.name].shape) for i, st in enumerate(hist)}
        for unit in itertools.chain(self._layers, self._blocks):
            unit.reset()  # the sums are spent; hold no gradients until the next step
        scalars = {tag: float(v) for tag, v, ok in zip(self.tags(), row, mask) if ok}
        return scalars, row, whole, float(host[n + len(stats)][0])
