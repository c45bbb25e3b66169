"""CIFAR-10 and CIFAR-100 through torchvision, which reads the official pickles (uint8 NHWC already:
no decoded cache) and checks their MD5 sums. Validation is the official test set, or with
``dataset.val_split`` a held-out part of the training set (He et al. 2016: 45k/5k), the same for
every run seed so a study validates on one set."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from skipstudy.data.arrays import ImageArrayDataModule
from skipstudy.data.options import Cifar
from skipstudy.errors import ConfigError

# The held-out validation images are drawn with this seed, independent of the run seed.
SPLIT_SEED = 0


class CIFAR10DataModule(ImageArrayDataModule):
    """CIFAR-10: 50k training and 10k test images, 32x32 RGB, 10 classes. ``root`` holds (or will
    hold) ``cifar-10-batches-py/``, or is that folder; the other keys: data/options.py Cifar."""

    name = "CIFAR-10"
    torchvision_cls = datasets.CIFAR10
    num_classes = 10
    native_size = 32
    # Per-channel mean and standard deviation of the 50k training images, on the [0, 1] scale.
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    declared = Cifar

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__(seed=seed, **options)
        root = self.options.root
        root_path = Path(str(root)).expanduser()
        self.folder, self.url = self.torchvision_cls.base_folder, self.torchvision_cls.url
        self.root = root_path.parent if root_path.name == self.folder else root_path
        self.root_arg = str(root)
        self.download, self.verify, self.val_split = self.options.download, self.options.verify, self.options.val_split
        self._prepared = False

    def _arrays(self, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The split as uint8 NHWC images and int64 labels. ``dataset.verify=true``, or files still to
        download: through torchvision's class (its download, its MD5 check). ``verify=false``: the
        official python batches read directly in their documented format (pickled dicts, ``data``
        channel-planar N x 3072), so a subset or re-packed copy needs no checksum to be bypassed."""
        cls, folder = self.torchvision_cls, self.root / self.folder
        fetch = download and (self.verify or not all((folder / n).is_file() for n, _ in cls.train_list + cls.test_list))
        try:
            if self.verify or fetch:
                data = cls(str(self.root), train=train, download=fetch)
                return np.ascontiguousarray(data.data), np.asarray(data.targets, dtype=np.int64)
            batches = []
            for name, _md5 in cls.train_list if train else cls.test_list:
                with open(folder / name, "rb") as f:
                    batches.append(pickle.load(f, encoding="latin1"))
            images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            # CIFAR-100 names its (fine) labels differently.
            labels = np.concatenate([b["labels"] if "labels" in b else b["fine_labels"] for b in batches])
            return np.ascontiguousarray(images), labels.astype(np.int64)
        except Exception as err:  # noqa: BLE001 - any failure to get the files ends the same way
            check = "fail torchvision's MD5 check" if self.verify else "cannot all be read"
            if folder.is_dir():
                problem = (f"{folder} exists but its files {check}: {self._bad_file(folder)} "
                           "(a damaged or partial download, or a subset)")
                if fetch:
                    problem += f", and downloading a fresh copy failed ({type(err).__name__}: {err})"
            elif fetch:
                problem = f"{folder} does not exist and the download failed ({type(err).__name__}: {err})"
            else:
                problem = f"{folder} does not exist (dataset.download=false)"
            raise ConfigError(
                f"dataset.root={self.root_arg}: no usable {self.name}: {problem}.\n"
                f"Ways out:\n"
                f"  - download {self.url} on a machine with network access, unpack it and copy the "
                f"{self.folder}/ folder to {self.root}/\n"
                f"  - or set dataset.root=<a directory containing {self.folder}/>\n"
                f"  - or train without it: dataset=synthetic"
                + ("\n  - or, for a subset or re-packed copy you trust: dataset.verify=false"
                   if folder.is_dir() and self.verify else "")
            ) from err

    def _bad_file(self, folder: Path) -> str:
        """The first file that is missing, fails its MD5 sum (with verify) or cannot be unpickled."""
        cls = self.torchvision_cls
        sums = dict(cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])])
        missing = [name for name in sums if not (folder / name).is_file()]
        if missing:
            return f"{folder / missing[0]} is missing"
        for name, md5 in sums.items():
            path = folder / name
            if self.verify and not check_integrity(str(path), md5):
                return f"{path} ({path.stat().st_size} bytes) differs from the release's MD5 sum"
            try:
                with open(path, "rb") as f:
                    pickle.load(f, encoding="latin1")
            except Exception as err:  # noqa: BLE001 - a truncated pickle raises several types
                return f"{path} ({path.stat().st_size} bytes) cannot be read ({type(err).__name__}: {err})"
        return "no single file to blame"

    def prepare_data(self) -> None:
        if self._prepared:
            return
        self._arrays(train=True, download=self.download)
        self._arrays(train=False)
        self._prepared = True

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "test" or (split == "val" and not self.val_split):
            return self._arrays(train=False)
        images, labels = self._arrays(train=True)
        if not self.val_split:
            return images, labels
        n = len(labels)
        n_val = self.val_split if isinstance(self.val_split, int) else round(self.val_split * n)
        if not 0 < n_val < n:
            raise ConfigError(f"dataset.val_split={self.val_split!r} leaves no training or no validation images "
                              f"out of {n}; use a value in (0, {n}), e.g. dataset.val_split={n // 10}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
        keep = np.sort(order[n_val:] if split == "train" else order[:n_val])
        return images[keep], labels[keep]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: as CIFAR-10 with 100 fine classes (``cifar-100-python/``)."""

    name = "CIFAR-100"
    torchvision_cls = datasets.CIFAR100
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
