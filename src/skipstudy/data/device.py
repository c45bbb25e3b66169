"""Device-resident batches (``dataset.loader=device``), in the style of Keller Jordan's airbench.

The whole uint8 split moves to the device once; every batch is then one gather (crop + flip,
see :func:`~skipstudy.data.augment.crop_flip_batch`), a float conversion, an optional bilinear
resize and a normalisation, all on that device. There are no worker processes, no PIL and no
host-to-device copy per batch. The device is an argument, so the same code runs on the CPU in
the tests.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from skipstudy.data.augment import EpochSampler, crop_flip_batch, finish


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array (possibly a read-only memmap) as a tensor on ``device``, read once."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.from_numpy(np.array(array))  # own copy: never alias a read-only memmap
    with warnings.catch_warnings():
        # from_numpy warns that the memmap is read-only; the tensor is only read and copied.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(array)).to(device)


class DeviceBatches:
    """An iterable of ``(images, labels)`` batches produced on ``images.device``.

    Lightning treats it like a DataLoader: ``len()`` gives the batch count (so
    ``limit_train_batches`` works, as an int or a fraction), ``sampler.set_epoch`` is called
    every epoch, and batches already on the model's device are not copied again.

    Args:
        images: the whole split, uint8 NHWC, already on the target device.
        labels: int64 class indices, same device.
        sampler: the random plan (order, crops, flips) and this rank's shard.
        batch_size: samples per batch.
        drop_last: drop a final partial batch (training).
        image_size, mean, std, padding, pad_mode, augment: see :func:`finish` and
            :func:`crop_flip_batch`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sampler: EpochSampler,
        *,
        batch_size: int,
        drop_last: bool,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
        pad_mode: str,
        augment: bool,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be uint8 NHWC, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels
        self.sampler = sampler
        # Lightning inspects this like a DataLoader's: batches come from ``sampler`` directly.
        self.batch_sampler = None
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.padding, self.pad_mode, self.augment = padding, pad_mode, augment

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.sampler.take_plan().to(self.device)
        for b in range(len(self)):
            part = plan[b * self.batch_size : (b + 1) * self.batch_size]
            x = crop_flip_batch(self.images, part, self.padding, self.pad_mode, self.augment)
            # NCHW-contiguous uint8 first: the copy is 4x smaller than after the float conversion.
            x = finish(x.contiguous(), self.image_size, self.mean, self.std)
            yield x, self.labels[part.indices]
