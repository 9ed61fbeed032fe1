"""Caption datasets: generated ``shapes`` scenes, Flickr8k, COCO; the dataset the engine trains on.

Image files are read through :mod:`vit.preprocess` (the one decoder every path uses): the whole
image is resized to a square (``squash``: a caption describes the whole picture, which a centre
crop could cut), bicubic, normalised to [-1, 1] (:data:`CAPTION_PREPROCESS`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vit.captions.tokenizer import Tokenizer
from vit.errors import DataError
from vit.preprocess import Preprocess, display_path

# The public names are listed once, in vit.captions.__all__.

log = logging.getLogger("vit.captions")

CAPTION_DATASETS = ("shapes", "flickr8k", "coco")


def caption_preprocess(img_size: int) -> Preprocess:
    """The captioner's input: the whole image squashed to ``img_size``, bicubic, pixels scaled to
    [0, 1] and normalised to [-1, 1] — one convention for every caption dataset."""
    return Preprocess(img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")


def normalize(img: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) → float normalised to [-1, 1], the captioner's convention."""
    return caption_preprocess(img.shape[-1]).normalize(img)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
@dataclass
class CaptionData:
    """Images and their reference captions for one split.

    ``images`` is a uint8 tensor (N, 3, H, W) (generated data) or a list of N image paths;
    ``captions[i]`` lists image i's reference captions.
    """

    images: Tensor | list[Path]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)


class CaptionDataset(Dataset):
    """Items ``(image, tokens, image_index)``: a uint8 image (3, S, S) (normalise it with
    :func:`normalize`), ``max_len`` token ids padded with ``<pad>``, and the image's index in
    :attr:`references`.

    ``pairs=True`` (training) yields one item per (image, caption) pair; ``pairs=False``
    (validation) one item per image with its first caption, and :attr:`references` holds every
    caption of each image for BLEU. Captions longer than ``max_len`` are truncated and unknown
    words become ``<unk>``; both are counted in :attr:`stats` and reported once.

    Augmentation runs for ``(epoch, index)`` keys (the training engine's) and is a pure function
    of ``(seed, epoch, index)``: a random crop after zero padding by ``crop_padding`` pixels, and
    with ``hflip`` a horizontal flip half the time that also swaps the words "left" and "right"
    in the caption, so the caption stays true.
    """

    def __init__(
        self,
        data: CaptionData,
        tokenizer: Tokenizer,
        *,
        max_len: int,
        img_size: int,
        pairs: bool = True,
        name: str = "captions",
        crop_padding: int = 0,
        hflip: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (<bos>, a word, <eos>), got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.img_size = img_size
        self.crop_padding, self.hflip, self.seed = crop_padding, hflip, seed
        self.preprocess = caption_preprocess(img_size)
        # Decoded image files: the read-only map of the cache (N, S, S, 3), and each image's row.
        self._mapped: np.ndarray | None = None
        self._rows: list[int] = []
        if not isinstance(data.images, Tensor):
            data = self._decode_files(data, name, cache_dir)
        self.data = data
        self._mirror = {
            tokenizer.stoi[a]: tokenizer.stoi[b]
            for a, b in (("left", "right"), ("right", "left"))
            if a in tokenizer.stoi and b in tokenizer.stoi
        }
        self.references = [[" ".join(Tokenizer.split(c)) for c in caps] for caps in data.captions]
        self.index = [
            (i, j) for i, caps in enumerate(data.captions) for j in range(len(caps) if pairs else 1)
        ]
        self.tokens = torch.full((len(self.index), max_len), tokenizer.pad_id, dtype=torch.long)
        truncated = unknown_captions = unknown_words = 0
        for row, (i, j) in enumerate(self.index):
            ids, unk, cut = tokenizer.encode(data.captions[i][j], max_len)
            self.tokens[row, : len(ids)] = torch.tensor(ids)
            truncated += cut
            unknown_captions += unk > 0
            unknown_words += unk
        self.stats = {
            "images": len(data),
            "captions": len(self.index),
            "truncated": truncated,
            "unknown_words": unknown_words,
        }
        if truncated:
            log.warning(
                "%s: %d of %d captions are longer than max_len=%d tokens (with <bos>/<eos>) and "
                "were truncated; raise max_len (training: --task-args '{max_len: N}') to keep them",
                name,
                truncated,
                len(self.index),
                max_len,
            )
        if unknown_words:
            log.warning(
                "%s: %d words in %d captions are not in the vocabulary and map to <unk>",
                name,
                unknown_words,
                unknown_captions,
            )

    def __len__(self) -> int:
        return len(self.index)

    def _decode_files(
        self, data: CaptionData, name: str, cache_dir: str | os.PathLike | None
    ) -> CaptionData:
        """Decode every image file up front into the shared decoded-image cache
        (:mod:`vit.data.cache`: once per machine, mapped read-only by every process), as
        classification does: an unreadable one (corrupt, truncated, too large) is counted,
        reported and skipped with its captions, like a missing one, instead of stopping training
        mid-epoch. The cache key covers every file's path, size and modification time and the
        preprocessing."""
        import hashlib
        import json

        from vit.data.cache import decode_files, decoded_cache

        files = list(data.images)
        key = hashlib.sha1(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
        for p in files:
            st = Path(p).stat()
            key.update(
                os.fsencode(Path(p).resolve()) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode()
            )

        def fill(out: np.ndarray) -> dict:
            bad: list[tuple[int, str]] = []
            decode_files(
                files,
                out,
                self.preprocess,
                what=name,
                on_error=lambda i, e: bad.append((i, str(e))),
            )
            return {"unreadable": sorted(bad)}

        s = self.img_size
        self._mapped, meta = decoded_cache(
            cache_dir,
            f"captions-{key.hexdigest()[:20]}",
            (len(files), s, s, 3),
            fill,
            what=f"the {name} images",
        )
        bad = {i: message for i, message in meta["unreadable"]}
        if bad:
            log.warning(
                "%s: %d of %d images cannot be read and are skipped with their captions (e.g. %s)",
                name,
                len(bad),
                len(files),
                next(iter(bad.values())),
            )
        keep = [i for i in range(len(files)) if i not in bad]
        if not keep:
            raise DataError(
                f"{name}: none of the {len(files)} images can be read ({next(iter(bad.values()))})"
            )
        self._rows = keep
        return CaptionData([files[i] for i in keep], [data.captions[i] for i in keep])

    def image(self, i: int) -> Tensor:
        """Image ``i`` (of the underlying data) as uint8 (3, S, S)."""
        if self._mapped is not None:  # a new, writable tensor: the map is read-only
            return torch.from_numpy(np.array(self._mapped[self._rows[i]].transpose(2, 0, 1)))
        images = self.data.images
        assert isinstance(images, Tensor)  # files were decoded into the map above
        img = images[i]
        if img.shape[-1] != self.img_size or img.shape[-2] != self.img_size:
            img = (
                torch.nn.functional.interpolate(
                    img[None].float(),
                    size=(self.img_size, self.img_size),
                    mode="bilinear",
                    antialias=True,
                )[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return img

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        epoch, row = key if isinstance(key, tuple) else (None, key)
        i, _ = self.index[row]
        img, tokens = self.image(i), self.tokens[row]
        if epoch is not None and (self.crop_padding > 0 or self.hflip):
            from vit.data import sample_seed

            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, row))
            img, tokens = self._augment(img, tokens, g)
        return img, tokens, i

    def _augment(self, img: Tensor, tokens: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        p = self.crop_padding
        if p > 0:
            dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
            padded = torch.nn.functional.pad(img, (p, p, p, p))
            img = padded[:, dy : dy + self.img_size, dx : dx + self.img_size]
        if self.hflip and torch.rand((), generator=g) < 0.5:
            img = img.flip(-1)
            masks = {a: tokens == a for a in self._mirror}  # before any swap: left↔right
            tokens = tokens.clone()
            for a, b in self._mirror.items():
                tokens[masks[a]] = b
        return img, tokens


SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SIZES = {"small": 0.22, "large": 0.42}  # radius as a fraction of a grid cell's side


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """Where grid cell ``a`` (row, col) lies relative to cell ``b``."""
    vertical = {-1: "above", 0: "", 1: "below"}[int(np.sign(a[0] - b[0]))]
    horizontal = {-1: "to the left of", 0: "", 1: "to the right of"}[int(np.sign(a[1] - b[1]))]
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float):
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    # an upward triangle: apex at the top, base at the bottom
    return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.5)


def make_shapes(n: int, *, img_size: int = 32, seed: int = 0) -> CaptionData:
    """``n`` generated scenes with one caption each (see the module docstring).

    Each scene puts 1–3 shapes (circle / square / triangle; red / green / blue / yellow; small /
    large) in distinct cells of a 2x2 grid, jittered inside the cell. The caption reads the shapes
    in reading order: one shape is placed absolutely ("... in the top left"); a second is related
    to it ("A to the left of B"); a third to the second ("... and C below it"). Same ``seed``,
    same scenes.
    """
    if n <= 0:
        raise ValueError(f"the number of scenes must be positive, got {n}")
    if img_size < 16:
        raise ValueError(f"shapes scenes need img_size >= 16 to draw a 2x2 grid, got {img_size}")
    rng = np.random.default_rng(seed)
    cell = img_size / 2
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32) + 0.5
    images = np.zeros((n, img_size, img_size, 3), dtype=np.uint8)
    captions = []
    color_names = list(COLORS)
    for i in range(n):
        count = int(rng.integers(1, 4))
        cells = sorted(rng.choice(4, size=count, replace=False).tolist())  # reading order
        phrases, where = [], []
        canvas = np.full((img_size, img_size, 3), 12, dtype=np.int16)
        for c in cells:
            row, col = divmod(c, 2)
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            color = color_names[int(rng.integers(len(color_names)))]
            size = "large" if rng.random() < 0.5 else "small"
            r = SIZES[size] * cell
            slack = max(cell / 2 - r - 0.5, 0.0)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            rgb = np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, size=3), 0, 255)
            canvas[_shape_mask(kind, yy, xx, cy, cx, r)] = rgb
            phrases.append(f"a {size} {color} {kind}")
            where.append((row, col))
        if count == 1:
            vertical = "top" if where[0][0] == 0 else "bottom"
            horizontal = "left" if where[0][1] == 0 else "right"
            caption = f"{phrases[0]} in the {vertical} {horizontal}"
        else:
            caption = f"{phrases[0]} {_relation(where[0], where[1])} {phrases[1]}"
            if count == 3:
                caption += f" and {phrases[2]} {_relation(where[2], where[1])} it"
        images[i] = canvas.astype(np.uint8)
        captions.append([caption])
    return CaptionData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions)


# -- flickr8k ----------------------------------------------------------------------------------
_FLICKR_IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images")
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def read_flickr8k_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """Parse ``captions.txt`` (CSV ``image,caption`` with a header) or ``Flickr8k.token.txt``
    (``image.jpg#N<TAB>caption``) into ``{image name: [captions]}``, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        raise ValueError(
            f"captions file {display_path(path)} is not UTF-8 text (byte {e.start}); re-save it as "
            f"UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"captions file {path} is empty: it needs one 'image,caption' per line")
    out: dict[str, list[str]] = {}
    empty = 0
    lines = text.splitlines()
    if "\t" in lines[0]:  # the original Flickr8k.token.txt
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise ValueError(
                    f"{path}:{n}: expected 'image.jpg#N<TAB>caption' (Flickr8k.token.txt), got "
                    f"{line[:80]!r}"
                )
            key, caption = line.split("\t", 1)
            rows.append((key.rsplit("#", 1)[0], caption))
    else:  # captions.txt: CSV; unquoted captions may hold commas, so rejoin the extra fields
        reader = csv.reader(lines)
        header = next(reader)
        if [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise ValueError(
                f"{path}: expected a CSV header 'image,caption' (captions.txt) or tab-separated "
                f"'image.jpg#N<TAB>caption' lines (Flickr8k.token.txt), got {lines[0][:80]!r}"
            )
        rows = [(r[0], ",".join(r[1:])) for r in reader if r]
    for image, caption in rows:
        if not caption.strip():
            empty += 1
            continue
        out.setdefault(image.strip(), []).append(caption.strip())
    if empty:
        log.warning("%s: skipped %d empty captions", path, empty)
    if not out:
        raise ValueError(f"captions file {path} has no captions")
    return out


def load_flickr8k(root: str | os.PathLike, split: str, *, val_fraction: float = 0.1) -> CaptionData:
    """The Flickr8k ``split`` (train | val | test) from ``root`` (layout in the module docstring).

    The original split files (``Flickr_8k.{train,dev,test}Images.txt``) are used when present;
    otherwise a deterministic ``val_fraction`` of the images (by name) is held out as val and test.
    Images named by the captions but missing on disk are counted, reported and skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"flickr8k directory {root} not found; pass --data-dir with captions.txt (or "
            f"Flickr8k.token.txt) and an Images/ folder"
        )
    for name in ("captions.txt", "Flickr8k.token.txt"):
        if (root / name).is_file():
            captions = read_flickr8k_captions(root / name)
            break
    else:
        raise FileNotFoundError(
            f"no captions file in {root}: expected captions.txt (CSV 'image,caption') or "
            f"Flickr8k.token.txt ('image.jpg#N<TAB>caption')"
        )
    image_dir = next((root / d for d in _FLICKR_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(
            f"no images folder in {root}: expected one of {', '.join(_FLICKR_IMAGE_DIRS)}"
        )
    names = list(captions)
    if (root / _FLICKR_SPLIT_FILES[split]).is_file():
        wanted = set((root / _FLICKR_SPLIT_FILES[split]).read_text().split())
        names = [n for n in names if n in wanted]
    else:
        held = {n for n in names if _stable_fraction(n) < val_fraction}
        names = [n for n in names if (n in held) == (split != "train")]
    names = _inside(image_dir, names, f"flickr8k {split}")
    present = [n for n in names if (image_dir / n).is_file()]
    missing = len(names) - len(present)
    if missing:
        example = next(n for n in names if not (image_dir / n).is_file())
        log.warning(
            "flickr8k %s: %d of %d images named in the captions file are missing from %s "
            "(e.g. %s); skipping them and their captions",
            split,
            missing,
            len(names),
            image_dir,
            example,
        )
    if not present:
        raise ValueError(f"flickr8k {split}: none of the captioned images are in {image_dir}")
    return CaptionData([image_dir / n for n in present], [captions[n] for n in present])


def _inside(folder: Path, names: list[str], what: str) -> list[str]:
    """``names`` that stay inside ``folder``. An annotation file is data, not a list of paths on
    the disk: names that leave the folder (absolute, or through "..") are refused, counted and
    reported."""
    root = folder.resolve()
    escaping = {n for n in names if not (folder / n).resolve().is_relative_to(root)}
    if escaping:
        log.warning(
            "%s: refused %d image names that point outside %s (e.g. %r)",
            what,
            len(escaping),
            folder,
            sorted(escaping)[0],
        )
    return [n for n in names if n not in escaping]


def _stable_fraction(name: str) -> float:
    """A number in [0, 1) fixed by the name (not by Python's per-process hash seed)."""
    import zlib

    return zlib.crc32(name.encode()) / 2**32


# -- coco --------------------------------------------------------------------------------------
def load_coco(root: str | os.PathLike, split: str) -> CaptionData:
    """COCO captions 2017 (``val`` and ``test`` both read val2017) through torchvision's
    ``CocoCaptions``; missing images are counted, reported and skipped."""
    root = Path(root)
    year_split = "train2017" if split == "train" else "val2017"
    ann = root / "annotations" / f"captions_{year_split}.json"
    if not ann.is_file():
        raise FileNotFoundError(
            f"COCO annotations {ann} not found; pass --data-dir with annotations/"
            f"captions_{year_split}.json and {year_split}/ (from https://cocodataset.org)"
        )
    try:
        from torchvision.datasets import CocoCaptions

        coco = CocoCaptions(str(root / year_split), str(ann))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"--data coco needs pycocotools: pip install pycocotools ({e})"
        ) from None
    paths, captions, missing = [], [], 0
    names = {i: coco.coco.loadImgs(i)[0]["file_name"] for i in coco.ids}
    allowed = set(_inside(root / year_split, list(names.values()), f"coco {split}"))
    for image_id in coco.ids:
        if names[image_id] not in allowed:
            continue
        path = root / year_split / names[image_id]
        if not path.is_file():
            missing += 1
            continue
        caps = [c for c in coco._load_target(image_id) if c.strip()]
        if caps:
            paths.append(path)
            captions.append(caps)
    if missing:
        log.warning(
            "coco %s: %d of %d images are missing from %s; skipping them",
            split,
            missing,
            len(coco.ids),
            root / year_split,
        )
    if not paths:
        raise ValueError(f"coco {split}: no captioned images found in {root / year_split}")
    return CaptionData(paths, captions)


def load_caption_data(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    img_size: int = 32,
    seed: int = 0,
    num_scenes: int | None = None,
) -> CaptionData:
    """One split (train | val | test) of a caption dataset by name (:data:`CAPTION_DATASETS`).

    ``shapes`` ignores ``data_dir``; its train scenes use ``seed`` and its val/test scenes other
    seeds, so the evaluated scenes are held out. ``num_scenes`` defaults to 20,000 (train) and
    1,000 (val/test).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if name == "shapes":
        default = 20_000 if split == "train" else 1_000
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[split]
        return make_shapes(num_scenes or default, img_size=img_size, seed=seed + offset)
    if name in ("flickr8k", "coco"):
        if data_dir is None:
            raise ValueError(
                f"--data {name} needs --data-dir (see the README's captioning section)"
            )
        return load_flickr8k(data_dir, split) if name == "flickr8k" else load_coco(data_dir, split)
    raise ValueError(
        f"unknown caption dataset {name!r}; choose one of {', '.join(CAPTION_DATASETS)}"
    )
