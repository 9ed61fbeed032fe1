"""Training augmentation on the CPU (albumentations), its policy, and per-sample seeding.

Augmentation is a pure function of ``(seed, epoch, index)``: each sample's pipeline is reseeded
from :func:`sample_seed`, so resuming mid-epoch or changing the number of loader workers does not
change a single pixel.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np

from vit.errors import ConfigError

# albumentations otherwise asks PyPI for a newer version on import (a network call and a warning).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

__all__ = ["RANDAUGMENT_OPS", "AugmentPolicy", "build_transform", "reseed", "sample_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def reseed(transform: A.Compose, seed: int) -> None:
    """Seed an albumentations pipeline for one sample: one numpy and one Python generator, shared
    by all its transforms, which draw from them in turn. (``Compose.set_random_seed`` gives each
    transform its own generators seeded alike, so their draws coincide: the flip then follows the
    crop, and crop + flip take 90 of their 162 combinations.)"""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that is a pure function of ``(seed, epoch, index)`` (splitmix64 chain)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index) & 0xFFFFFFFF


RANDAUGMENT_OPS = (
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "brightness",
    "contrast",
    "saturation",
    "sharpen",
    "posterize",
    "solarize",
    "equalize",
    "autocontrast",
)
"""The operations of the RandAugment-style policy, in the order they apply (both paths)."""


def _randaugment_ops(magnitude: float) -> list[A.BasicTransform]:
    """RandAugment-style operations (Cubuk et al. 2020) at ``magnitude`` in [0, 10], one per name
    of :data:`RANDAUGMENT_OPS`; :func:`randaugment_params` draws from the same ranges."""
    m = magnitude / 10.0
    return [
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.3 * m, 0.3 * m), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3 * m, 0.3 * m)}, p=1.0),
        A.ColorJitter(brightness=0.9 * m, contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0.9 * m, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=0.9 * m, hue=0, p=1.0),
        A.Sharpen(alpha=(0.0, 0.9 * m), p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 4 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.Equalize(p=1.0),
        A.AutoContrast(p=1.0),
    ]


@dataclass(frozen=True)
class AugmentPolicy:
    """The training augmentation, as both loaders apply it (:func:`build_transform` on the CPU,
    :class:`~vit.data.DeviceLoader` on the device): a random crop after zero padding by
    ``crop_padding`` pixels, a horizontal flip with p=0.5, ``randaugment_ops`` RandAugment-style
    operations (Cubuk et al. 2020) at ``randaugment_magnitude`` in [0, 10], and cutout
    (DeVries & Taylor 2017) of one ``cutout``-pixel square."""

    crop_padding: int = 0
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    cutout: int = 0

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.randaugment_ops > 0 or self.cutout > 0

    def check(self, img_size: int) -> None:
        """Refuse settings that do not fit ``img_size`` pixels, before anything is allocated.

        Raises:
            ConfigError: naming the setting and its bound.
        """
        if self.cutout > img_size:
            raise ConfigError(
                f"cutout {self.cutout} exceeds the image size {img_size}; use at most {img_size}"
            )
        if self.crop_padding > img_size:
            raise ConfigError(
                f"crop_padding {self.crop_padding} exceeds the image size {img_size} (a crop must "
                f"overlap the image); use at most {img_size}"
            )
        if not 0 <= self.randaugment_ops <= len(RANDAUGMENT_OPS):
            raise ConfigError(
                f"randaugment_ops is at most {len(RANDAUGMENT_OPS)} (the policy's operations), "
                f"got {self.randaugment_ops}"
            )
        if not 0 <= self.randaugment_magnitude <= 10:
            raise ConfigError(
                f"randaugment_magnitude is on a 0-10 scale, got {self.randaugment_magnitude}"
            )


def build_transform(img_size: int, policy: AugmentPolicy) -> A.Compose | None:
    """The albumentations pipeline of ``policy`` for ``img_size``-pixel images (the RandAugment
    operations of :func:`_randaugment_ops`); ``None`` when everything is off.

    Raises:
        ConfigError: a setting that does not fit the image size (:meth:`AugmentPolicy.check`).
    """
    policy.check(img_size)
    crop_padding, cutout = policy.crop_padding, policy.cutout
    ops: list[A.BasicTransform] = []
    if crop_padding > 0:
        size = img_size + 2 * crop_padding
        ops += [A.PadIfNeeded(size, size, fill=0), A.RandomCrop(img_size, img_size)]
    if policy.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if policy.randaugment_ops > 0:
        ops.append(
            A.SomeOf(_randaugment_ops(policy.randaugment_magnitude), n=policy.randaugment_ops)
        )
    if cutout > 0:
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(cutout, cutout),
                hole_width_range=(cutout, cutout),
                fill=0,
                p=1.0,
            )
        )
    return A.Compose(ops, seed=0) if ops else None
