"""What every probe receives: the network, its data, where to write, and at which step.

A probe is a function ``run(ctx, options) -> dict[str, float]``. It reads the network and
a few fixed batches through :class:`ProbeContext`, and writes PNGs, arrays and JSON into
``<run>/probes/<name>/`` and scalars and images into the run's TensorBoard at ``ctx.step``
(the checkpoint's global step, 0 at initialisation). The same context is built by the
``python -m skipstudy.probe`` app (from a checkpoint or a fresh network) and by the
during-training callback (from the Trainer), so a probe does not know which one runs it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def write_json(self, path: Path, data: dict) -> Path:
        record = {"step": self.step, "trained": self.trained, "model": self.model, **data}
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
