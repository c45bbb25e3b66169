"""LitClassifier: the LightningModule that trains any image classifier.

It knows no config. The network, the optimizer and the scheduler are built outside
(by ``skipstudy.train`` from Hydra groups) and handed in, so the same module wraps a
ResNet-50, its plain twin or a two-block mini net without a branch on the model type.
"""

from __future__ import annotations

from typing import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LitClassifier(L.LightningModule):
    """Cross-entropy classification of ``net``'s logits.

    Args:
        net: the network; kept as ``self.net`` so monitor layer names are relative to it.
        num_classes: number of classes, for the accuracy metrics.
        optimizer: a partial (``_partial_: true`` in Hydra) completed with the parameters.
        scheduler: a partial completed with the optimizer, or None. It steps once per
            epoch unless ``scheduler_interval="step"``.
        scheduler_interval: "epoch" or "step", passed to Lightning.
        channels_last: train in the channels_last memory format (faster convs on GPUs).
        compile: compile the network's forward (and so its backward) with ``torch.compile``.
            ``nn.Module.compile`` compiles in place, so parameter names, checkpoints and
            ``self.net``'s module names stay those of the eager network.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.compiled = compile
        if compile:
            self.net.compile()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        batch_acc = self.train_acc(logits.detach(), y)  # also accumulates the epoch's state
        # Tensors passed to self.log stay on the device until Lightning writes them.
        # Per-step series carry the plain tag (the per-batch curves of the studies); epoch
        # means get an `_epoch` suffix.
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", loss.detach(), on_step=False, on_epoch=True)
        self.log("train/acc", batch_acc, on_step=True, on_epoch=False)
        self.log("train/acc_epoch", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc(logits, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
