"""Tiny ImageNet from the official ``tiny-imagenet-200/`` layout (:data:`LAYOUT`): label = line of
``wnids.txt`` (a subset may have fewer), validation labels from ``val/val_annotations.txt``, the
unlabelled ``test/`` unused. The JPEGs (about 1.8% greyscale, made RGB) are decoded once into
``cache.py``'s cache under ``dataset.cache_dir``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets.folder import make_dataset

from skipstudy.data.arrays import ImageArrayDataModule
from skipstudy.data.cache import DecodedCache, SplitSource, fingerprint
from skipstudy.data.options import TinyImageNet
from skipstudy.errors import ConfigError

log = logging.getLogger(__name__)

FOLDER = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg")
LAYOUT = f"""\
  {FOLDER}/
    wnids.txt                    class ids, one per line (num_classes follows it)
    words.txt                    class names: <wnid><TAB><names>
    train/<wnid>/images/*.JPEG   training images, one folder per class
    val/val_annotations.txt      validation labels: <file><TAB><wnid><TAB><box>
    val/images/*.JPEG            validation images"""


def layout_error(root: str, missing: Path | str, detail: str = "") -> ConfigError:
    return ConfigError(
        f"dataset.root={root}: Tiny ImageNet not usable: {detail or 'missing'} {missing}\n"
        f"Expected the official layout of tiny-imagenet-200.zip under dataset.root:\n{LAYOUT}\n"
        f"Fix: set dataset.root=<directory containing {FOLDER}/> (or the {FOLDER} directory itself); "
        f"`python scripts/tiny_imagenet.py --root <directory>` downloads and unpacks it, or verifies a copy."
    )


def locate(root: str | Path) -> Path:
    """The ``tiny-imagenet-200`` directory under (or at) ``root``; ConfigError otherwise."""
    root_path = Path(str(root)).expanduser()
    for candidate in (root_path / FOLDER, root_path):
        if (candidate / "wnids.txt").is_file():
            return candidate
    expected = root_path if root_path.name == FOLDER else root_path / FOLDER
    # Name the first thing that is missing: the root, the folder, or the class list.
    missing = next(p for p in (root_path, expected, expected / "wnids.txt") if not p.exists())
    raise layout_error(str(root), missing)


class TinyImageNetDataModule(ImageArrayDataModule):
    """Tiny ImageNet: 64x64 RGB, 500 training and 50 validation images per class; the keys:
    data/options.py TinyImageNet (``cache_dir`` default: beside ``tiny-imagenet-200/``)."""

    name = "Tiny ImageNet"
    native_size = 64
    # Per-channel statistics of the 100k training images, on the [0, 1] scale.
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)

    declared = TinyImageNet

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__(seed=seed, **options)
        root = self.options.root
        self.root, self.skip_corrupt, self.cache_dir_arg = str(root), self.options.skip_corrupt, self.options.cache_dir
        self.data_dir = locate(root)
        wnids_file, words_file = self.data_dir / "wnids.txt", self.data_dir / "words.txt"
        self.wnids = wnids_file.read_text().split()
        duplicates = sorted({w for w in self.wnids if self.wnids.count(w) > 1})
        if duplicates or not self.wnids:
            raise layout_error(self.root, wnids_file, f"duplicate class ids {duplicates[:5]} in" if duplicates
                               else "no class ids in")
        self.num_classes = len(self.wnids)
        names = {}  # words.txt lists all of WordNet in the official zip; without it the names are the ids
        if words_file.is_file():
            lines = words_file.read_text(encoding="utf-8", errors="replace").splitlines()
            names = dict(line.partition("\t")[::2] for line in lines)
        else:
            log.warning("Tiny ImageNet: %s is missing; class names are the WordNet ids", words_file)
        self.class_names = [names.get(w, w).strip() for w in self.wnids]
        for path in [*(self.data_dir / "train" / w / "images" for w in self.wnids),
                     self.data_dir / "val" / "val_annotations.txt", self.data_dir / "val" / "images"]:
            if not path.exists():
                raise layout_error(self.root, path)
        base = Path(str(self.cache_dir_arg)).expanduser() if self.cache_dir_arg else self.data_dir.parent
        # One cache folder per source directory, so two copies never overwrite each other's.
        source_id = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        self.cache = DecodedCache(base / f"{FOLDER}-decoded-{source_id}", self.native_size)
        self.meta: dict | None = None
        self.skipped: list[dict] = []

    def _train_source(self) -> SplitSource:
        train = self.data_dir / "train"
        try:
            samples = make_dataset(train, {w: i for i, w in enumerate(self.wnids)}, extensions=IMAGE_SUFFIXES)
        except FileNotFoundError as err:  # a class folder without images
            raise layout_error(self.root, train, f"{err}: in") from None
        return SplitSource([Path(path) for path, _ in samples], np.asarray([c for _, c in samples], dtype=np.int64))

    def _val_source(self) -> SplitSource:
        path = self.data_dir / "val" / "val_annotations.txt"
        index = {w: i for i, w in enumerate(self.wnids)}
        files, labels = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise layout_error(self.root, f"{path}, line {number}: {line!r}",
                                   "expected <file><TAB><wnid><TAB><box> in")
            name, wnid = fields[:2]
            if wnid not in index:
                raise ConfigError(f"dataset.root={self.root}: {path}, line {number}: class {wnid!r} of {name} is not "
                                  f"in {self.data_dir / 'wnids.txt'}; the annotations and the class list must come "
                                  f"from the same copy of {FOLDER}")
            image = self.data_dir / "val" / "images" / name
            if not image.is_file():
                raise layout_error(self.root, image, f"listed in {path} (line {number}) but missing:")
            files.append(image)
            labels.append(index[wnid])
        if not files:
            raise layout_error(self.root, path, "no labelled images in")
        return SplitSource(files, np.asarray(labels, dtype=np.int64))

    def prepare_data(self) -> None:
        """Decode the JPEGs into the cache unless one of this exact source exists."""
        sources = {"train": self._train_source(), "val": self._val_source()}
        files = [self.data_dir / "wnids.txt", self.data_dir / "val" / "val_annotations.txt"]
        files += [f for s in sources.values() for f in s.files]
        try:
            self.meta = self.cache.ensure(fingerprint(files, self.data_dir), sources)
        except PermissionError as err:
            raise ConfigError(f"dataset.cache_dir={self.cache_dir_arg}: cannot write the decoded Tiny ImageNet cache "
                              f"({err}); set dataset.cache_dir=<a writable directory>") from err
        self.skipped = self.meta["skipped"]
        if self.skipped:
            listed = "\n".join(f"  {s['path']} ({s['reason']})" for s in self.skipped[:10])
            more = f"\n  ... and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            if not self.skip_corrupt:
                raise ConfigError(
                    f"dataset.root={self.root}: {len(self.skipped)} corrupt or unusable image(s):\n{listed}{more}\n"
                    f"Fix: replace them from the official tiny-imagenet-200.zip, or set dataset.skip_corrupt=true "
                    f"to leave them out (they are counted in the log)"
                )
            log.warning("dataset.skip_corrupt=true: left out %d corrupt image(s) of Tiny ImageNet:\n%s%s",
                        len(self.skipped), listed, more)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self.meta is None:
            self.prepare_data()
        # No labelled test split: testing reports on the val split.
        return self.cache.arrays("val" if split == "test" else split)
