"""LitClassifier: the LightningModule that trains any image classifier.

It knows no config: the network, optimizer and scheduler are built outside (by
``skipstudy.train`` from Hydra groups) and handed in, so one module wraps a ResNet-50, its
plain twin or a mini net without a branch on the model type.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LitClassifier(L.LightningModule):
    """Cross-entropy classification of ``net``'s logits. ``net`` is kept as ``self.net``, so monitor
    layer names are relative to it; ``optimizer`` and ``scheduler`` are Hydra partials;
    ``compile`` compiles ``net`` in place, so parameter and module names stay the eager ones."""

    def __init__(self, net: nn.Module, num_classes: int, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, scheduler_interval: str = "epoch",
                 channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.channels_last = channels_last
        if compile:
            self.net.compile()
        # The training epoch's running means are checkpointed with the module (persistent), so a
        # run resumed mid-epoch averages over the whole epoch. NaN stays NaN: a diverged run's
        # mean must not skip its bad batches.
        self.train_loss = MeanMetric(nan_strategy="disable")
        # validate_args checks every batch's labels on the host (a host-device sync per step on
        # a GPU); the training labels come from skipstudy's own data modules. Validation keeps it.
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.train_loss.persistent(True)
        self.train_acc.persistent(True)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # A dict while the gradient monitor is attached (it empties it at each step's start): the
        # step's scalars stay there on the device and the monitor copies them to the host without
        # blocking and writes them on each step Lightning would log, so Lightning's per-step
        # .item() (a host-device sync on a GPU) is not paid. None without a monitor: self.log.
        self.step_metrics: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # Lightning resets them after logging an epoch's means; a checkpoint written at an epoch
        # end holds them before that reset. (A mid-epoch resume does not pass through this hook.)
        self.train_loss.reset()
        self.train_acc.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Tensors passed to self.log stay on the device until Lightning writes them (every
        # trainer.log_every_n_steps). Per-step series carry the plain tag, epoch means an `_epoch`
        # suffix. Only the epoch mean goes to the progress bar: a per-step prog_bar value is read
        # (.item()) at every step whatever the log interval, a host-device sync on a GPU.
        # Numbers made on the device (fill kernels): a Python number becomes a device tensor by
        # a blocking host-to-device copy, a sync each step on a GPU (torchmetrics' weight, self.log).
        self.train_loss(loss.detach(), weight=torch.full_like(loss.detach(), y.numel()))
        acc = self.train_acc(logits.detach(), y)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc_epoch", self.train_acc, on_step=False, on_epoch=True)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        lr = lr.detach() if isinstance(lr, torch.Tensor) else torch.full((), lr, device=loss.device)
        step = {"train/loss": loss.detach(), "train/acc": acc, "train/lr": lr}
        if self.step_metrics is not None:
            self.step_metrics.update(step)  # the monitor writes them (the last micro-batch's, as self.log)
        else:
            for tag, value in step.items():
                self.log(tag, value, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        factory = self.optimizer_factory
        # optimizer.fused=null: fused on a CUDA device, where one kernel updates every tensor and the
        # monitor's non-finite stop skips a poisoned update on the device (found_inf) instead of
        # waiting for the host each recorded step; torch's own choice (foreach) elsewhere.
        if getattr(factory, "keywords", {}).get("fused", False) is None and self.device.type == "cuda":
            factory = functools.partial(factory, fused=True)
        optimizer = factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                          "interval": self.scheduler_interval}}
