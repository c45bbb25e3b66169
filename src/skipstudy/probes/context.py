"""What every probe receives: the network, its data, where to write, and at which step.

A probe is a function ``run(ctx, options) -> dict[str, float]``. It reads the network and
a few fixed batches through :class:`ProbeContext`, and writes PNGs, arrays and JSON into
``<run>/probes/<name>/`` and scalars and images into the run's TensorBoard at ``ctx.step``
(the checkpoint's global step, 0 at initialisation). The same context is built by the
``python -m skipstudy.probe`` app (from a checkpoint or a fresh network) and by the
during-training callback (from the Trainer), so a probe does not know which one runs it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from skipstudy.errors import ConfigError

SPLITS = ("train", "val")


@dataclass
class ProbeContext:
    """Everything a probe may use.

    Args:
        net: the bare network (``LitClassifier.net``); probes leave its weights, mode and
            buffers as they found them.
        datamodule: the run's data module, already set up.
        run_dir: the run directory; outputs go to ``run_dir/probes/<name>/``.
        step: the global step the weights belong to (TensorBoard step, file-name suffix).
        device: where the network and the batches live.
        writer: a TensorBoard ``SummaryWriter`` or None (then only files are written).
        trained: False for a network at initialisation (fresh build or epoch 0).
        model: the run's ``model`` config as a plain dict (recorded in the probes' JSON so
            that reports can group results by depth and skip).
        seed: seeds every random draw a probe makes (directions, lesion subsets).
        batches: default number of batches a probe evaluates (None: the whole split).
    """

    net: nn.Module
    datamodule: Any
    run_dir: Path
    step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    writer: Any = None
    trained: bool = True
    model: dict = field(default_factory=dict)
    seed: int = 0
    batches: int | None = 4

    # -- data ---------------------------------------------------------------------------
    def fixed_batches(self, split: str, batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``batches`` batches of ``split`` (``train`` or ``val``), on ``self.device``.

        The batches are the same on every call: validation is unshuffled; the training split
        is read in stored order without augmentation where the data module can do that
        (``make_loader(..., train=False)``), otherwise under a seeded, forked RNG, so the
        training run's own random stream is left untouched.
        """
        if split not in SPLITS:
            raise ConfigError(f"probe.split={split!r} is not a split; valid: {', '.join(SPLITS)}")
        n = self.batches if batches is None else batches
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"probe.batches={n!r} must be a positive integer or null (the whole split); "
                              "e.g. probe.batches=4")
        dm = self.datamodule
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if split == "val":
                loader = dm.val_dataloader()
            elif hasattr(dm, "make_loader"):
                loader = dm.make_loader("train", train=False)
            else:
                loader = dm.train_dataloader()
            out = [(x.to(self.device), y.to(self.device)) for x, y in itertools.islice(loader, n)]
        if not out:
            raise ConfigError(f"the {split} split of {type(dm).__name__} gave no batches; the probe needs data")
        return out

    # -- outputs ------------------------------------------------------------------------
    def out_dir(self, name: str) -> Path:
        path = Path(self.run_dir) / "probes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stem(self, name: str) -> Path:
        """``<run>/probes/<name>/<name>_step<N>``: add a suffix for each output file."""
        return self.out_dir(name) / f"{name}_step{self.step}"

    def scalars(self, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), self.step)

    def figure(self, fig: Figure, path: Path, tag: str) -> Path:
        """Save ``fig`` as a PNG at ``path`` and log it as a TensorBoard image under ``tag``."""
        canvas = FigureCanvasAgg(fig)
        fig.savefig(path, dpi=fig.dpi)
        if self.writer is not None:
            canvas.draw()
            rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
            self.writer.add_image(tag, rgb, self.step, dataformats="HWC")
        return path

    def publish(self, name: str, record: dict, summary: dict[str, float], plot: Callable[[str], Figure],
                scalars: dict[str, float] | None = None) -> Path:
        """Write a probe's outputs: ``<stem>.json`` (``record`` with the network's arch and depth,
        and ``summary``), ``<stem>.png`` (``plot(title)``), and the ``summary`` (plus ``scalars``)
        as TensorBoard scalars ``probe/<name>/<key>``. Returns the stem."""
        from skipstudy.probes.comparison import label

        stem = self.stem(name)
        record = {"arch": getattr(self.net, "arch", type(self.net).__name__), "depth": depth_of(self.net), **record}
        self.write_json(stem.with_suffix(".json"), record, summary=summary)
        title = f"{label(record | {'model': self.model}, with_depth=True)}, step {self.step}"
        self.figure(plot(title), stem.with_suffix(".png"), f"probe/{name}")
        self.scalars({f"probe/{name}/{key}": v for key, v in (summary | (scalars or {})).items()})
        return stem

    def write_json(self, path: Path, data: dict, summary: dict[str, float] | None = None) -> Path:
        """Write ``data`` with the step, the trained flag and the model config; ``summary`` (the
        probe's returned numbers) goes under ``"summary"``, where the report's probe table reads it."""
        record = {"step": self.step, "trained": self.trained, "model": self.model, **data}
        if summary is not None:
            record["summary"] = {k: float(v) for k, v in summary.items()}
        path.write_text(json.dumps(record, indent=2))
        return path


def depth_of(net: nn.Module) -> int:
    """Weighted layers on the main path: convs and linears that are not shortcut projections.

    Gives the paper depths (cifar_resnet56 -> 56, resnet50 -> 50) and the same number for a
    network and its plain twin, so reports can put both on one axis.
    """
    return sum(
        1
        for name, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split(".")
    )


def int_option(options: Any, key: str, default: int, low: int = 1) -> int:
    """``options[key]`` (``default`` if unset), refused unless an integer >= ``low``."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"probe.{key}={value!r} must be an integer >= {low}; e.g. probe.{key}={default}")
    return value


def number_option(options: Any, key: str, default: float, low: float = 0.0) -> float:
    """``options[key]`` (``default`` if unset), refused unless a number >= ``low``."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ConfigError(f"probe.{key}={value!r} must be a number >= {low:g}; e.g. probe.{key}={default:g}")
    return float(value)


def cross_entropy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss of ``net`` on ``(x, y)``, in float32 at least (half-precision logits are
    upcast; float64 stays float64, so the float64 references of the tests compare exactly)."""
    logits = net(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)


class eval_mode:
    """Context manager: ``net.eval()`` inside, the previous train/eval flags restored after."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        return self.net

    def __exit__(self, *exc) -> None:
        for m, training in self.modes:
            m.training = training


BN_MODES = ("auto", "eval", "calibrate")


def has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def syncs_across_ranks(net: nn.Module) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(isinstance(m, nn.SyncBatchNorm) for m in net.modules()))


@contextlib.contextmanager
def kept_state(net: nn.Module) -> Iterator[nn.Module]:
    """Inside the ``with`` a probe may switch modes and run train-mode BN; afterwards every
    module's train/eval flag, every BN buffer (running statistics, batch counter) and momentum
    are as before. During training the network is the one being trained, and a copy is not an
    option (callbacks' hooks hang on it)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)}) for m in norms]
    with eval_mode(net):
        try:
            yield net
        finally:
            with torch.no_grad():
                for m, momentum, buffers in saved:
                    m.momentum = momentum
                    for k, v in buffers.items():
                        getattr(m, k).copy_(v)


@contextlib.contextmanager
def calibrated_bn(net: nn.Module, inputs: torch.Tensor, chunk: int = 64) -> Iterator[nn.Module]:
    """Inside the ``with``, ``net`` is in eval mode with BN running statistics averaged over
    ``inputs``; afterwards its statistics, momenta and modes are restored (:func:`kept_state`)."""
    with kept_state(net):
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the chunks
        net.train()
        with torch.no_grad():
            for part in inputs.split(chunk):
                net(part)
        net.eval()
        yield net


def check_bn_mode(options: Any) -> None:
    bn = options.get("bn", "auto")
    if bn not in BN_MODES:
        raise ConfigError(f"probe.bn={bn!r} is not a BN mode; valid: {', '.join(BN_MODES)}")


def eval_bn(ctx: ProbeContext, options: Any, inputs: torch.Tensor, chunk: int = 64
            ) -> tuple[str, contextlib.AbstractContextManager]:
    """``(mode, context manager)`` for probes that need every sample's own gradient (BN in eval mode).

    ``probe.bn=auto``: a trained network uses its running statistics (``eval``); at
    initialisation these are still 0/1 (BN would be an identity), so they are first
    calibrated on ``inputs`` (``calibrate``), then restored.
    """
    bn = options.get("bn", "auto")
    if bn == "auto":
        bn = "calibrate" if not ctx.trained and has_batch_norm(ctx.net) else "eval"
    if bn == "calibrate" and syncs_across_ranks(ctx.net):
        # A train-mode SyncBatchNorm pass on rank 0 alone would wait for the other ranks forever.
        bn = "eval"
    return bn, (calibrated_bn(ctx.net, inputs, chunk) if bn == "calibrate" else eval_mode(ctx.net))


LOSS_BN_MODES = ("train", "eval")


def check_loss_bn(options: Any) -> None:
    bn = options.get("bn", "train")
    if bn not in LOSS_BN_MODES:
        raise ConfigError(f"probe.bn={bn!r} is not a BN mode for the training loss; valid: {', '.join(LOSS_BN_MODES)}")


def resolve_loss_bn(net: nn.Module, options: Any) -> str:
    """``probe.bn`` for a probe of the training loss; ``train`` becomes ``eval`` where BN syncs
    across ranks (probes run on rank 0 alone, and a train-mode SyncBatchNorm pass there would
    wait for the other ranks forever)."""
    bn = options.get("bn", "train")
    return "eval" if bn == "train" and syncs_across_ranks(net) else bn


@contextlib.contextmanager
def loss_mode(net: nn.Module, bn: str) -> Iterator[nn.Module]:
    """The network as the training loss sees it: ``bn=train`` (batch statistics, the optimiser's
    view) or ``eval`` (running statistics); modes and BN buffers are restored afterwards."""
    with kept_state(net):
        net.train(bn == "train")
        yield net
