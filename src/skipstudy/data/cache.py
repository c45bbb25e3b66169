"""Decode images once into memory-mapped uint8 arrays (decoding Tiny ImageNet's JPEGs every epoch
cost most of the earlier studies' 173 s epochs), rebuilt when the source's fingerprint changes.
Files are renamed into place, ``meta.json`` last, under a file lock, so DDP ranks never read half
a cache and only one of them decodes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from filelock import FileLock
from PIL import Image

log = logging.getLogger(__name__)

# Bump when the array layout or the decoding changes: old caches are then rebuilt.
FORMAT_VERSION = 1


class BadImage(Exception):
    """An image that cannot be used: unreadable, truncated, or of the wrong size."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def decode_rgb(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``size x size x 3``; greyscale and palette images become RGB."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL raises OSError for unreadable or truncated files ("image file is truncated").
        raise BadImage(path, f"{type(err).__name__}: {err}") from None
    if array.shape != (size, size, 3):
        raise BadImage(path, f"is {array.shape[1]}x{array.shape[0]} pixels, expected {size}x{size}")
    return array


def fingerprint(files: Sequence[Path], base: Path) -> str:
    """SHA-256 over each file's path relative to ``base``, size and mtime (no contents read)."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}\n".encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class SplitSource(NamedTuple):
    """The files of one split, in order, and their labels."""

    files: list[Path]
    labels: np.ndarray


class DecodedCache:
    """A folder of decoded splits plus ``meta.json``; images of another side than ``image_size``
    are bad images."""

    def __init__(self, directory: Path, image_size: int) -> None:
        self.directory = Path(directory)
        self.image_size = image_size

    def read_meta(self, fingerprint_: str) -> dict | None:
        """The cache's metadata if it was built from this exact source, else None."""
        try:
            meta = json.loads((self.directory / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        complete = all((self.directory / f"{split}_{kind}.npy").is_file() for split in meta.get("splits", ())
                       for kind in ("images", "labels"))
        current = (meta.get("fingerprint"), meta.get("version")) == (fingerprint_, FORMAT_VERSION)
        return meta if complete and current else None

    def ensure(self, fingerprint_: str, sources: dict[str, SplitSource]) -> dict:
        """The metadata of a matching cache, or of a new one decoded from ``sources``. Bad images
        are left out and listed under ``meta["skipped"]``; the caller decides if that is an error."""
        meta = self.read_meta(fingerprint_)
        if meta is not None:
            return meta
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(self.directory / ".lock"):  # another process may be building the same cache
            return self.read_meta(fingerprint_) or self._build(fingerprint_, sources)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)``: the images memory-mapped read-only, the labels in memory."""
        return (np.load(self.directory / f"{split}_images.npy", mmap_mode="r"),
                np.load(self.directory / f"{split}_labels.npy"))

    def _build(self, fingerprint_: str, sources: dict[str, SplitSource]) -> dict:
        threads = min(8, os.cpu_count() or 1)
        total = sum(len(s.files) for s in sources.values())
        log.info("Decoding %d images once into %s (%d threads)", total, self.directory, threads)
        start, tag, size = time.perf_counter(), f".tmp{os.getpid()}", self.image_size
        skipped: list[dict] = []
        counts: dict[str, int] = {}

        def decode(path: Path) -> np.ndarray | BadImage:
            try:
                return decode_rgb(path, size)
            except BadImage as bad:
                return bad

        try:
            with ThreadPoolExecutor(threads) as pool:
                for split, source in sources.items():
                    # Decoded straight into a memory-mapped file: the set never has to fit in RAM.
                    tmp = self.directory / f"{split}_images{tag}.npy"
                    shape = (len(source.files), size, size, 3)
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                    keep = np.ones(len(source.files), dtype=bool)
                    for i, result in enumerate(pool.map(decode, source.files)):
                        if isinstance(result, BadImage):
                            keep[i] = False
                            skipped.append({"split": split, "path": str(result.path), "reason": result.reason})
                        else:
                            out[i] = result
                    out.flush()
                    kept = None if keep.all() else out[keep]  # rare: an in-memory copy is fine
                    del out  # close the memmap before its file is replaced
                    if kept is not None:
                        np.save(tmp, kept)
                    labels = np.asarray(source.labels, dtype=np.int64)[keep]
                    np.save(self.directory / f"{split}_labels{tag}.npy", labels)
                    counts[split] = int(keep.sum())
            meta = {"version": FORMAT_VERSION, "fingerprint": fingerprint_, "image_size": size, "splits": counts,
                    "skipped": skipped, "decode_seconds": round(time.perf_counter() - start, 2),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            (self.directory / f"meta{tag}.json").write_text(json.dumps(meta, indent=1))
            for name in [f"{split}_{kind}" for split in counts for kind in ("images", "labels")]:
                os.replace(self.directory / f"{name}{tag}.npy", self.directory / f"{name}.npy")
            os.replace(self.directory / f"meta{tag}.json", self.directory / "meta.json")
        finally:
            for leftover in self.directory.glob(f"*{tag}*"):
                leftover.unlink(missing_ok=True)
        log.info("Decoded %d images in %.1f s (%d unusable)", total, meta["decode_seconds"], len(skipped))
        return meta
