"""The dataset group's keys (``conf/dataset/``): each option's defaults, types and ranges, declared
here once; the data modules take them as checked values (``skipstudy.config.check``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from skipstudy.keys import Options, Text, key

Batch = Annotated[int, Field(ge=1)]


class Images(Options):
    root: Text = key("./data", eg="/data")
    batch_size: Batch = key(128, eg=64)
    image_size: Annotated[int, Field(ge=1)] | None = key(None, eg=32)  # null: the stored size
    # Random crop of the image padded by crop_padding px (zero or reflect) + horizontal flip.
    augment: bool = True
    crop_padding: int = key(4, ge=0, le=31)
    pad_mode: Literal["zero", "reflect"] = "zero"
    # auto: device-resident batches on a GPU with room for the data, else torch (DataLoader workers).
    loader: Literal["auto", "torch", "device"] = "auto"
    # null: one per core this process may use, less one, at most 4.
    num_workers: Annotated[int, Field(ge=0)] | None = key(None, eg=4)


class Cifar(Images):
    download: bool = True
    verify: bool = True  # false: accept a copy whose files fail torchvision's MD5 check
    # He et al. 2016's 45k/5k split: 5000 (or a fraction); 0: validation is the official test set.
    val_split: Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0, lt=1)] = key(0, eg=5000)


class TinyImageNet(Images):
    image_size: Annotated[int, Field(ge=1)] | None = key(None, eg=64)
    crop_padding: int = key(4, ge=0, le=63)
    cache_dir: Text | None = key(None, eg="/data")  # the decoded arrays (null: beside the images)
    skip_corrupt: bool = False   # true: leave out images that cannot be decoded instead of stopping


class Synthetic(Options):
    num_classes: int = key(10, ge=2)
    channels: int = key(3, ge=1)
    image_size: int = key(32, ge=1)
    num_train: int = key(2048, ge=1)
    num_val: int = key(512, ge=1)
    batch_size: Batch = 64
    noise: float = key(0.5, ge=0)   # the pixel noise's standard deviation


# By the _target_ of conf/dataset/<option>.yaml.
DATASETS: dict[str | None, type[Options]] = {
    "skipstudy.data.cifar.CIFAR10DataModule": Cifar, "skipstudy.data.cifar.CIFAR100DataModule": Cifar,
    "skipstudy.data.tiny_imagenet.TinyImageNetDataModule": TinyImageNet,
    "skipstudy.data.synthetic.SyntheticDataModule": Synthetic,
}
