"""Procedural image classification data: no download, deterministic from the seed, learnable.

Each class is a texture: the sum of two oriented sinusoidal gratings in its own colour, jittered
per sample, so a two-block net gets clearly above chance within one epoch but far from perfect.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from skipstudy.data.options import Synthetic


def make_synthetic_images(num_samples: int, num_classes: int, channels: int, image_size: int, seed: int,
                          noise: float = 0.5, split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``, zero mean and unit-ish variance. The class patterns depend on ``seed``
    only, the samples on ``split`` too (0 train, 1 val)."""
    class_gen = torch.Generator().manual_seed(seed)
    # Two gratings per class: the texture is their sum, so no single orientation or
    # frequency names a class, and classes overlap in either one alone.
    # Cycles per image, <= 6: no aliasing from 12 px up.
    freq = 1.5 + 4.5 * torch.rand(num_classes, 2, generator=class_gen)
    angle = math.pi * torch.rand(num_classes, 2, generator=class_gen)
    colour = torch.randn(num_classes, channels, generator=class_gen)
    colour = colour / colour.norm(dim=1, keepdim=True).clamp_min(1e-6) * math.sqrt(channels)

    sample_gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (split + 1))
    labels = torch.randint(num_classes, (num_samples,), generator=sample_gen)
    phase = 2 * math.pi * torch.rand(num_samples, 2, generator=sample_gen)
    contrast = 0.6 + 0.8 * torch.rand(num_samples, generator=sample_gen)
    # Per-sample jitter of orientation (about 10 degrees), frequency (about 10%) and colour
    # (as large as the class colour itself): the class is a distribution of textures, and
    # colour alone is a weak cue. This keeps accuracy well below 1 after an epoch.
    angle_jitter = 0.18 * torch.randn(num_samples, 2, generator=sample_gen)
    freq_jitter = 1.0 + 0.1 * torch.randn(num_samples, 2, generator=sample_gen)
    colour_jitter = torch.randn(num_samples, channels, generator=sample_gen)

    coords = torch.linspace(0.0, 1.0, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(num_samples, channels, image_size, image_size)
    # Chunks bound the peak memory for large synthetic stand-ins (e.g. 64 px, 200 classes).
    for start in range(0, num_samples, 512):
        sl = slice(start, start + 512)
        lab = labels[sl]
        theta = angle[lab] + angle_jitter[sl]
        f = freq[lab] * freq_jitter[sl]
        proj = torch.cos(theta)[:, :, None, None] * xx + torch.sin(theta)[:, :, None, None] * yy
        wave = torch.sin(2 * math.pi * f[:, :, None, None] * proj + phase[sl, :, None, None]).sum(dim=1) / math.sqrt(2)
        col = colour[lab] + colour_jitter[sl]
        col = col / col.norm(dim=1, keepdim=True).clamp_min(1e-6) * math.sqrt(channels)
        pattern = contrast[sl, None, None, None] * wave[:, None] * col[:, :, None, None]
        noise_t = torch.randn(pattern.shape, generator=sample_gen)
        images[sl] = pattern + noise * noise_t
    return images, labels


class SyntheticDataModule(L.LightningDataModule):
    """Synthetic stand-in for CIFAR-10 or Tiny ImageNet; ``noise`` is the pixel noise's standard
    deviation. The images are normalised already: ``mean``/``std`` are 0 and 1."""

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__()
        # The keys, their defaults and ranges: data/options.py (checked there, by config.check).
        o = Synthetic.model_construct(**options)
        self.num_classes, self.channels, self.image_size = o.num_classes, o.channels, o.image_size
        self.num_train, self.num_val, self.batch_size, self.noise = o.num_train, o.num_val, o.batch_size, o.noise
        self.seed = int(seed)
        self.mean, self.std = (0.0,) * o.channels, (1.0,) * o.channels
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            args = (self.num_classes, self.channels, self.image_size)
            self.train_set = TensorDataset(*make_synthetic_images(self.num_train, *args, self.seed, self.noise))
            # The val split shares the class patterns (same seed) but not the samples.
            self.val_set = TensorDataset(*make_synthetic_images(self.num_val, *args, self.seed, self.noise, split=1))

    def train_dataloader(self) -> DataLoader:
        # The shuffle order follows Lightning's seeded global RNG (seed_everything). Under DDP, the
        # sampler Lightning would put in (its seed is the run's), here so the loader can be wrapped.
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None if world == 1 else DistributedSampler(self.train_set, world, self.trainer.global_rank,
                                                             seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
