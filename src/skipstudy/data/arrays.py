"""A LightningDataModule over uint8 image arrays, with two interchangeable input pipelines.

Every data set here ends up as uint8 NHWC arrays in host memory or memory-mapped from a
decoded cache (CIFAR's pickles already are; Tiny ImageNet's JPEGs are decoded once, see
``cache.py``). :class:`ImageArrayDataModule` turns them into batches of normalised float
images in one of two ways, chosen by ``dataset.loader``:

- ``torch``: a DataLoader with worker processes; each worker pads, crops and flips one uint8
  image with torchvision v2 functional ops, converts, resizes and normalises it.
- ``device``: :class:`~skipstudy.data.device.DeviceBatches`; the split lives on the
  accelerator and whole batches are built there.
- ``auto``: ``device`` when training on a CUDA device with room for the data, else ``torch``.

Both take their random draws from the same :class:`~skipstudy.data.augment.EpochSampler`, so
for one seed they give the same images.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from skipstudy import config
from skipstudy.data.augment import EpochSampler, crop_flip_image, finish
from skipstudy.data.device import DeviceBatches, to_device
from skipstudy.errors import ConfigError

log = logging.getLogger(__name__)

# loader=auto keeps the device-resident set under this share of the free accelerator memory,
# leaving the rest to activations (a 224 px ResNet-50 batch needs several GiB).
DEVICE_MEMORY_SHARE = 0.25


class ArrayImages(Dataset):
    """One uint8 image at a time, as the torch path's workers see it.

    Indexed by the ``(index, top, left, flip)`` tuples of :class:`EpochSampler`, so the workers
    hold no random state. A memory-mapped array is reopened by file name in each worker
    process instead of being pickled (pickling a memmap copies all of it).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, image_size: int, mean, std,
                 padding: int, pad_mode: str, augment: bool) -> None:
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.padding, self.pad_mode, self.augment = padding, pad_mode, augment

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
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)  # HWC -> CHW
        if self.augment:
            image = crop_flip_image(image, top, left, flip, self.padding, self.pad_mode)
        return finish(image, self.image_size, self.mean, self.std), self.labels[index]


class ImageArrayDataModule(L.LightningDataModule):
    """Base class: subclasses set the class attributes and implement :meth:`load_split`.

    Subclasses set ``num_classes`` (may be per instance), ``native_size`` (stored image side),
    ``mean``/``std`` (per channel, on the [0, 1] scale) and ``name`` (for messages).

    Args:
        batch_size: samples per batch and device.
        image_size: side of the images the model sees; bilinear resize when it differs from
            the stored size (e.g. 224 for the ImageNet-style studies).
        num_workers: DataLoader workers of the torch path.
        augment: random crop with ``crop_padding`` and horizontal flip on the training split.
        loader: ``auto``, ``torch`` or ``device`` (see the module docstring).
        seed: fixes the sample order and every augmentation draw, per epoch.
        crop_padding: pixels of padding around the stored image before the random crop.
        pad_mode: ``zero`` or ``reflect`` padding.
        device: where the device path keeps the data; default the Trainer's device, else
            CUDA if present, else the CPU.
    """

    name = "images"
    channels = 3
    native_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        num_workers: int,
        augment: bool,
        loader: str,
        seed: int,
        crop_padding: int,
        pad_mode: str,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        config.check_args("dataset", self, batch_size=batch_size, image_size=image_size, num_workers=num_workers,
                          loader=loader, pad_mode=pad_mode, crop_padding=crop_padding)
        self.batch_size, self.image_size, self.num_workers = batch_size, image_size, num_workers
        self.augment = bool(augment)
        self.loader, self.pad_mode = loader, pad_mode
        self.crop_padding = crop_padding
        self.seed = 0 if seed is None else int(seed)
        self.device = torch.device(device) if device is not None else None
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._device_sets: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.loader_used: str | None = None  # what auto resolved to, for logs and tests

    # -- subclass interface --------------------------------------------------------------
    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` of ``split`` (train, val or test): uint8 NHWC, int64."""
        raise NotImplementedError

    def available_splits(self) -> tuple[str, ...]:
        return ("train", "val")

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, self.available_splits())
        for split in splits:
            self._load(split)

    def _load(self, split: str) -> None:
        if split not in self.available_splits():
            raise ConfigError(f"{self.name} has no {split!r} split; available: {', '.join(self.available_splits())}")
        if split not in self.splits:
            self.splits[split] = self.load_split(split)

    def train_dataloader(self):
        return self.make_loader("train", train=True)

    def val_dataloader(self):
        return self.make_loader("val", train=False)

    def test_dataloader(self):
        # Without a labelled test split (Tiny ImageNet), testing reports on the val split.
        return self.make_loader("test" if "test" in self.available_splits() else "val", train=False)

    # -- loaders -------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def target_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return torch.device(trainer.strategy.root_device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
        """A DataLoader (torch path) or :class:`DeviceBatches` (device path) over ``split``.

        ``kind`` overrides ``dataset.loader``; ``images``/``labels`` override the split's arrays
        (the benchmark uses both).
        """
        own = images is None
        if own:
            self._load(split)
            images, labels = self.splits[split]
        device = self.target_device()
        kind = kind or self.resolve_loader(device)
        self.loader_used = kind
        rank, world = self._rank()
        augment = self.augment and train
        sampler = EpochSampler(len(labels), shuffle=train, augment=augment, padding=self.crop_padding,
                               seed=self.seed, rank=rank, world_size=world, drop_last=train)
        # Training drops the last partial batch (equal batch sizes for BatchNorm statistics)
        # unless that would leave no batch at all.
        drop_last = train and len(sampler) >= self.batch_size
        log.info("%s %s: %d images, dataset.loader=%s on %s, rank %d of %d", self.name, split, len(labels), kind,
                 device if kind == "device" else "cpu", rank, world)
        common = dict(image_size=self.image_size, mean=self.mean, std=self.std, padding=self.crop_padding,
                      pad_mode=self.pad_mode, augment=augment)
        if kind == "device":
            # The split is uploaded once per device and kept for later epochs and reloads.
            key = (split, str(device))
            tensors = self._device_sets.get(key) if own else None
            if tensors is None:
                tensors = (to_device(images, device), torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(device))
                if own:
                    self._device_sets[key] = tensors
            return DeviceBatches(*tensors, sampler, batch_size=self.batch_size, drop_last=drop_last, **common)
        dataset = ArrayImages(images, labels, **common)
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and train,
            pin_memory=device.type == "cuda",
        )
