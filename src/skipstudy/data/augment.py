"""He et al. 2016's augmentation (pad, random crop of the original size, flip), drawn once per
epoch on the CPU from a generator seeded with ``(seed, epoch)``: workers and the device hold no
random state. Crops happen at the stored resolution, before any resize, so a 4 px pad keeps
meaning 1/8 of a CIFAR image in the 224 px studies too."""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


class EpochPlan(NamedTuple):
    """This rank's share of one epoch; ``top``/``left`` is the crop's corner in the padded image
    (``padding`` is the identity crop)."""

    indices: torch.Tensor  # int64 (n,)
    top: torch.Tensor  # int64 (n,)
    left: torch.Tensor  # int64 (n,)
    flip: torch.Tensor  # bool (n,)


def epoch_seed(seed: int, epoch: int) -> int:
    """One generator seed per (run seed, epoch); distinct pairs do not collide in practice."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class EpochSampler(DistributedSampler):
    """Yields ``(index, top, left, flip)`` for this rank's share of each epoch.

    A ``DistributedSampler`` because it shards by rank as that does; Lightning then leaves it in
    place rather than wrapping the loader, and calls ``set_epoch``.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, augment: bool, padding: int, seed: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.augment, self.padding = augment, padding

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The draws of ``epoch`` (default: the current one) for this rank, on the CPU."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.augment:
            # Drawn per sample index (not per position), so a sample's crop in an epoch does not
            # depend on the number of ranks.
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=gen)
            flip = torch.randint(0, 2, (n,), generator=gen).bool()
        else:
            offsets = torch.full((n, 2), self.padding, dtype=torch.int64)
            flip = torch.zeros(n, dtype=torch.bool)
        # Cut to, or pad by repetition to, a multiple of the world size.
        order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas]
        return EpochPlan(mine, offsets[mine, 0], offsets[mine, 1], flip[mine])

    def take_plan(self) -> EpochPlan:
        """The current epoch's plan; moves on one epoch so a loop without ``set_epoch`` still
        sees new draws each pass (Lightning's explicit ``set_epoch`` overrides this)."""
        plan = self.plan(self.epoch)
        self.epoch += 1
        return plan

    def __iter__(self) -> Iterator[tuple[int, int, int, bool]]:
        return zip(*(t.tolist() for t in self.take_plan()))


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    # torch's "reflect" mirrors about the edge pixel without repeating it: -1 -> 1, size -> size-2.
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def crop_flip_batch(images: torch.Tensor, plan: EpochPlan, padding: int, pad_mode: str, augment: bool) -> torch.Tensor:
    """Pad (``zero`` or ``reflect``), crop and flip ``plan``'s images out of the uint8 NHWC set
    without a padded copy: the window's indices are computed in the unpadded image, then reflected
    or clamped and masked to zero, so one ``index_select`` does all three. Returns uint8 NCHW."""
    n, n_rows, n_cols, channels = images.shape
    idx = plan.indices
    if not augment:
        return images[idx].permute(0, 3, 1, 2)
    ar_r = torch.arange(n_rows, device=images.device)
    ar_c = torch.arange(n_cols, device=images.device)
    rows = (plan.top - padding)[:, None] + ar_r  # (B, H) window rows in unpadded coordinates
    cols = (plan.left - padding)[:, None] + ar_c  # (B, W)
    cols = torch.where(plan.flip[:, None], cols.flip(1), cols)
    outside = None
    if pad_mode == "reflect":
        rows, cols = _reflect(rows, n_rows), _reflect(cols, n_cols)
    else:
        outside = ((rows < 0) | (rows >= n_rows))[:, :, None] | ((cols < 0) | (cols >= n_cols))[:, None, :]
        rows, cols = rows.clamp(0, n_rows - 1), cols.clamp(0, n_cols - 1)
    # One flat pixel index per output pixel: faster than three broadcast index tensors.
    pixel = (idx[:, None, None] * n_rows + rows[:, :, None]) * n_cols + cols[:, None, :]  # (B, H, W)
    out = images.reshape(n * n_rows * n_cols, channels).index_select(0, pixel.reshape(-1))
    out = out.view(len(idx), n_rows, n_cols, channels)
    if outside is not None:
        out.masked_fill_(outside[..., None], 0)
    return out.permute(0, 3, 1, 2)


def transform_batch(images: torch.Tensor, plan: EpochPlan, *, size: int, mean: Sequence[float], std: Sequence[float],
              padding: int, pad_mode: str, augment: bool) -> torch.Tensor:
    """What both pipelines do to ``plan``'s images: crop and flip, then float in [0, 1], a bilinear
    resize to ``size`` (antialias matters only when shrinking) and the normalisation."""
    # NCHW-contiguous uint8 first: the copy is 4x smaller than after the float conversion.
    x = crop_flip_batch(images, plan, padding, pad_mode, augment).contiguous()
    x = TF.to_dtype(x, torch.float32, scale=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, list(mean), list(std), inplace=True)


# transform_batch with all but the images and the plan bound (functools.partial), as the loaders take it.
Transform = Callable[[torch.Tensor, EpochPlan], torch.Tensor]
