"""The two input pipelines (torch workers, device-resident) on real CIFAR-10 images, on the CPU.

Both draw order, crops and flips from the same EpochSampler, so for one seed they must give
identical tensors; the device path's single gather must equal pad + crop + flip done by hand.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from torchvision import datasets

from skipstudy.data.augment import EpochSampler, crop_flip_batch
from skipstudy.data.cifar import CIFAR10DataModule
from skipstudy import config
from skipstudy.errors import ConfigError


@pytest.fixture
def cifar_root(shared_data):
    # The mini copy's MD5 sums differ from the official release (see ../shared/data/README.md).
    with mock.patch.object(datasets.CIFAR10, "_check_integrity", return_value=True):
        yield shared_data / "cifar10-mini"


def make_dm(root, **kw) -> CIFAR10DataModule:
    args = dict(root=str(root), download=False, batch_size=100, num_workers=0, device="cpu", seed=3)
    args.update(kw)
    dm = CIFAR10DataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(loader, epochs=(0,)):
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb), f"max abs diff {(xa - xb).abs().max().item()}"


@pytest.mark.parametrize("pad_mode,image_size", [("zero", 32), ("reflect", 32), ("zero", 48)])
def test_device_path_equals_torch_path_for_one_seed(cifar_root, pad_mode, image_size):
    dm = make_dm(cifar_root, pad_mode=pad_mode, image_size=image_size)
    torch_batches = batches(dm.make_loader("train", train=True, kind="torch"), epochs=(0, 1))
    device_batches = batches(dm.make_loader("train", train=True, kind="device"), epochs=(0, 1))
    assert_same(torch_batches, device_batches)
    assert torch_batches[0][0].shape == (100, 3, image_size, image_size)
    # Evaluation: no augmentation, stored order.
    assert_same(batches(dm.make_loader("val", train=False, kind="torch")),
                batches(dm.make_loader("val", train=False, kind="device")))


def test_torch_path_with_worker_processes_gives_the_same_batches(cifar_root):
    # Workers hold no random state: the draws come from the sampler in the main process.
    dm = make_dm(cifar_root, num_workers=2)
    loader = dm.make_loader("train", train=True, kind="torch")
    assert loader.num_workers == 2
    assert_same(batches(loader, epochs=(0, 1)), batches(dm.make_loader("train", train=True, kind="device"), epochs=(0, 1)))


def test_augmentation_is_deterministic_under_a_seed(cifar_root):
    a = batches(make_dm(cifar_root, seed=7).train_dataloader())
    b = batches(make_dm(cifar_root, seed=7).train_dataloader())
    assert_same(a, b)
    c = batches(make_dm(cifar_root, seed=8).train_dataloader())
    assert not torch.equal(a[0][0], c[0][0])
    # A new epoch draws a new order and new crops.
    dm = make_dm(cifar_root, seed=7)
    loader = dm.train_dataloader()
    epoch0, epoch1 = batches(loader, (0,)), batches(loader, (1,))
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    # Without set_epoch, each pass moves on by one epoch (as Lightning's explicit calls do).
    loader2 = make_dm(cifar_root, seed=7).train_dataloader()
    assert_same([(x, y) for x, y in loader2], epoch0)
    assert_same([(x, y) for x, y in loader2], epoch1)


def test_without_augment_batches_are_the_normalised_images(cifar_root):
    dm = make_dm(cifar_root, augment=False)
    images, labels = dm.splits["train"]
    mean = torch.tensor(dm.mean).view(3, 1, 1)
    std = torch.tensor(dm.std).view(3, 1, 1)
    for kind in ("torch", "device"):
        loader = dm.make_loader("train", train=True, kind=kind)
        plan = loader.sampler.plan(0)
        x, y = next(iter(loader))
        idx = plan.indices[:100].numpy()
        expected = (torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
        assert torch.equal(y, torch.from_numpy(labels[idx]))
        assert len(set(idx.tolist())) == 100  # shuffled without repeats


@pytest.mark.parametrize("pad_mode,np_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_one_gather_equals_pad_crop_flip_by_hand(cifar_root, pad_mode, np_mode):
    dm = make_dm(cifar_root)
    images = torch.from_numpy(dm.splits["train"][0][:64].copy())
    sampler = EpochSampler(64, shuffle=True, augment=True, padding=4, seed=1)
    plan = sampler.plan(0)
    out = crop_flip_batch(images, plan, 4, pad_mode, augment=True).numpy()
    for b in range(64):
        i, top, left, flip = (int(plan.indices[b]), int(plan.top[b]), int(plan.left[b]), bool(plan.flip[b]))
        padded = np.pad(images[i].numpy(), ((4, 4), (4, 4), (0, 0)), mode=np_mode)
        ref = padded[top : top + 32, left : left + 32]
        if flip:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(out[b], ref.transpose(2, 0, 1))


def test_crop_offsets_and_flips_are_uniform():
    plan = EpochSampler(20000, shuffle=True, augment=True, padding=4, seed=0).plan(0)
    counts = torch.bincount(plan.top, minlength=9)
    assert len(counts) == 9 and counts.min() > 20000 / 9 * 0.85
    assert 0.47 < plan.flip.float().mean().item() < 0.53
    assert sorted(plan.indices.tolist()) == list(range(20000))


def test_ranks_get_disjoint_equal_shards_with_the_same_augmentation():
    single = EpochSampler(1001, shuffle=True, augment=True, padding=4, seed=5, drop_last=True).plan(2)
    shards = [EpochSampler(1001, shuffle=True, augment=True, padding=4, seed=5, rank=r, world_size=2,
                           drop_last=True).plan(2) for r in (0, 1)]
    assert len(shards[0].indices) == len(shards[1].indices) == 500
    assert not set(shards[0].indices.tolist()) & set(shards[1].indices.tolist())
    # A sample's crop and flip in an epoch do not depend on the number of ranks.
    by_index = {int(i): (int(t), int(l), bool(f)) for i, t, l, f in
                zip(single.indices, single.top, single.left, single.flip)}
    for shard in shards:
        for i, t, l, f in zip(shard.indices, shard.top, shard.left, shard.flip):
            assert by_index[int(i)] == (int(t), int(l), bool(f))
    # Evaluation shards pad by repetition so both ranks run the same number of batches.
    evals = [EpochSampler(1001, shuffle=False, augment=False, padding=4, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert len(evals[0]) == len(evals[1]) == 501
    assert set(evals[0].plan().indices.tolist()) | set(evals[1].plan().indices.tolist()) == set(range(1001))


def test_loader_choice(cifar_root, monkeypatch):
    dm = make_dm(cifar_root, loader="auto")
    assert dm.resolve_loader(torch.device("cpu")) == "torch"
    assert isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)
    target = "skipstudy.data.cifar.CIFAR10DataModule"  # the declared options (data/options.py), as the CLI checks them
    with pytest.raises(ConfigError, match=r"dataset.loader='gpu' is not one of: auto, torch, device"):
        config.check_group("dataset", target, {"loader": "gpu"})
    with pytest.raises(ConfigError, match=r"dataset.pad_mode='edge' is not one of: zero, reflect"):
        config.check_group("dataset", target, {"pad_mode": "edge"})
    # On CUDA, auto picks the device path when the data fits in a share of the free memory.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert dm.resolve_loader(torch.device("cuda")) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert dm.resolve_loader(torch.device("cuda")) == "torch"


def test_device_batches_report_their_length_and_drop_the_partial_batch(cifar_root):
    dm = make_dm(cifar_root, batch_size=300)
    train = dm.make_loader("train", train=True, kind="device")
    assert len(train) == 3 and [len(y) for _, y in train] == [300, 300, 300]  # 1000 // 300
    val = dm.make_loader("val", train=False, kind="device")
    assert len(val) == 1 and [len(y) for _, y in val] == [200]


@pytest.mark.gpu
def test_device_path_on_cuda_equals_cpu(cifar_root):
    dm = make_dm(cifar_root, device="cuda", image_size=64)
    gpu = [(x.cpu(), y.cpu()) for x, y in batches(dm.make_loader("train", train=True, kind="device"))]
    assert gpu[0][0].shape == (100, 3, 64, 64)
    cpu = batches(make_dm(cifar_root, image_size=64).make_loader("train", train=True, kind="device"))
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg, yc)
        torch.testing.assert_close(xg, xc, rtol=0, atol=1e-4)  # bilinear kernels differ in rounding


def test_loaders_shard_by_the_trainers_rank(cifar_root):
    from types import SimpleNamespace

    seen = {}
    for kind in ("torch", "device"):
        for rank in (0, 1):
            dm = make_dm(cifar_root, batch_size=64)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2,
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
            loader = dm.make_loader("train", train=True, kind=kind)
            assert len(loader) == 500 // 64
            seen[kind, rank] = set(loader.sampler.plan(0).indices.tolist())
            assert len(seen[kind, rank]) == 500
        assert not seen[kind, 0] & seen[kind, 1]
    assert seen["torch", 0] == seen["device", 0]
