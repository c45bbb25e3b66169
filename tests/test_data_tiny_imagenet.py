"""Tiny ImageNet from its official layout: real JPEGs from ../shared/data/tiny-imagenet-mini.

Tests that damage files work on a small copy in tmp_path; the decoded cache always goes to
tmp_path, never beside the shared data.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from skipstudy.data import cache as cache_mod
from skipstudy.data.tiny_imagenet import TinyImageNetDataModule
from skipstudy.errors import ConfigError


@pytest.fixture(scope="session")
def tiny_src(shared_data) -> Path:
    return shared_data / "tiny-imagenet-mini" / "tiny-imagenet-200"


@pytest.fixture(scope="module")
def mini_dm(tiny_src, tmp_path_factory):
    """The whole mini copy (10 classes, 1000 train, 500 val), decoded once for this module."""
    dm = TinyImageNetDataModule(root=str(tiny_src.parent), cache_dir=str(tmp_path_factory.mktemp("cache")),
                                batch_size=50, num_workers=0, device="cpu", seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def small_copy(src: Path, dest_root: Path, classes: int = 3, per_class: int = 4, val: int = 6) -> Path:
    """Copy a few classes of the official layout: only the files the tests need."""
    dest = dest_root / "tiny-imagenet-200"
    wnids = src.joinpath("wnids.txt").read_text().split()[:classes]
    (dest / "val" / "images").mkdir(parents=True)
    dest.joinpath("wnids.txt").write_text("\n".join(wnids) + "\n")
    words = [line for line in src.joinpath("words.txt").read_text().splitlines() if line.split("\t")[0] in wnids]
    dest.joinpath("words.txt").write_text("\n".join(words) + "\n")
    for wnid in wnids:
        (dest / "train" / wnid / "images").mkdir(parents=True)
        for image in sorted((src / "train" / wnid / "images").iterdir())[:per_class]:
            shutil.copy2(image, dest / "train" / wnid / "images" / image.name)
    lines = [line for line in src.joinpath("val/val_annotations.txt").read_text().splitlines()
             if line.split("\t")[1] in wnids][:val]
    dest.joinpath("val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        shutil.copy2(src / "val" / "images" / line.split("\t")[0], dest / "val" / "images")
    return dest


def make(root, tmp_path, **kw) -> TinyImageNetDataModule:
    args = dict(root=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, num_workers=0, device="cpu")
    args.update(kw)
    return TinyImageNetDataModule(**args)


# -- classes and labels ------------------------------------------------------------------

def test_class_count_and_train_labels_follow_wnids(mini_dm, tiny_src):
    wnids = tiny_src.joinpath("wnids.txt").read_text().split()
    assert mini_dm.num_classes == len(wnids) == 10
    assert mini_dm.class_names[0] == "black stork, Ciconia nigra"
    images, labels = mini_dm.splits["train"]
    assert images.shape == (1000, 64, 64, 3) and images.dtype == np.uint8
    files = mini_dm._train_source().files
    for i in range(0, 1000, 37):
        wnid = files[i].parent.parent.name
        assert labels[i] == wnids.index(wnid)
        np.testing.assert_array_equal(images[i], np.asarray(Image.open(files[i]).convert("RGB")))
    assert np.bincount(labels).tolist() == [100] * 10


def test_val_labels_come_from_val_annotations(mini_dm, tiny_src):
    wnids = tiny_src.joinpath("wnids.txt").read_text().split()
    rows = [line.split("\t") for line in tiny_src.joinpath("val/val_annotations.txt").read_text().splitlines()]
    images, labels = mini_dm.splits["val"]
    assert len(labels) == len(rows) == 500
    for i in range(0, 500, 23):
        name, wnid = rows[i][0], rows[i][1]
        assert labels[i] == wnids.index(wnid)
        decoded = np.asarray(Image.open(tiny_src / "val" / "images" / name).convert("RGB"))
        np.testing.assert_array_equal(images[i], decoded)


def test_greyscale_images_become_rgb(mini_dm):
    images, _ = mini_dm.splits["train"]
    files = mini_dm._train_source().files
    grey = [i for i, f in enumerate(files) if Image.open(f).mode == "L"]
    assert len(grey) == 22  # as documented for the mini copy
    for i in grey:
        source = np.asarray(Image.open(files[i]))
        assert images[i].shape == (64, 64, 3)
        for c in range(3):
            np.testing.assert_array_equal(images[i][..., c], source)
    batch, _ = next(iter(mini_dm.make_loader("train", train=False, kind="device")))
    assert batch.shape[1] == 3


def test_properties_known_before_setup_and_num_classes_follows_wnids(tiny_src, tmp_path):
    root = small_copy(tiny_src, tmp_path / "data", classes=3).parent
    dm = make(root, tmp_path, image_size=32, batch_size=8)
    assert (dm.num_classes, dm.channels, dm.image_size, dm.batch_size) == (3, 3, 32, 8)
    assert len(dm.mean) == len(dm.std) == 3
    assert not (tmp_path / "cache").exists()  # nothing decoded yet
    # The tiny-imagenet-200 folder itself is accepted as the root too.
    assert make(root / "tiny-imagenet-200", tmp_path).data_dir == dm.data_dir


# -- layout errors -----------------------------------------------------------------------

def test_missing_root_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(ConfigError) as err:
        make(tmp_path / "nowhere", tmp_path)
    msg = str(err.value)
    assert f"dataset.root={tmp_path / 'nowhere'}" in msg and f"missing {tmp_path / 'nowhere'}" in msg
    assert "val/val_annotations.txt" in msg and "train/<wnid>/images/*.JPEG" in msg
    assert "set dataset.root=" in msg
    with pytest.raises(ConfigError, match=f"missing {tmp_path / 'tiny-imagenet-200'}"):
        make(tmp_path, tmp_path)


@pytest.mark.parametrize("remove", ["wnids.txt", "val/val_annotations.txt", "train/{wnid}/images", "val/images"])
def test_missing_file_is_named(tiny_src, tmp_path, remove):
    data_dir = small_copy(tiny_src, tmp_path / "data")
    wnid = data_dir.joinpath("wnids.txt").read_text().split()[1]
    target = data_dir / remove.format(wnid=wnid)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ConfigError) as err:
        make(data_dir.parent, tmp_path)
    msg = str(err.value)
    assert f"missing {target}" in msg
    assert "Expected the official layout" in msg and "set dataset.root=" in msg


def test_val_annotations_pointing_at_missing_image_or_unknown_class(tiny_src, tmp_path):
    data_dir = small_copy(tiny_src, tmp_path / "data")
    annotations = data_dir / "val" / "val_annotations.txt"
    first = annotations.read_text().splitlines()[0].split("\t")[0]
    (data_dir / "val" / "images" / first).unlink()
    dm = make(data_dir.parent, tmp_path)  # layout is fine; the listing fails
    with pytest.raises(ConfigError, match=rf"listed in {annotations} \(line 1\) but missing: .*{first}"):
        dm.prepare_data()
    annotations.write_text("val_0.JPEG\tn99999999\t0\t0\t10\t10\n")
    with pytest.raises(ConfigError, match=r"line 1: class 'n99999999' of val_0.JPEG is not in .*wnids.txt"):
        make(data_dir.parent, tmp_path).prepare_data()


# -- corrupt images ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_is_named_or_skipped_and_counted(tiny_src, tmp_path, caplog, damage):
    data_dir = small_copy(tiny_src, tmp_path / "data", classes=2, per_class=4)
    bad = sorted((data_dir / "train").glob("*/images/*.JPEG"))[5]
    data = bad.read_bytes()
    bad.write_bytes(b"not a jpeg at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ConfigError) as err:
        make(data_dir.parent, tmp_path).prepare_data()
    msg = str(err.value)
    assert "1 corrupt or unusable image(s)" in msg and str(bad) in msg and "dataset.skip_corrupt=true" in msg

    caplog.set_level(logging.WARNING)
    dm = make(data_dir.parent, tmp_path, skip_corrupt=True)
    dm.setup("fit")  # the cache built above is reused: the bad file is recorded there
    images, labels = dm.splits["train"]
    assert len(labels) == len(images) == 7 and len(dm.skipped) == 1
    assert dm.skipped[0]["path"] == str(bad)
    assert "left out 1 corrupt image(s)" in caplog.text and str(bad) in caplog.text
    # The remaining images keep their own labels (class 1 lost one image: it was the 6th file).
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]


# -- decoded cache ---------------------------------------------------------------------------

def test_cache_is_built_once_and_rebuilt_when_the_source_changes(tiny_src, tmp_path, monkeypatch):
    data_dir = small_copy(tiny_src, tmp_path / "data", classes=2, per_class=3, val=4)
    calls = []
    real_decode = cache_mod.decode_rgb
    monkeypatch.setattr(cache_mod, "decode_rgb", lambda path, size: calls.append(path) or real_decode(path, size))

    dm = make(data_dir.parent, tmp_path)
    dm.prepare_data()
    dm.prepare_data()  # idempotent: nothing decoded twice
    assert len(calls) == 6 + 4
    train_images = dm.cache.directory / "train_images.npy"
    assert np.load(train_images, mmap_mode="r").shape == (6, 64, 64, 3)

    calls.clear()
    dm2 = make(data_dir.parent, tmp_path)
    dm2.setup("fit")
    assert calls == []  # a new run reuses the cache
    assert isinstance(dm2.splits["train"][0], np.memmap)
    # Epochs read the arrays: no decoding while iterating, on either path.
    for kind in ("torch", "device"):
        for _ in range(2):
            assert sum(len(y) for _, y in dm2.make_loader("train", train=True, kind=kind)) == 4  # drop_last
    assert calls == []

    # Replace one training image by another: new content, new size/mtime -> rebuilt.
    files = sorted((data_dir / "train").glob("*/images/*.JPEG"))
    old_first = np.asarray(Image.open(files[0]).convert("RGB"))
    shutil.copyfile(files[-1], files[0])
    os.utime(files[0], ns=(1, 1))
    dm3 = make(data_dir.parent, tmp_path)
    dm3.setup("fit")
    assert len(calls) == 10
    new_first = dm3.splits["train"][0][0]
    assert not np.array_equal(new_first, old_first)
    np.testing.assert_array_equal(new_first, np.asarray(Image.open(files[-1]).convert("RGB")))

    # Adding a class to wnids.txt without images is a layout error; removing an image rebuilds.
    files[1].unlink()
    calls.clear()
    dm4 = make(data_dir.parent, tmp_path)
    dm4.setup("fit")
    assert len(calls) == 9 and len(dm4.splits["train"][1]) == 5


def _prepare_after(barrier, data_root: Path, tmp_path: Path, record: Path) -> None:
    real_decode = cache_mod.decode_rgb

    def decode(path, size):
        with open(record, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real_decode(path, size)

    cache_mod.decode_rgb = decode  # this child process only
    barrier.wait()
    make(data_root, tmp_path).prepare_data()


def test_two_processes_starting_together_decode_the_cache_once(tiny_src, tmp_path):
    """DDP ranks (here two forked processes released at once) share one cache: the file lock lets
    one decode while the other waits, then reads the finished cache."""
    import multiprocessing

    data_dir = small_copy(tiny_src, tmp_path / "data", classes=2, per_class=3, val=4)
    record = tmp_path / "decoded.txt"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_prepare_after, args=(barrier, data_dir.parent, tmp_path, record)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    decoders = {line.split()[0] for line in record.read_text().splitlines()}
    assert len(record.read_text().splitlines()) == 6 + 4 and len(decoders) == 1
    dm = make(data_dir.parent, tmp_path)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 6 and len(dm.splits["val"][1]) == 4


def test_unwritable_cache_dir_is_a_config_error(tiny_src, tmp_path, monkeypatch):
    data_dir = small_copy(tiny_src, tmp_path / "data", classes=2, per_class=2, val=2)
    dm = make(data_dir.parent, tmp_path, cache_dir="/read-only/cache")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as root, chmod would not stop the write
    with pytest.raises(ConfigError, match=r"dataset.cache_dir=/read-only/cache: cannot write .*Permission denied.*"
                                          r"set dataset.cache_dir=<a writable directory>"):
        dm.prepare_data()


# -- a short training run ----------------------------------------------------------------------

class TinyNet(L.LightningModule):
    """Two convs and a linear head; records what the loop fed it."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
        )
        self.seen: list[tuple[int, tuple, torch.Tensor]] = []
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, tuple(x.shape), y.clone()))
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_losses.append(nn.functional.cross_entropy(self.net(x), y).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("loader", ["torch", "device"])
def test_short_training_run_on_the_mini_copy(make_cfg, shared_data, loader, tmp_path):
    cfg = make_cfg(["dataset=tiny_imagenet", f"dataset.root={shared_data / 'tiny-imagenet-mini'}",
                    "dataset.batch_size=16", "dataset.image_size=32", "dataset.num_workers=0",
                    f"dataset.loader={loader}"])
    dm = hydra.utils.instantiate(cfg.dataset, seed=cfg.seed)
    assert (dm.num_classes, dm.channels, dm.image_size) == (10, 3, 32)  # no override needed
    dm.prepare_data()
    assert Path(cfg.paths.data_dir, dm.cache.directory.name, "meta.json").is_file()  # cache under paths.data_dir
    model = TinyNet(dm.num_classes, dm.channels)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert dm.loader_used == loader
    assert trainer.global_step == 6
    assert [epoch for epoch, _, _ in model.seen] == [0, 0, 0, 1, 1, 1]
    assert all(shape == (16, 3, 32, 32) for _, shape, _ in model.seen)
    labels = torch.cat([y for _, _, y in model.seen])
    assert labels.min() >= 0 and labels.max() < 10 and len(labels.unique()) > 3  # shuffled across classes
    # Lightning's set_epoch reaches the sampler: epoch 1 is a new order.
    assert not torch.equal(model.seen[0][2], model.seen[3][2])
    assert len(model.val_losses) == 4 and all(np.isfinite(model.val_losses))
    assert np.isfinite(trainer.callback_metrics["train/loss"].item())


# -- scripts/tiny_imagenet.py ------------------------------------------------------------------

def load_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "tiny_imagenet.py"
    spec = importlib.util.spec_from_file_location("tiny_imagenet_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_downloads_unpacks_and_verifies(tiny_src, tmp_path, capsys):
    import zipfile

    script = load_script()
    data_dir = small_copy(tiny_src, tmp_path / "src", classes=2, per_class=3, val=4)
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(data_dir.rglob("*")):
            zf.write(path, path.relative_to(data_dir.parent))
    root = tmp_path / "data"
    # A file:// URL stands in for the official server.
    assert script.main(["--root", str(root), "--url", archive.as_uri(), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "2 classes, 6 training images (3-3 per class), 4 labelled validation images" in out
    assert "decoded 10 images: 0 unusable" in out and f"dataset.root={root}" in out
    assert (root / "tiny-imagenet-200" / "wnids.txt").is_file()
    assert make(root, tmp_path).num_classes == 2

    bad = sorted((root / "tiny-imagenet-200" / "train").glob("*/images/*.JPEG"))[0]
    bad.write_bytes(b"\xff\xd8 broken")
    assert script.main(["--root", str(root), "--no-download", "--decode"]) == 1
    assert str(bad) in capsys.readouterr().err
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    assert script.main(["--root", str(root), "--no-download"]) == 1
    assert "missing" in capsys.readouterr().err
    assert script.main(["--root", str(tmp_path / "none"), "--url", (tmp_path / "absent.zip").as_uri()]) == 2
    assert "Could not get Tiny ImageNet" in capsys.readouterr().err
