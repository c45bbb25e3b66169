"""CIFAR-10/100 through torchvision, on the real mini copy in ../shared/data/cifar10-mini."""

from __future__ import annotations

import pickle
import shutil
import urllib.error
from unittest import mock

import hydra
import numpy as np
import pytest
from torchvision import datasets

from skipstudy.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from skipstudy import config
from skipstudy.errors import ConfigError


@pytest.fixture
def cifar_root(shared_data):
    # The mini copy's MD5 sums differ from the official release (see ../shared/data/README.md).
    with mock.patch.object(datasets.CIFAR10, "_check_integrity", return_value=True):
        yield shared_data / "cifar10-mini"


def make(root, **kw) -> CIFAR10DataModule:
    args = dict(root=str(root), download=False, batch_size=50, num_workers=0, device="cpu")
    args.update(kw)
    return CIFAR10DataModule(**args)


def test_loads_the_mini_copy_with_official_labels(cifar_root):
    dm = make(cifar_root)
    # Known before setup, as train.py needs them to build the model.
    assert (dm.num_classes, dm.channels, dm.image_size, dm.batch_size) == (10, 3, 32, 50)
    assert dm.mean == (0.4914, 0.4822, 0.4465)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.splits["train"]
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    # torchvision's channel-planar pickle -> HWC, same order and labels.
    np.testing.assert_array_equal(images[0], raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert labels[:200].tolist() == raw["labels"]
    assert len(dm.splits["val"][1]) == 200  # the official test set
    assert sorted(set(labels.tolist())) == list(range(10))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 3, 32, 32) and abs(x.mean().item()) < 0.6


def test_val_split_holds_out_training_images_fixed_across_seeds(cifar_root):
    splits = []
    for seed, val_split in ((0, 100), (1, 100), (0, 0.1)):
        dm = make(cifar_root, val_split=val_split, seed=seed)
        dm.setup("fit")
        splits.append(dm.splits)
    train, val = splits[0]["train"], splits[0]["val"]
    assert len(train[1]) == 900 and len(val[1]) == 100
    # Disjoint: no held-out image is also a training image.
    train_rows = {row.tobytes() for row in train[0]}
    assert not any(row.tobytes() in train_rows for row in val[0])
    for other in splits[1:]:
        np.testing.assert_array_equal(other["val"][0], val[0])
    dm = make(cifar_root, val_split=100)
    dm.setup("test")
    assert len(dm.splits["test"][1]) == 200  # the official test set stays the test split


@pytest.mark.parametrize("bad", [-1, 1.5, True, "5000"])
def test_bad_val_split(cifar_root, bad):
    with pytest.raises(ConfigError, match=r"dataset.val_split=.* must be an integer >= 0 or a number in \(0, 1\); e.g. dataset.val_split=5000"):
        config.check_group("dataset", "skipstudy.data.cifar.CIFAR10DataModule", {"val_split": bad})


def test_val_split_larger_than_the_training_set(cifar_root):
    dm = make(cifar_root, val_split=5000)
    with pytest.raises(ConfigError, match=r"dataset.val_split=5000 leaves no training .* out of 1000"):
        dm.setup("fit")


def test_root_may_be_the_batches_folder_and_prepare_data_is_idempotent(cifar_root):
    dm = make(cifar_root / "cifar-10-batches-py")
    assert dm.root == cifar_root
    with mock.patch.object(datasets.CIFAR10, "__init__", autospec=True,
                           side_effect=datasets.CIFAR10.__init__) as init:
        dm.prepare_data()
        dm.prepare_data()
    assert init.call_count == 2  # train + test once; the second call does nothing


def test_integrity_failure_is_refused_with_our_message(shared_data):
    # Unpatched: the subset fails torchvision's MD5 check exactly as a damaged download would.
    dm = make(shared_data / "cifar10-mini")
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    msg = str(err.value)
    folder = shared_data / "cifar10-mini" / "cifar-10-batches-py"
    assert f"{folder} exists but its files fail torchvision's MD5 check" in msg
    assert f"dataset.root={shared_data / 'cifar10-mini'}" in msg
    assert "dataset=synthetic" in msg and "set dataset.root=" in msg


def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_offline_download_failure_says_where_it_looked_and_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    dm = make(tmp_path / "data", download=True)
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert msg.startswith(f"dataset.root={tmp_path / 'data'}: no usable CIFAR-10: ")
    assert f"{tmp_path / 'data' / 'cifar-10-batches-py'} does not exist and the download failed (URLError" in msg
    assert "copy the cifar-10-batches-py/ folder to" in msg
    assert "set dataset.root=<a directory containing cifar-10-batches-py/>" in msg
    assert "dataset=synthetic" in msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 5
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py does not exist \(dataset.download=false\)"):
        make(tmp_path / "data", download=False).prepare_data()


def test_damaged_copy_and_offline(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    shutil.copytree(shared_data / "cifar10-mini" / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match=r"fail torchvision's MD5 check: \S+data_batch_1 \(\d+ bytes\) differs from the release's MD5 sum .* and downloading a fresh copy failed"):
        make(tmp_path, download=True).prepare_data()


def test_cifar100_properties_and_yamls(make_cfg, cifar_root):
    dm = CIFAR100DataModule(root="/nonexistent", num_workers=0)
    assert (dm.num_classes, dm.channels, dm.image_size) == (100, 3, 32)
    cfg = make_cfg(["dataset=cifar10", f"dataset.root={cifar_root}", "dataset.image_size=224",
                    "dataset.val_split=5000", "dataset.loader=device"])
    dm = hydra.utils.instantiate(cfg.dataset, seed=cfg.seed, download=False)
    assert isinstance(dm, CIFAR10DataModule)
    assert (dm.image_size, dm.val_split, dm.loader, dm.seed, dm.augment) == (224, 5000, "device", cfg.seed, True)
    assert str(dm.root) == str(cifar_root)
    cfg = make_cfg(["dataset=cifar100"])
    assert str(hydra.utils.instantiate(cfg.dataset).root) == cfg.paths.data_dir


def test_verify_false_accepts_a_copy_whose_sums_differ_and_still_needs_every_file(shared_data, tmp_path):
    """dataset.verify=false reads the mini copy (sums differ from the release) without any patch."""
    mini = shared_data / "cifar10-mini"
    with pytest.raises(ConfigError, match="dataset.verify=false"):
        make(mini).prepare_data()  # verified: refused, and the message names the switch
    dm = make(mini, verify=False)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.splits["train"]
    with open(mini / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    first = np.asarray(batch["data"][0]).reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(images[0], first) and labels[0] == batch["labels"][0]

    # A missing batch file is still an error, with or without the MD5 check.
    broken = tmp_path / "cifar-10-batches-py"
    shutil.copytree(mini / "cifar-10-batches-py", broken)
    (broken / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="dataset.root="):
        make(tmp_path, verify=False).prepare_data()
    with pytest.raises(ConfigError, match="dataset.verify='no' must be true or false"):
        config.check_group("dataset", "skipstudy.data.cifar.CIFAR10DataModule", {"root": str(mini), "verify": "no"})


@pytest.mark.slow
def test_cli_trains_on_the_mini_copy_with_verify_false(shared_data, tmp_path):
    import subprocess

    from conftest import PYTHON, cli_env
    from tbparse import SummaryReader

    cmd = [PYTHON, "-m", "skipstudy.train", "dataset=cifar10", f"dataset.root={shared_data / 'cifar10-mini'}",
           "dataset.verify=false", "dataset.download=false", "dataset.batch_size=32", "dataset.num_workers=0",
           "model=mini", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    tags = set(SummaryReader(str(events.parent)).scalars.tag)
    assert {"train/loss", "val/acc", "grad_norm/output/block1.conv1"} <= tags
