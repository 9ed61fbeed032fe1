"""Image classification data: CIFAR-10, image folders and a generated synthetic set.

Every dataset holds its images decoded once as a uint8 tensor (N, H, W, 3) and returns
``(uint8 (3, H, W), label)``; normalisation happens on the training device, so a GPU-resident loader
can replace :func:`make_loader` without touching the datasets. Training augmentation is a pure
function of ``(seed, epoch, index)``: a training dataset is indexed with ``(epoch, index)`` pairs
(see :class:`EpochBatchSampler`), so resuming mid-epoch or changing the number of loader workers
does not change a single pixel.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

# albumentations otherwise asks PyPI for a newer version on import (a network call and a warning).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

__all__ = [
    "RANDAUGMENT_OPS",
    "SYNTHETIC_CLASSES",
    "DataError",
    "DeviceLoader",
    "EpochBatchSampler",
    "ImageDataset",
    "augment_batch",
    "build_transform",
    "cifar10",
    "image_folder",
    "make_loader",
    "randaugment_batch",
    "randaugment_params",
    "reseed",
    "sample_seed",
    "synthetic",
    "uniform_ints",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset cannot be found, read or used; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------
# Deterministic per-sample randomness
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Decoded images in memory, with an optional albumentations pipeline.

    Args:
        images: uint8 (N, H, W, 3). labels: int64 (N,). classes: class names, by label.
        transform: applied to training samples, reseeded per sample from ``(seed, epoch, index)``.
        boxes: optional (N, 4) float boxes ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive).

    ``ds[i]`` returns the untransformed sample; ``ds[(epoch, i)]`` the augmented one.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        *,
        transform: A.Compose | None = None,
        seed: int = 0,
        boxes: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise DataError("the dataset is empty")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.transform = transform
        self.seed = seed
        if boxes is not None:
            self.boxes = boxes

    def __len__(self) -> int:
        return len(self.images)

    @property
    def img_size(self) -> int:
        return int(self.images.shape[1])

    def with_transform(self, transform: A.Compose | None, seed: int) -> ImageDataset:
        """The same images (shared memory) with another augmentation pipeline."""
        boxes = getattr(self, "boxes", None)
        return ImageDataset(
            self.images, self.labels, self.classes, transform=transform, seed=seed, boxes=boxes
        )

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        img = self.images[index]
        if self.transform is not None and epoch is not None:
            reseed(self.transform, sample_seed(self.seed, epoch, index))
            img = torch.from_numpy(np.ascontiguousarray(self.transform(image=img.numpy())["image"]))
        return img.permute(2, 0, 1).contiguous(), int(self.labels[index])  # (3, H, W) uint8


# Ten shapes, told apart by form alone (colour, size and position are random), so a classifier must
# look at the object; none changes class under a horizontal flip.
SYNTHETIC_CLASSES = (
    "disk",
    "ring",
    "square",
    "frame",
    "triangle_up",
    "triangle_down",
    "diamond",
    "plus",
    "cross",
    "bar",
)


def _shape_mask(kind: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    cheb, dist = np.maximum(ax, ay), np.hypot(dx, dy)
    t = 0.3 * r  # stroke half-width
    if kind == 0:
        return dist <= r
    if kind == 1:
        return (dist <= r) & (dist >= 0.55 * r)
    if kind == 2:
        return cheb <= 0.8 * r
    if kind == 3:
        return (cheb <= 0.85 * r) & (cheb >= 0.45 * r)
    if kind in (4, 5):
        dy = dy if kind == 4 else -dy
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= 0.55 * (dy + r))
    if kind == 6:
        return ax + ay <= r
    if kind == 7:
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    if kind == 8:
        return ((np.abs(dx - dy) <= 1.4 * t) | (np.abs(dx + dy) <= 1.4 * t)) & (cheb <= 0.8 * r)
    return (ax <= r) & (ay <= 0.35 * r)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def synthetic(
    n: int, *, img_size: int = 32, seed: int = 0, noise: float = 12.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` images of one random shape each (class = shape, :data:`SYNTHETIC_CLASSES`).

    Each image has a random dark background with Gaussian noise and one brightly coloured shape of
    random size at a random position. Returns uint8 images (n, H, W, 3), labels (n,) and the exact
    pixel boxes of the shapes (n, 4) ``(x0, y0, x1, y1)``, x1/y1 exclusive — what attention maps
    should find.
    """
    if img_size < 12:
        raise DataError(f"synthetic images need img_size >= 12, got {img_size}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SYNTHETIC_CLASSES), n)
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32) + 0.5
    images = np.empty((n, img_size, img_size, 3), dtype=np.uint8)
    boxes = np.empty((n, 4), dtype=np.float32)
    for i in range(n):
        r = rng.uniform(0.16, 0.3) * img_size
        cx, cy = rng.uniform(r, img_size - r, size=2)
        mask = _shape_mask(int(labels[i]), xx - cx, yy - cy, r)
        bg = rng.uniform(0, 70) + rng.uniform(-10, 10, size=3)  # dark, nearly grey
        hue = (labels[i] / len(SYNTHETIC_CLASSES) + rng.uniform(-0.02, 0.02)) % 1.0
        fg = 255 * _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
        img = bg + rng.normal(0, noise, size=(img_size, img_size, 3))
        img[mask] = fg + rng.normal(0, noise, size=(int(mask.sum()), 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(boxes)


def cifar10(data_dir: str | Path, *, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 through torchvision, downloaded into ``data_dir`` when missing.

    torchvision already keeps the decoded uint8 array in memory, so no extra cache is needed.
    """
    from torchvision.datasets import CIFAR10

    root = Path(data_dir)
    try:
        ds = CIFAR10(root, train=train, download=False)
    except RuntimeError:
        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = CIFAR10(root, train=train, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise DataError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}: {e}). "
                f"Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it "
                f"into {root} (giving {root / 'cifar-10-batches-py'}), or train offline with "
                f"--data imagefolder --data-dir DIR or --data synthetic"
            ) from None
    return torch.from_numpy(ds.data), torch.tensor(ds.targets), list(ds.classes)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit"


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class folders; the image-folder layout is {root}/<class>/<image>.jpg"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
        )
        if not found:
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(IMG_EXTENSIONS)}); add "
                f"images or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _decode(path: Path, img_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (img_size, img_size):  # shorter side to img_size, then a centre crop
                scale = img_size / min(im.size)
                w, h = (
                    max(img_size, round(im.width * scale)),
                    max(img_size, round(im.height * scale)),
                )
                im = im.resize((w, h), Image.Resampling.BICUBIC)
                left, top = (w - img_size) // 2, (h - img_size) // 2
                im = im.crop((left, top, left + img_size, top + img_size))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(
            f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file"
        ) from None


def image_folder(
    root: str | Path, *, img_size: int, cache_dir: str | Path | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode ``root/<class>/*`` once into uint8 (N, img_size, img_size, 3) and cache it.

    The cache is ``<cache_dir>/imagefolder-<hash>.npz`` (``cache_dir`` defaults to
    ``$XDG_CACHE_HOME/vit`` or ``~/.cache/vit``); the hash covers the folder, every file's name,
    size and modification time, and ``img_size``, so a changed folder is decoded again. Images of
    another size are resized (shorter side) and centre-cropped to ``img_size``.
    """
    root = Path(root)
    files, labels, classes = _list_image_folder(root)
    key = hashlib.sha1(f"{root.resolve()}|{img_size}".encode())
    for p in files:
        st = p.stat()
        key.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    path = cache / f"imagefolder-{key.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        images = np.stack(list(pool.map(lambda p: _decode(p, img_size), files)))
    label_array = np.asarray(labels, dtype=np.int64)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=label_array)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the decoding time again
    return torch.from_numpy(images), torch.from_numpy(label_array), classes


def split_indices(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A deterministic stratified split: ``fraction`` of each class (at least one) to validation.

    The split depends only on the labels and ``seed`` (not the training seed), so runs with
    different training seeds validate on the same images.
    """
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(fraction * len(idx)))
        if k >= len(idx):
            raise DataError(
                f"class {c} has only {len(idx)} images: too few to carve a validation split of "
                f"{fraction:.0%}; add images, add a val/ folder or lower --val-fraction"
            )
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
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


def build_transform(
    img_size: int,
    *,
    crop_padding: int = 0,
    hflip: bool = False,
    randaugment_ops: int = 0,
    randaugment_magnitude: float = 9.0,
    cutout: int = 0,
) -> A.Compose | None:
    """The training pipeline: random crop with zero padding, horizontal flip, ``randaugment_ops``
    random operations of :func:`_randaugment_ops`, and cutout (DeVries & Taylor 2017) of one
    ``cutout``-pixel square. ``None`` when everything is off."""
    ops: list[A.BasicTransform] = []
    if crop_padding > 0:
        size = img_size + 2 * crop_padding
        ops += [A.PadIfNeeded(size, size, fill=0), A.RandomCrop(img_size, img_size)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if randaugment_ops > 0:
        ops.append(A.SomeOf(_randaugment_ops(randaugment_magnitude), n=randaugment_ops))
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


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys: a per-epoch permutation that is a pure function of
    ``(seed, epoch)``, optionally starting at batch ``start`` (mid-epoch resume).

    With ``world_size > 1`` (DDP) ``batch_size`` is the global batch: every rank walks the same
    permutation and takes its contiguous share of each global batch, so the ranks together see
    exactly the batches of a single-process run (empty shares of a short last batch are skipped).
    Iterated in the main process, so :meth:`set_epoch` reaches persistent workers too.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        full = self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)
        return max(0, full - self.start)

    def order(self) -> Tensor:
        """The epoch's permutation of ``range(n)`` (int64, CPU)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 1 << 40))
        return torch.randperm(self.n, generator=g)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """This rank's ``[lo, hi)`` range of :meth:`order` for each remaining batch."""
        for b in range(self.start, self.start + len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            r, w = self.rank, self.world_size
            lo, hi = lo + (hi - lo) * r // w, lo + (hi - lo) * (r + 1) // w
            if hi > lo:
                yield lo, hi

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order().tolist()
        for lo, hi in self.bounds():
            yield [(self.epoch, i) for i in order[lo:hi]]


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint and stops the
    # workers itself, so they must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool,
    drop_last: bool,
    workers: int = 0,
    collate_fn: Any = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over :class:`EpochBatchSampler` (reach it as ``loader.batch_sampler``);
    ``batch_size`` is global, each of ``world_size`` ranks loads its share (see the sampler).

    :class:`DeviceLoader` is the GPU-resident alternative for in-memory image data.
    """
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        # Workers' base seed comes from this generator, not the global RNG, whose state (dropout,
        # drop path) a checkpoint restores exactly.
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------------
# GPU-resident loading
# ----------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap, the low
    32 bits stay exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_ints(seed: int, epoch: int, index: Tensor, stream: int, high: int) -> Tensor:
    """Integers in ``[0, high)``, one per entry of ``index``, each a pure function of
    ``(seed, epoch, index, stream)``: the device loader's analogue of :func:`sample_seed`, computed
    on ``index``'s device without a generator, so any batching, rank or resume point draws the
    same value for a sample."""
    return _hash_uniform(index, _stream_key(seed, epoch, stream), high)


def _stream_key(seed: int, epoch: int, stream: int) -> int:
    return sample_seed(seed, epoch, (1 << 42) + stream)


def _hash_uniform(index: Tensor, key: Tensor | int, high: Tensor | int) -> Tensor:
    """:func:`uniform_ints` given the stream's key; ``key`` and ``high`` may be tensors that
    broadcast against ``index`` (several streams in one pass)."""
    h = _mix32(_mix32((index.long() * 0x9E3779B1 + key) & _M32) ^ (key >> 7))
    return (h * high) >> 32  # Lemire's multiply-shift: uniform up to a 2^-32 bias


def augment_batch(
    images: Tensor,
    *,
    crop_padding: int = 0,
    crop_xy: Tensor | None = None,
    flip: Tensor | None = None,
    randaugment: dict[str, Tensor] | None = None,
    cutout: int = 0,
    cutout_xy: Tensor | None = None,
) -> Tensor:
    """Crop, flip, RandAugment and cutout a batch with the CPU pipeline's semantics
    (:func:`build_transform`): zero padding by ``crop_padding`` then a crop at ``crop_xy``
    (B, 2) ``(x, y)`` in padded coordinates, a horizontal flip where ``flip`` (B,) is true (crop
    and flip are one gather), the RandAugment operations drawn in ``randaugment`` (see
    :func:`randaugment_params` and :func:`randaugment_batch`), then a zero ``cutout``-pixel square
    with top-left corner ``cutout_xy`` (B, 2) ``(x, y)``.

    ``images``: uint8 (B, H, W, 3), the dataset layout. Returns uint8 (B, 3, H, W).
    """
    b, h, w, _ = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)  # (B, H) source row of each output row
    cols = torch.arange(w, device=dev).expand(b, w)  # (B, W)
    if crop_padding > 0:
        if crop_xy is None:
            raise ValueError("crop_padding > 0 needs crop_xy, the (B, 2) crop offsets")
        rows = rows + (crop_xy[:, 1:] - crop_padding)
        cols = cols + (crop_xy[:, :1] - crop_padding)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Padding is never materialised: out-of-image sources are clamped, then zeroed by the mask.
    keep = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(b, device=dev)[:, None, None]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    out = rearrange(out * keep[..., None].to(out.dtype), "b h w c -> b c h w")
    if randaugment is not None:
        out = randaugment_batch(out, randaugment)
    if cutout > 0:
        if cutout_xy is None:
            raise ValueError("cutout > 0 needs cutout_xy, the (B, 2) corners of the squares")
        ry = torch.arange(h, device=dev) - cutout_xy[:, 1:]  # (B, H)
        rx = torch.arange(w, device=dev) - cutout_xy[:, :1]  # (B, W)
        hole = ((ry >= 0) & (ry < cutout))[:, :, None] & ((rx >= 0) & (rx < cutout))[:, None, :]
        out = out * ~hole[:, None]
    return out.contiguous()


# The uniform streams randaugment_params reads: one per operation to choose the operations, then
# one per parameter.
_RA_PARAMS = (
    *RANDAUGMENT_OPS[:8],  # rotate ... saturation: one number each, named as the operation
    "sharpen_alpha",
    "sharpen_lightness",
    "posterize_bits",
    "solarize_threshold",
)
_RA_STREAMS = len(RANDAUGMENT_OPS) + len(_RA_PARAMS)


def randaugment_params(u: Tensor, n: int, magnitude: float, img_size: int) -> dict[str, Tensor]:
    """The RandAugment draws of a batch from uniforms ``u`` in [0, 1), float (B, 25): which
    ``n`` of the :data:`RANDAUGMENT_OPS` each image gets (``"ops"``, bool (B, 13); ``n`` distinct,
    uniformly, as albumentations' ``SomeOf``) and every operation's parameter (B,), in
    albumentations' units and from the ranges of :func:`_randaugment_ops`: degrees for
    ``rotate``/``shear_*``, whole pixels for ``translate_*`` (its ``int(fraction * size)``),
    factors for ``brightness``/``contrast``/``saturation``, ``sharpen_alpha`` and
    ``sharpen_lightness``, ``posterize_bits`` kept (int64), ``solarize_threshold`` in [0, 1]."""
    if not 0 < n <= len(RANDAUGMENT_OPS):
        raise ValueError(f"n must be in [1, {len(RANDAUGMENT_OPS)}], got {n}")
    k = len(RANDAUGMENT_OPS)
    # The n smallest of k i.i.d. uniforms: a uniformly random n-subset.
    chosen = u[:, :k].argsort(dim=1)[:, :n]
    ops = torch.zeros(u.shape[0], k, dtype=torch.bool, device=u.device).scatter_(1, chosen, True)
    v = dict(zip(_RA_PARAMS, u[:, k:].unbind(1), strict=True))
    m = magnitude / 10.0
    bits_lo = max(1, round(8 - 4 * m))

    def between(lo: float, hi: float, x: Tensor) -> Tensor:  # python's random.uniform(lo, hi)
        return lo + (hi - lo) * x

    jitter = (max(0.0, 1 - 0.9 * m), 1 + 0.9 * m)
    return {
        "ops": ops,
        "rotate": between(-30 * m, 30 * m, v["rotate"]),
        **{a: between(-17 * m, 17 * m, v[a]) for a in ("shear_x", "shear_y")},
        **{
            a: (between(-0.3 * m, 0.3 * m, v[a]) * img_size).trunc()
            for a in ("translate_x", "translate_y")
        },
        **{a: between(*jitter, v[a]) for a in ("brightness", "contrast", "saturation")},
        "sharpen_alpha": between(0.0, 0.9 * m, v["sharpen_alpha"]),
        "sharpen_lightness": between(0.5, 1.0, v["sharpen_lightness"]),
        "posterize_bits": bits_lo + (v["posterize_bits"] * (9 - bits_lo)).long(),
        "solarize_threshold": between(1 - m, 1.0, v["solarize_threshold"]),
    }


def _warp(x: Tensor, lin: Tensor, shift: Tensor) -> Tensor:
    """cv2.warpAffine (bilinear, zero border) about the image centre, as albumentations' Affine:
    output pixel ``p`` samples the input at ``lin @ (p - c) + c - shift``; ``lin`` (B, 2, 2),
    ``shift`` (B, 2) in pixels. Elementwise, so TF32 matmuls cannot blur the coordinates."""
    _, _, h, w = x.shape
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    px = (torch.arange(w, device=x.device, dtype=x.dtype) - cx)[None, None, :]  # (1, 1, W)
    py = (torch.arange(h, device=x.device, dtype=x.dtype) - cy)[None, :, None]  # (1, H, 1)
    lin, shift = lin[..., None, None], shift[..., None, None]
    sx = lin[:, 0, 0] * px + lin[:, 0, 1] * py + (cx - shift[:, 0])  # (B, H, W)
    sy = lin[:, 1, 0] * px + lin[:, 1, 1] * py + (cy - shift[:, 1])
    grid = torch.stack([sx * (2 / (w - 1)) - 1, sy * (2 / (h - 1)) - 1], -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round()


def _gray(x: Tensor) -> Tensor:
    """OpenCV's RGB-to-gray of uint8 images (fixed point, 14 bits), on integral floats (B, H, W)."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 4899 + g * 9617 + b * 1868 + 8192) / 16384)


def _histogram_lut(x: Tensor, *, skip_top: bool) -> Tensor:
    """Per-channel histogram equalisation (cv2.equalizeHist, albumentations' Equalize); with
    ``skip_top`` albumentations' AutoContrast ("cdf"), whose histogram leaves out the value 255
    (cv2.calcHist's range [0, 255)) and which maps it to 255. A constant channel stays as is."""
    b, c, h, w = x.shape
    v = x.reshape(b * c, h * w).long()
    counted = (v < 255).to(x.dtype) if skip_top else torch.ones_like(v, dtype=x.dtype)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(1, v, counted)
    cum = hist.cumsum(1)
    lo = (hist > 0).to(torch.uint8).argmax(1, keepdim=True)  # the first value present
    base = cum.gather(1, lo)
    span = cum[:, -1:] - base  # 0 for a constant channel
    d = span.clamp(min=1)
    # In float32, in each library's order of operations, so that halves round alike (a python
    # number over a tensor would multiply by a rounded reciprocal).
    lut = ((cum - base) * 255 / d) if skip_top else (cum - base) * (torch.full_like(d, 255) / d)
    lut = lut.round()
    return torch.where(span > 0, lut.gather(1, v), v.to(x.dtype)).reshape(b, c, h, w)


def randaugment_batch(images: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The RandAugment operations of :func:`randaugment_params` on a batch, uint8 (B, 3, H, W):
    each image gets its chosen operations in :data:`RANDAUGMENT_OPS` order (albumentations'
    ``SomeOf`` applies them sorted), each with albumentations' arithmetic and uint8 rounding
    between operations. Every operation runs on the whole batch and is kept where chosen, so
    nothing waits on the device. The CPU pipeline gives the same pixels, up to an occasional
    1-level rounding difference (rotation, shear, contrast, saturation)."""
    x = images.float()
    b = x.shape[0]
    dev, f32 = x.device, x.dtype
    eye = torch.eye(2, device=dev).expand(b, 2, 2)
    no_shift = torch.zeros(b, 2, device=dev)

    def per_image(t: Tensor) -> Tensor:
        return t.to(f32)[:, None, None, None]

    def rotate() -> Tensor:
        r = torch.deg2rad(params["rotate"].to(f32))
        cos, sin = r.cos(), r.sin()
        return _warp(x, torch.stack([cos, -sin, sin, cos], 1).view(b, 2, 2), no_shift)

    def shear(axis: int) -> Tensor:
        lin = eye.clone()  # albumentations shears by minus the drawn angle; this inverts it
        lin[:, axis, 1 - axis] = torch.tan(torch.deg2rad(params[("shear_x", "shear_y")[axis]]))
        return _warp(x, lin, no_shift)

    def translate(axis: int) -> Tensor:
        shift = no_shift.clone()
        shift[:, axis] = params[("translate_x", "translate_y")[axis]].to(f32)
        return _warp(x, eye, shift)

    def contrast() -> Tensor:
        f = per_image(params["contrast"])
        return torch.floor(x * f + _gray(x).mean((1, 2))[:, None, None, None] * (1 - f))

    def saturation() -> Tensor:
        f = per_image(params["saturation"])
        return (x * f + _gray(x)[:, None] * (1 - f)).round()

    def sharpen() -> Tensor:
        # The kernel (1 - a) identity + a [[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]]
        # with cv2's default border (reflect-101); the 3x3 sums are exact, where a convolution
        # could run in TF32.
        a, light = per_image(params["sharpen_alpha"]), per_image(params["sharpen_lightness"])
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        ring = F.avg_pool2d(padded, 3, stride=1, divisor_override=1) - x
        return (x * (1 - a + a * (8 + light)) - a * ring).round()

    def posterize() -> Tensor:
        step = per_image(2 ** (8 - params["posterize_bits"]))
        return torch.floor(x / step) * step

    def solarize() -> Tensor:
        threshold = per_image(torch.ceil(params["solarize_threshold"].double() * 255))
        return torch.where(x >= threshold, 255 - x, x)

    apply = {
        "rotate": rotate,
        "shear_x": lambda: shear(0),
        "shear_y": lambda: shear(1),
        "translate_x": lambda: translate(0),
        "translate_y": lambda: translate(1),
        "brightness": lambda: torch.floor(x * per_image(params["brightness"])),
        "contrast": contrast,
        "saturation": saturation,
        "sharpen": sharpen,
        "posterize": posterize,
        "solarize": solarize,
        "equalize": lambda: _histogram_lut(x, skip_top=False),
        "autocontrast": lambda: _histogram_lut(x, skip_top=True),
    }
    chosen = params["ops"]
    for i, name in enumerate(RANDAUGMENT_OPS):
        x = torch.where(chosen[:, i, None, None, None], apply[name]().clamp(0, 255), x)
    return x.to(torch.uint8)


class DeviceLoader:
    """Batches of an in-memory :class:`ImageDataset`, held on ``device`` and augmented there.

    The uint8 images move to the device once; each batch is a gather plus :func:`augment_batch`
    (random crop after zero padding, horizontal flip with p=0.5, ``randaugment_ops`` operations of
    the RandAugment-style policy, cutout of one square fully inside the image — the same
    distributions as the albumentations pipeline of :func:`build_transform`), with no worker
    processes, which a CPU pipeline cannot match when feeding a small ViT on a GPU (the airbench
    approach).
    The order comes from :class:`EpochBatchSampler` (``loader.batch_sampler``, same permutation,
    resume point and DDP shares as :func:`make_loader`) and every random draw from
    :func:`uniform_ints` of ``(seed, epoch, index)``, so exact resume holds. Yields
    ``(uint8 (B, 3, H, W), int64 (B,))`` on ``device``; normalisation stays with the task.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        device: torch.device | str,
        seed: int = 0,
        shuffle: bool,
        drop_last: bool,
        crop_padding: int = 0,
        hflip: bool = False,
        randaugment_ops: int = 0,
        randaugment_magnitude: float = 9.0,
        cutout: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(
                f"DeviceLoader needs an in-memory ImageDataset, got {type(dataset).__name__}; "
                f"use make_loader for other datasets"
            )
        if cutout > dataset.img_size:
            raise ValueError(f"cutout {cutout} exceeds the image size {dataset.img_size}")
        if not 0 <= randaugment_ops <= len(RANDAUGMENT_OPS):
            raise ValueError(
                f"randaugment_ops must be in [0, {len(RANDAUGMENT_OPS)}], got {randaugment_ops}"
            )
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)  # uint8 (N, H, W, 3)
        self.labels = dataset.labels.to(self.device)
        self.seed, self.crop_padding, self.hflip, self.cutout = seed, crop_padding, hflip, cutout
        self.randaugment_ops, self.randaugment_magnitude = randaugment_ops, randaugment_magnitude
        self.batch_sampler = EpochBatchSampler(
            len(dataset),
            batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        self._augment = shuffle and (crop_padding > 0 or hflip or randaugment_ops > 0 or cutout > 0)
        # The streams of params(): crop x, crop y, flip, cutout x, cutout y, then RandAugment's;
        # each draws from [0, high). Offsets 0..2p as RandomCrop of the padded image;
        # CoarseDropout keeps the hole inside the image; RandAugment's are 24-bit uniforms.
        crop, hole = 2 * crop_padding + 1, dataset.img_size - cutout + 1
        highs = [crop, crop, 2, hole, hole] + [1 << 24] * (_RA_STREAMS if randaugment_ops else 0)
        self._highs = torch.tensor(highs, device=self.device)[:, None]
        self._keys: tuple[int, Tensor] | None = None  # (epoch, the streams' keys)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def params(self, epoch: int, index: Tensor) -> dict[str, Any]:
        """Augmentation parameters of samples ``index`` in ``epoch`` (see :func:`augment_batch`):
        every stream's :func:`uniform_ints` in one pass of a few kernels."""
        if self._keys is None or self._keys[0] != epoch:  # one small host-to-device copy an epoch
            keys = [[_stream_key(self.seed, epoch, stream)] for stream in range(len(self._highs))]
            self._keys = (epoch, torch.tensor(keys, device=self.device))
        draws = _hash_uniform(index[None], self._keys[1], self._highs)  # (streams, B)
        out: dict[str, Any] = {"crop_padding": self.crop_padding, "cutout": self.cutout}
        if self.crop_padding > 0:
            out["crop_xy"] = draws[0:2].T
        if self.hflip:
            out["flip"] = draws[2].bool()
        if self.randaugment_ops > 0:
            u = draws[5:].T.float() / (1 << 24)  # exact: 24-bit integers
            out["randaugment"] = randaugment_params(
                u, self.randaugment_ops, self.randaugment_magnitude, self.images.shape[1]
            )
        if self.cutout > 0:
            out["cutout_xy"] = draws[3:5].T
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = self.batch_sampler
        epoch = sampler.epoch
        order = sampler.order().to(self.device, non_blocking=True)
        for lo, hi in sampler.bounds():
            index = order[lo:hi]
            x = self.images[index]  # (B, H, W, 3)
            if self._augment:
                x = augment_batch(x, **self.params(epoch, index))
            else:
                x = rearrange(x, "b h w c -> b c h w").contiguous()
            yield x, self.labels[index]
