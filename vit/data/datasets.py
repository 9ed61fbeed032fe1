"""Image classification datasets: CIFAR-10, image folders and a generated synthetic set.

Every dataset holds its images decoded once as a uint8 tensor (N, H, W, 3) and returns
``(uint8 (3, H, W), label)``; normalisation happens on the training device, so a GPU-resident loader
can replace :func:`~vit.data.make_loader` without touching the datasets. Image files are read
through :mod:`vit.preprocess`, the one decoder every path uses.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from vit.data.transforms import A, reseed, sample_seed
from vit.errors import DataError, OutputError
from vit.fileio import atomic_write
from vit.preprocess import IMG_EXTENSIONS, Preprocess, display_path, is_image_name

__all__ = [
    "SYNTHETIC_CLASSES",
    "ImageDataset",
    "cifar10",
    "image_folder",
    "list_image_folder",
    "split_indices",
    "synthetic",
]


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
        created = [p for p in (root, *root.parents) if not p.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = CIFAR10(root, train=train, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            for folder in created:  # no empty data folder left behind by a failed download
                try:
                    folder.rmdir()
                except OSError:
                    break
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


def _is_image(p: Path) -> bool:
    return is_image_name(p.name) and p.is_file()


def list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """``root/<class>/<image>``: the image files, their labels and the class names, sorted
    (hidden files and folders skipped).

    Raises:
        DataError: a missing or unreadable folder, no class folders, an empty class.
    """
    shown = display_path(root)
    if not root.is_dir():
        raise DataError(f"{shown} is not a directory")
    try:
        classes = sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
    except OSError as e:
        raise DataError(f"cannot list {shown}: {e.strerror}") from None
    if not classes:
        raise DataError(
            f"{shown} has no class folders; the image-folder layout is {shown}/<class>/<image>.jpg"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        try:
            found = sorted(p for p in (root / name).iterdir() if _is_image(p))
        except OSError as e:
            raise DataError(
                f"cannot read class folder {display_path(root / name)}: {e.strerror}; fix its "
                f"permissions or remove it"
            ) from None
        if not found:
            raise DataError(
                f"class folder {display_path(root / name)} has no images "
                f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def image_folder(
    root: str | Path, *, img_size: int, cache_dir: str | Path | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode ``root/<class>/*`` once into uint8 (N, img_size, img_size, 3) and cache it.

    Every image is decoded up front through :class:`~vit.preprocess.Preprocess` (the shorter side
    resized to ``img_size``, bicubic, then the centre crop), so an unreadable file is reported
    before training starts. Hidden files and folders (``.name``) are skipped. The cache is
    ``<cache_dir>/imagefolder-<hash>.npz`` (``cache_dir`` defaults to ``$XDG_CACHE_HOME/vit`` or
    ``~/.cache/vit``); the hash covers the folder, every file's name, size and modification time,
    and ``img_size``, so a changed folder is decoded again; a cache file that is corrupt or does
    not match the folder is rebuilt.

    Raises:
        DataError: a missing or unreadable folder, an empty class, an unreadable image.
    """
    root = Path(root)
    files, labels, classes = list_image_folder(root)
    # Names are hashed as bytes: file names need not be valid UTF-8.
    key = hashlib.sha1(os.fsencode(root.resolve()) + f"|{img_size}".encode())
    for p in files:
        st = p.stat()
        key.update(os.fsencode(p.relative_to(root)) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    path = cache / f"imagefolder-{key.hexdigest()[:20]}.npz"
    label_array = np.asarray(labels, dtype=np.int64)
    cached = _read_cache(path, (len(files), img_size, img_size, 3), label_array)
    if cached is not None:
        return torch.from_numpy(cached), torch.from_numpy(label_array), classes
    preprocess = Preprocess(img_size)
    shown = display_path(root)
    if not sys.stderr.isatty():  # a log gets one line instead of the bar
        print(f"decoding {len(files):,} images of {shown} (cached for next time)", file=sys.stderr)
    bar = tqdm(
        total=len(files), desc=f"decoding {shown}", unit="img", file=sys.stderr, disable=None,
        delay=0.5, leave=False,
    )  # fmt: skip
    with bar, ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        decoded = []
        for t in pool.map(preprocess.load, files):
            decoded.append(t.permute(1, 2, 0).numpy())
            bar.update()
        images = np.stack(decoded)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:  # exclusive temporary file, then a rename
            np.savez(f, images=images, labels=label_array)
    except (OSError, OutputError):
        pass  # a read-only or full cache only costs the decoding time again
    return torch.from_numpy(images), torch.from_numpy(label_array), classes


def _read_cache(path: Path, shape: tuple[int, ...], labels: np.ndarray) -> np.ndarray | None:
    """The cached images, or ``None`` (and the file removed) when the cache is missing, corrupt,
    or holds another shape or other labels than the folder: it is then decoded again."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, cached_labels = z["images"], z["labels"]
        if (
            images.dtype == np.uint8
            and images.shape == shape
            and np.array_equal(cached_labels, labels)
        ):
            return images
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    path.unlink(missing_ok=True)
    return None


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
