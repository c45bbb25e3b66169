"""The base of the stored data sets: uint8 NHWC arrays into batches by ``dataset.loader=torch``
(DataLoader workers, one image each) or ``device`` (the split on the accelerator, whole batches
built there). Both draw from one ``EpochSampler`` and apply one ``transform_batch``, so for one
seed they give the same images."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from skipstudy.data.augment import EpochPlan, EpochSampler, Transform, transform_batch
from skipstudy.data.options import Images

log = logging.getLogger(__name__)

# loader=auto keeps the device-resident set under this share of the free accelerator memory,
# leaving the rest to activations (a 224 px ResNet-50 batch needs several GiB).
DEVICE_MEMORY_SHARE = 0.25
MAX_WORKERS = 4


def default_workers() -> int:
    """``dataset.num_workers=null``: one worker per core this process may use, less one for the
    training loop itself, at most :data:`MAX_WORKERS`; more than the cores would make PyTorch
    warn of over-subscription and the workers wait on each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_WORKERS, cores - 1))


class ArrayImages(Dataset):
    """The torch path: one image per sampler key ``(index, top, left, flip)``, so workers hold no
    random state. A memmap is reopened by name in each worker instead of being pickled (pickling
    a memmap copies all of it)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform) -> None:
        self.images, self.transform = images, transform
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = ("memmap", self.images.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        images = state["images"]
        if isinstance(images, tuple) and images[0] == "memmap":
            state["images"] = np.load(images[1], mmap_mode="r")
        self.__dict__.update(state)

    def __getitem__(self, key: tuple[int, int, int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        index, top, left, flip = key
        image = torch.from_numpy(np.array(self.images[index : index + 1]))  # a set of one, as the transform takes
        plan = EpochPlan(torch.zeros(1, dtype=torch.int64), torch.tensor([top]), torch.tensor([left]),
                         torch.tensor([flip]))
        return self.transform(image, plan)[0], self.labels[index]


class DeviceBatches:
    """``dataset.loader=device``, in the style of Keller Jordan's airbench: the whole uint8 split
    sits on the device and each batch is one gather and a transform there: no workers, no
    per-batch host copy. Lightning treats it like a DataLoader: ``len()`` is the batch count (so
    ``limit_train_batches`` works), ``sampler.set_epoch`` is called every epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochSampler, *, batch_size: int,
                 drop_last: bool, transform: Transform) -> None:
        self.images, self.labels, self.sampler, self.transform = images, labels, sampler, transform
        self.batch_sampler = None  # Lightning inspects this as a DataLoader's; batches come from sampler
        self.batch_size, self.drop_last = batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = [t.to(self.images.device, non_blocking=True) for t in self.sampler.take_plan()]
        for b in range(len(self)):
            part = EpochPlan(*(t[b * self.batch_size : (b + 1) * self.batch_size] for t in plan))
            yield self.transform(self.images, part), self.labels[part.indices]


class ImageArrayDataModule(L.LightningDataModule):
    """The one base of the stored data sets: subclasses set ``name``, ``native_size`` (stored image
    side), ``num_classes``, ``mean``/``std`` (per channel, [0, 1] scale) and implement
    ``load_split(split) -> (uint8 NHWC images, int64 labels)`` for train, val and test. The
    arguments are the ``dataset.*`` keys; ``device`` is where the device path keeps the data
    (default: the Trainer's device).
    """

    name = "images"
    declared: type[Images] = Images  # the options' declaration (data/options.py)
    channels = 3
    native_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, *, seed: int = 0, device: str | torch.device | None = None, **options: Any) -> None:
        super().__init__()
        # The keys, their defaults and ranges: data/options.py (checked there, by config.check).
        self.options = o = self.declared.model_construct(**options)
        self.batch_size, self.image_size = o.batch_size, self.native_size if o.image_size is None else o.image_size
        self.num_workers = default_workers() if o.num_workers is None else o.num_workers
        self.augment, self.loader, self.pad_mode, self.crop_padding = o.augment, o.loader, o.pad_mode, o.crop_padding
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._device_sets: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.loader_used: str | None = None  # what auto resolved to, for logs and tests

    def setup(self, stage: str | None = None) -> None:
        for split in {"validate": ("val",), "test": ("test",)}.get(stage, ("train", "val")):
            self._load(split)

    def _load(self, split: str) -> None:
        if split not in self.splits:
            self.splits[split] = self.load_split(split)

    def train_dataloader(self):
        return self.make_loader("train", train=True)

    def val_dataloader(self):
        return self.make_loader("val", train=False)

    def test_dataloader(self):
        return self.make_loader("test", train=False)

    def target_device(self) -> torch.device:
        if self.device is None and self.trainer is not None:
            return torch.device(self.trainer.strategy.root_device)
        return self.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_loader(self, device: torch.device) -> str:
        """``dataset.loader`` with ``auto`` decided: device on CUDA when the data fits."""
        if self.loader != "auto":
            return self.loader
        if device.type != "cuda":
            return "torch"
        need = sum(images.nbytes for images, _ in self.splits.values())
        free, _total = torch.cuda.mem_get_info(device)
        if need <= DEVICE_MEMORY_SHARE * free:
            return "device"
        log.info("dataset.loader=auto: %s needs %.1f GiB, more than %.0f%% of the %.1f GiB free on %s; "
                 "using dataset.loader=torch", self.name, need / 2**30, 100 * DEVICE_MEMORY_SHARE, free / 2**30, device)
        return "torch"

    def make_loader(self, split: str, *, train: bool, kind: str | None = None,
                    images: np.ndarray | None = None, labels: np.ndarray | None = None):
        """A DataLoader (torch path) or :class:`DeviceBatches` (device path) over ``split``; ``kind``,
        ``images`` and ``labels`` override ``dataset.loader`` and the split's arrays (benchmarks)."""
        own = images is None
        if own:
            self._load(split)
            images, labels = self.splits[split]
        device = self.target_device()
        kind = kind or self.resolve_loader(device)
        self.loader_used = kind
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        augment = self.augment and train
        sampler = EpochSampler(len(labels), shuffle=train, augment=augment, padding=self.crop_padding,
                               seed=self.seed, rank=rank, world_size=world, drop_last=train)
        # Training drops the last partial batch (equal batch sizes for BatchNorm statistics)
        # unless that would leave no batch at all.
        drop_last = train and len(sampler) >= self.batch_size
        log.info("%s %s: %d images, dataset.loader=%s on %s, rank %d of %d", self.name, split, len(labels), kind,
                 device if kind == "device" else "cpu", rank, world)
        bound = partial(transform_batch, size=self.image_size, mean=self.mean, std=self.std, padding=self.crop_padding,
                        pad_mode=self.pad_mode, augment=augment)
        if kind == "device":
            # The split is uploaded once per device and kept for later epochs and reloads.
            tensors = self._device_sets.get((split, str(device))) if own else None
            if tensors is None:
                tensors = torch.tensor(images, device=device), torch.tensor(labels, dtype=torch.int64, device=device)
                if own:
                    self._device_sets[split, str(device)] = tensors
            return DeviceBatches(*tensors, sampler, batch_size=self.batch_size, drop_last=drop_last,
                                 transform=bound)
        return DataLoader(ArrayImages(images, labels, bound), sampler=sampler, batch_size=self.batch_size,
                          drop_last=drop_last, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0 and train, pin_memory=device.type == "cuda")
