"""Get or verify Tiny ImageNet in the layout ``dataset=tiny_imagenet`` reads.

    python scripts/tiny_imagenet.py --root ./data            # verify, download if missing
    python scripts/tiny_imagenet.py --root ./data --decode   # also decode every JPEG
    python scripts/tiny_imagenet.py --root ./data --no-download

With ``<root>/tiny-imagenet-200/`` present it checks the layout exactly as training does
(wnids.txt, train/<wnid>/images, val/val_annotations.txt and the files it lists), reports
the image counts against the official release (200 classes x 500 training images, 10,000
validation images) and, with ``--decode``, names every image that cannot be decoded. Without
it, it downloads the official zip (about 237 MB) to ``<root>/tiny-imagenet-200.zip`` where the
network allows, unpacks it and verifies the result. Then train with
``dataset=tiny_imagenet dataset.root=<root>``.

Exit status: 0 usable, 1 problems found, 2 not present and could not be downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from skipstudy.data.cache import BadImage, decode_rgb
from skipstudy.data.tiny_imagenet import FOLDER, TinyImageNetDataModule
from skipstudy.errors import ConfigError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL = {"classes": 200, "train_per_class": 500, "val": 10_000}


def download(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` through a ``.part`` file, printing progress."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, last = 0, 0.0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last > 5:
                last = time.monotonic()
                share = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"  {done / 2**20:.0f} MiB{share}", flush=True)
    os.replace(part, dest)


def unpack(archive: Path, root: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"{archive}: member {bad} fails its CRC check; delete the zip and download again")
        tmp = root / f".{FOLDER}.unpacking"
        shutil.rmtree(tmp, ignore_errors=True)
        zf.extractall(tmp)
    os.replace(tmp / FOLDER, root / FOLDER)
    shutil.rmtree(tmp, ignore_errors=True)


def verify(root: Path, decode: bool, threads: int) -> list[str]:
    """Problems found under ``root`` (empty when usable); prints a summary."""
    try:
        dm = TinyImageNetDataModule(root=str(root), num_workers=0)
        train, val = dm._train_source(), dm._val_source()
    except ConfigError as err:
        return [str(err)]
    per_class = Counter(train.labels.tolist())
    counts = [per_class.get(i, 0) for i in range(dm.num_classes)]
    print(f"{dm.data_dir}: {dm.num_classes} classes, {len(train.files)} training images "
          f"({min(counts)}-{max(counts)} per class), {len(val.files)} labelled validation images")
    official = (dm.num_classes == OFFICIAL["classes"] and set(counts) == {OFFICIAL["train_per_class"]}
                and len(val.files) == OFFICIAL["val"])
    print("matches the official release" if official else "a subset or a modified copy of the official release")
    problems: list[str] = []
    if decode:
        files = train.files + val.files

        def check(path: Path) -> str | None:
            try:
                decode_rgb(path, dm.native_size)
            except BadImage as bad:
                return str(bad)
            return None

        with ThreadPoolExecutor(threads) as pool:
            problems = [p for p in pool.map(check, files) if p]
        print(f"decoded {len(files)} images: {len(problems)} unusable")
        if problems:
            problems.append("Replace them from the official zip, or train with dataset.skip_corrupt=true.")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="directory that holds (or will hold) tiny-imagenet-200/")
    parser.add_argument("--no-download", action="store_true", help="only verify; never download")
    parser.add_argument("--decode", action="store_true", help="decode every JPEG to find corrupt ones")
    parser.add_argument("--url", default=URL, help=f"archive to download (default {URL})")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    root = args.root.expanduser()
    present = (root / FOLDER).is_dir() or (root.name == FOLDER and root.is_dir())
    if not present:
        if args.no_download:
            print(f"{root / FOLDER} does not exist (--no-download).", file=sys.stderr)
            return 2
        root.mkdir(parents=True, exist_ok=True)
        archive = root / "tiny-imagenet-200.zip"
        try:
            if not archive.is_file():
                print(f"downloading {args.url} -> {archive}", flush=True)
                download(args.url, archive)
            print(f"unpacking {archive}", flush=True)
            unpack(archive, root)
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as err:
            print(f"Could not get Tiny ImageNet: {type(err).__name__}: {err}\n"
                  f"Download {args.url} on a machine with network access, copy it to {archive} "
                  f"(or unpack it so that {root / FOLDER}/ exists) and run this command again; "
                  f"or train without it: dataset=synthetic", file=sys.stderr)
            return 2
    problems = verify(root, args.decode, args.threads)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"OK: train with dataset=tiny_imagenet dataset.root={root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
