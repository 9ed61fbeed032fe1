"""The one path from an image file to model input: decode, resize/crop, normalise.

Training (image folders, caption datasets), ``vit.evaluate``, ``vit.predict``, ``vit.rollout`` and
``vit.caption`` all read files through :func:`decode_image` and a :class:`Preprocess`, and a
checkpoint records its :class:`Preprocess` (``task_state["preprocess"]``), so inference feeds a
model exactly what it was trained on.

Decoding handles, in one place: the image mode (palette, grey, alpha and CMYK images become RGB;
16-bit images are scaled to 8 bits, not clipped), the EXIF orientation, and a size limit
(:data:`MAX_IMAGE_PIXELS`) checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from vit.errors import ConfigError, DataError
from vit.fileio import is_regular_file

__all__ = [
    "IMG_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_IMG_SIZE",
    "Preprocess",
    "decode_image",
    "display_path",
    "image_paths",
    "is_image_name",
    "list_images",
    "resize_image",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# The largest image decoded: 64 megapixels (8000 x 8000) is 192 MB as 8-bit RGB. Larger files are
# refused from their header, so a decompression bomb (a small file declaring a huge canvas) never
# allocates its canvas.
MAX_IMAGE_PIXELS = 64_000_000
# The largest model input side a Preprocess (and a stored model spec) may ask for.
MAX_IMG_SIZE = 8192
_RESIZES = ("center_crop", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (Latin-1 names from old archives)
    appear as ``\\xNN`` escapes instead of failing to print."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def decode_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode an image file as an 8-bit RGB ``PIL.Image``, upright (EXIF orientation applied).

    Grey, palette, alpha and CMYK images are converted to RGB (alpha is dropped); 16-bit and 32-bit
    integer images are scaled to 8 bits over the full range of their bit depth (PIL's own
    conversion would clip them to white).

    Raises:
        DataError: the file is missing, not an image, truncated, of an unsupported mode (floating
            point), or larger than ``max_pixels`` (checked before decoding).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    shown = display_path(path)
    if os.path.exists(path) and not is_regular_file(path):
        # A FIFO or device named *.png would block the reader forever.
        raise DataError(
            f"{shown} is not a regular file (a folder, FIFO or device); pass image files"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns (or raises) about large images while opening; the limit below answers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(
                    f"image {shown} is {w}x{h} ({w * h / 1e6:.0f} megapixels), over the limit of "
                    f"{max_pixels / 1e6:.0f}; downscale it first"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            upright = ImageOps.exif_transpose(im)
            return _to_rgb8(upright, shown)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image not found: {shown}") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"image {shown} declares a canvas over {max_pixels / 1e6:.0f} megapixels; downscale it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # PIL raises OSError for truncated files, SyntaxError for some malformed headers.
        detail = f"{type(e).__name__}: {str(e)[:120]}"
        raise DataError(
            f"cannot read image {shown}: {os.path.basename(shown)} is not a readable image "
            f"({detail}); delete or replace the file"
        ) from None


def _to_rgb8(im: Any, shown: str) -> Any:
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (and PIL's 32-bit container for it): full scale 65535 maps to 255.
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        raise ValueError(f"floating-point images (mode F) are not supported: {shown}")
    return im.convert("RGB")


def resize_image(
    im: Any,
    size: int,
    *,
    resize: Literal["center_crop", "squash"] = "center_crop",
    interpolation: Literal["bicubic", "bilinear"] = "bicubic",
) -> np.ndarray:
    """An RGB ``PIL.Image`` → uint8 array (size, size, 3).

    ``center_crop``: the shorter side to ``size``, then the centre square (the aspect ratio is
    kept; timm's and torchvision's evaluation transform). ``squash``: the whole image to a square.
    """
    from PIL import Image

    method = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    if im.size != (size, size):
        if resize == "squash":
            im = im.resize((size, size), method[interpolation])
        else:
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), method[interpolation])
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def is_image_name(name: str) -> bool:
    """Whether a file name is an image's: one of :data:`IMG_EXTENSIONS`, not hidden (``.name``,
    e.g. macOS's ``._photo.jpg`` resource forks). Training and prediction use the same rule."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMG_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Image files below ``root`` (recursively, sorted; :func:`is_image_name`), skipping hidden
    folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in filenames
            if is_image_name(f) and is_regular_file(Path(dirpath) / f)  # no FIFOs, devices
        ]
    return sorted(found)


def image_paths(args: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The images that command-line arguments name, in the order given: a file as it is (kept
    whatever its extension; a file that is not an image is reported when it is read), a folder
    as the images below it (:func:`list_images`: recursive, by extension, hidden files and
    folders skipped). ``vit.predict``, ``vit.rollout`` and ``vit.caption`` all read their
    image arguments through this.

    Raises:
        DataError: a path that does not exist (all of them in one line), or no image at all.
    """
    missing = [display_path(p) for p in args if not os.path.exists(p)]
    if missing:  # all of them in one line, before any work
        raise DataError(f"no such file or folder: {', '.join(missing)}")
    files: list[Path] = []
    for p in map(Path, args):
        files += list_images(p) if p.is_dir() else [p]
    if not files:
        shown = ", ".join(display_path(p) for p in args)
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {shown}")
    return files


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is made from a file: decode, resize/crop to ``img_size``, normalise
    with ``mean``/``std`` (per channel, on [0, 1] pixels). Recorded in checkpoints
    (:meth:`to_dict`) so inference repeats training's preprocessing."""

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: Literal["center_crop", "squash"] = "center_crop"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        # Every number may come from a file (a checkpoint, an export's config.json): each is
        # checked here, where a Preprocess is made, so a NaN or an absurd size never reaches a
        # model's input.
        size = self.img_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMG_SIZE:
            raise ConfigError(
                f"preprocess img_size must be an integer in [1, {MAX_IMG_SIZE}], got {size!r}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            ok = isinstance(values, list | tuple) and len(values) == 3
            if ok:
                ok = all(_is_number(v) and math.isfinite(v) for v in values)
            if not ok or (name == "std" and min(values) < 0):
                rule = "3 non-negative finite numbers" if name == "std" else "3 finite numbers"
                raise ConfigError(
                    f"preprocess {name} must be {rule} (one per RGB channel), got {values!r}"
                )
        if self.resize not in _RESIZES:
            raise ConfigError(
                f"preprocess resize must be one of {', '.join(_RESIZES)}, got {self.resize!r}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation must be one of {', '.join(_INTERPOLATIONS)}, got "
                f"{self.interpolation!r}"
            )
        # A constant channel (std 0, e.g. two-colour images) would turn every input into NaN:
        # the std is at least one grey level.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(max(float(v), 1 / 255) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (``weights_only``-safe)."""
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        """The :class:`Preprocess` of a :meth:`to_dict` record, checked entry by entry.

        Raises:
            ConfigError: not a mapping, a missing or unknown entry, or a value out of range.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a preprocess record must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        missing = sorted({"img_size", "mean", "std"} - set(d))
        if unknown or missing:
            what = [f"unknown entries {unknown}"] if unknown else []
            what += [f"missing entries {missing}"] if missing else []
            raise ConfigError(f"preprocess record has {' and '.join(what)}")
        return cls(
            img_size=d["img_size"],
            mean=d["mean"],
            std=d["std"],
            resize=d.get("resize", "center_crop"),
            interpolation=d.get("interpolation", "bicubic"),
        )

    def load(self, path: str | os.PathLike[str], size: int | None = None) -> Tensor:
        """Decode and resize/crop one file: uint8 (3, S, S), S = ``size`` or ``img_size``.

        Raises:
            DataError: as :func:`decode_image`.
        """
        return self.resize_image(decode_image(path), size)

    def resize_image(self, im: Any, size: int | None = None) -> Tensor:
        """Resize/crop a decoded RGB ``PIL.Image`` (:func:`decode_image`): uint8 (3, S, S)."""
        arr = resize_image(
            im, size or self.img_size, resize=self.resize, interpolation=self.interpolation
        )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def timm_data_config(self) -> dict[str, Any]:
        """These settings as timm's ``pretrained_cfg`` keys (read by
        ``timm.data.resolve_data_config``). With crop_pct 1.0, timm's centre crop is ours: the
        shorter side to the size, then the centre square."""
        return {
            "input_size": (3, self.img_size, self.img_size),
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "crop_pct": 1.0,
            "crop_mode": "squash" if self.resize == "squash" else "center",
        }

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images (..., 3, H, W) → float32, normalised, on the images' device."""
        mean, std = _stats(self.mean, self.std, images.device)
        return (images.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    # Made once per device, not at every training step (a host-to-device copy each).
    stats = torch.tensor([mean, std], device=device)
    return stats[0].view(3, 1, 1), stats[1].view(3, 1, 1)
