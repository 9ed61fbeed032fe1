"""Image captioning data and evaluation: a word-level tokenizer, caption datasets and BLEU.

Datasets (``load_caption_data(name, ...)``):

* ``shapes`` — generated offline: scenes of one to three coloured shapes on a 2x2 grid with
  captions that need both *what* and *where* ("a small red circle to the left of a large blue
  square"). Deterministic given a seed; the validation scenes come from another seed (held out).
* ``flickr8k`` — ``DIR/captions.txt`` (CSV ``image,caption``) or the original
  ``DIR/Flickr8k.token.txt`` (``img.jpg#0<TAB>caption``), with the images in ``DIR/Images``,
  ``DIR/Flicker8k_Dataset`` or ``DIR/images``.
* ``coco`` — ``DIR/{train,val}2017`` and ``DIR/annotations/captions_{train,val}2017.json`` through
  ``torchvision.datasets.CocoCaptions`` (needs ``pycocotools``).

BLEU-1..4 are corpus BLEU (Papineni et al. 2002) from sacrebleu, with every reference caption of
an image, on the tokenizer's normalised text (lower case, punctuation split off); CIDEr-D
(Vedantam et al. 2015) is computed as the COCO caption evaluation code does, without Java.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vit.train import ConfigError, RunConfig, Task

__all__ = [
    "CAPTION_DATASETS",
    "CAPTION_TASK_ARGS",
    "CaptionData",
    "CaptionDataset",
    "CaptionTask",
    "Tokenizer",
    "attention_strip",
    "bleu_scores",
    "cider_d",
    "cross_attention_maps",
    "load_caption_data",
    "make_shapes",
]

log = logging.getLogger(__name__)

CAPTION_DATASETS = ("shapes", "flickr8k", "coco")
# Images are scaled to [0, 1] then normalised to [-1, 1]: one convention for every caption dataset.
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class Tokenizer:
    """Word-level tokenizer: lower case, words and single punctuation marks as tokens.

    Ids 0..3 are ``<pad> <bos> <eos> <unk>``; the vocabulary is built from training captions
    (:meth:`build`) and saved as JSON next to checkpoints (:meth:`save` / :meth:`load`).
    """

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __init__(self, words: Iterable[str]) -> None:
        words = [w for w in words if w not in self.SPECIALS]
        if len(set(words)) != len(words):
            raise ValueError("tokenizer vocabulary has duplicate words")
        self.itos: list[str] = [*self.SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos

    @staticmethod
    def split(text: str) -> list[str]:
        """Normalise and split a caption: ``"A dog, running."`` → ``["a", "dog", ",", ...]``."""
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first."""
        counts = Counter(w for c in captions for w in cls.split(c))
        if not counts:
            raise ValueError("cannot build a tokenizer from no words: the captions are empty")
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: -counts[w])
        return cls(words)

    def encode(self, text: str, max_len: int | None = None) -> tuple[list[int], int, bool]:
        """``<bos> words <eos>`` ids, at most ``max_len`` of them.

        Returns ``(ids, unknown_count, truncated)``: unknown words become ``<unk>``; a caption too
        long keeps its first ``max_len - 2`` words and still ends with ``<eos>``.
        """
        words = self.split(text)
        truncated = max_len is not None and len(words) > max_len - 2
        if truncated:
            words = words[: max_len - 2]
        ids = [self.stoi.get(w, self.unk_id) for w in words]
        unknown = sum(i == self.unk_id for i in ids)
        return [self.bos_id, *ids, self.eos_id], unknown, truncated

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text, stopping at ``<eos>`` and skipping ``<bos>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        try:
            data = json.loads(Path(path).read_text())
            itos = data["itos"]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tokenizer file {path} not found: it is written as vocab.json next to the "
                f"caption checkpoints by `python train.py --task caption`"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a tokenizer file ({e})") from None
        if list(itos[: len(cls.SPECIALS)]) != list(cls.SPECIALS):
            raise ValueError(f"{path}: the vocabulary must start with {', '.join(cls.SPECIALS)}")
        return cls(itos)


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
    ) -> None:
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (<bos>, a word, <eos>), got {max_len}")
        self.data = data
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.img_size = img_size
        self.crop_padding, self.hflip, self.seed = crop_padding, hflip, seed
        self._decoded: dict[int, Tensor] = {}
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

    def image(self, i: int) -> Tensor:
        """Image ``i`` (of the underlying data) as uint8 (3, S, S)."""
        images = self.data.images
        if isinstance(images, Tensor):
            img = images[i]
        else:  # files are decoded and resized once, on first use
            if i not in self._decoded:
                self._decoded[i] = _read_image(images[i], self.img_size)
            img = self._decoded[i]
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


def normalize(img: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) → float normalised with :data:`MEAN`/:data:`STD`."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (img.float() / 255.0 - mean) / std


def denormalize(img: Tensor) -> Tensor:
    """Inverse of :func:`normalize`, to float [0, 1] for display."""
    mean = torch.tensor(MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(STD, device=img.device).view(3, 1, 1)
    return (img.float() * std + mean).clamp(0, 1)


def _read_image(path: Path, size: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)


# -- shapes ------------------------------------------------------------------------------------
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
    text = path.read_text(encoding="utf-8")
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
    for image_id in coco.ids:
        path = root / year_split / coco.coco.loadImgs(image_id)[0]["file_name"]
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


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 in [0, 1] (sacrebleu; Papineni et al. 2002) of ``hypotheses[i]`` against
    all of ``references[i]``. Texts are compared as normalised by :meth:`Tokenizer.split`."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference lists: one per image"
        )
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    if any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    hyps = [" ".join(Tokenizer.split(h)) for h in hypotheses]
    most = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; None fills in for images with fewer references.
    streams = [
        [" ".join(Tokenizer.split(r[k])) if k < len(r) else None for r in references]
        for k in range(most)
    ]
    out = {}
    for n in range(1, 5):
        score = BLEU(max_ngram_order=n, tokenize="none").corpus_score(hyps, streams)
        out[f"bleu{n}"] = score.score / 100.0
    return out


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015), computed as the COCO caption evaluation code does,
    in pure Python (no Java): per n = 1..4, the cosine similarity of TF-IDF n-gram vectors (IDF
    over the images' reference sets), each hypothesis weight clipped at the reference's, times a
    Gaussian penalty on the length difference (``sigma``, lengths counted in bigrams); averaged
    over n and references, times 10, then over images. Texts are normalised by
    :meth:`Tokenizer.split`."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference lists: one per image"
        )

    def ngrams(text: str) -> Counter:
        words = Tokenizer.split(text)
        return Counter(
            tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1)
        )

    refs = [[ngrams(r) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_n = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norms, bigrams

    total = 0.0
    for hyp, rs in zip(hypotheses, refs, strict=True):
        h_vec, h_norm, h_len = tfidf(ngrams(hyp))
        score = 0.0
        for ref in rs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(
                    min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items()
                )
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                score += dot * penalty
        total += 10.0 * score / 4 / len(rs)
    return total / len(hypotheses)


@torch.no_grad()
def cross_attention_maps(model, images: Tensor, tokens: Tensor, layer: int = -1) -> Tensor:
    """Word → patch attention: the ``layer``-th decoder block's cross-attention weights (head
    mean) when the captioner reads ``tokens`` (B, T) (``<bos>`` first) for ``images``, over the
    patch grid: (B, T, gh, gw). Row t is where the model looks to predict token t+1. Prefix
    tokens (the class token) are dropped from the columns, so rows need not sum to one."""
    from vit.rollout import unwrap_model

    model = unwrap_model(model)
    attn = model.blocks[layer].cross_attn
    captured: list[Tensor] = []
    attn.recorder = captured.append
    try:
        model(images, tokens)
    finally:
        attn.recorder = None
    weights = captured[-1].mean(dim=1)  # (B, T, prefix+N)
    gh, gw = model.encoder.grid_size
    weights = weights[:, :, model.encoder.num_prefix_tokens :]  # (B, T, N)
    return weights.reshape(weights.shape[0], weights.shape[1], gh, gw)


# ----------------------------------------------------------------------------------------------
# The caption task of the training engine (`python train.py --task caption`)
# ----------------------------------------------------------------------------------------------
# task_args of the caption task: name → (default, meaning).
CAPTION_TASK_ARGS: dict[str, tuple[Any, str]] = {
    "max_len": (32, "longest token sequence incl. <bos>/<eos>; longer captions are truncated"),
    "beam_size": (1, "beam size of the captions generated for validation (1 = greedy)"),
    "min_count": (1, "words seen fewer times in the training captions become <unk>"),
    "train_scenes": (20_000, "shapes: generated training scenes"),
    "val_scenes": (1_000, "shapes: generated validation (and test) scenes"),
    "sample_images": (6, "validation images shown with captions and attention maps"),
    "encoder_checkpoint": ("", "initialise the encoder from this classification checkpoint"),
}


class CaptionTask(Task):
    """Image captioning: teacher-forced cross-entropy on the next word; validation generates
    captions and scores corpus BLEU-1..4 and CIDEr-D (BLEU-4 selects ``best.pt``).

    ``--model`` is a caption variant (``caption_*``) or any ViT variant, used as the encoder of a
    default decoder. The vocabulary is built from the training captions and kept in the
    checkpoint's task state and as ``vocab.json`` in the run directory.
    """

    datasets = CAPTION_DATASETS
    primary_metric = "bleu4"

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, state)
        self.args = {k: v for k, (v, _) in CAPTION_TASK_ARGS.items()} | cfg.task_args
        self.tokenizer = Tokenizer(self.state["vocab"]) if "vocab" in self.state else None
        self._val: CaptionDataset | None = None

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        for key, value in cfg.task_args.items():
            if key not in CAPTION_TASK_ARGS:
                close = difflib.get_close_matches(key, CAPTION_TASK_ARGS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown task_args key {key!r} for task 'caption'{hint} (valid: "
                    f"{', '.join(CAPTION_TASK_ARGS)})"
                )
            default = CAPTION_TASK_ARGS[key][0]
            if type(value) is not type(default):
                raise ConfigError(
                    f"task_args.{key} must be {type(default).__name__}, got {value!r}"
                )
            if isinstance(value, int) and value < 1 and key != "min_count":
                raise ConfigError(f"task_args.{key} must be positive, got {value}")
        if cfg.task_args.get("max_len", 32) < 3:
            raise ConfigError("task_args.max_len must be at least 3 (<bos>, a word, <eos>)")
        unused = {
            "mixup": cfg.mixup,
            "cutmix": cfg.cutmix,
            "randaugment_ops": cfg.randaugment_ops,
            "cutout": cfg.cutout,
            "tta_hflip": cfg.tta_hflip,
        }
        on = [k for k, v in unused.items() if v > 0]
        if on:
            raise ConfigError(
                f"{', '.join(on)} are classification augmentations that would change what a "
                f"caption describes; set them to 0 for --task caption"
            )
        reserved = {"vocab_size", "img_size", "max_len", "num_classes"} & set(cfg.model_args)
        if reserved:
            raise ConfigError(
                f"set {', '.join(sorted(reserved))} through the run config (--img-size, "
                f"task_args.max_len; the vocabulary comes from the data), not model_args"
            )
        if cfg.data == "shapes" and cfg.img_size < 16:
            raise ConfigError(f"shapes scenes need img_size >= 16, got {cfg.img_size}")

    # -- data -----------------------------------------------------------------------------------
    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        cfg, args = self.cfg, self.args
        try:
            data = load_caption_data(
                cfg.data,
                split,
                data_dir=cfg.data_dir,
                img_size=cfg.img_size,
                num_scenes=args["train_scenes"] if split == "train" else args["val_scenes"],
            )
        except (OSError, ValueError) as e:
            from vit.data import DataError

            raise DataError(str(e)) from None
        if self.tokenizer is None:
            if split != "train":
                raise ConfigError("the caption task needs its vocabulary: build train first")
            self.tokenizer = Tokenizer.build(
                (c for caps in data.captions for c in caps), min_count=args["min_count"]
            )
            self.state["vocab"] = self.tokenizer.itos
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(out / "vocab.json")
        train = split == "train"
        ds = CaptionDataset(
            data,
            self.tokenizer,
            max_len=args["max_len"],
            img_size=cfg.img_size,
            pairs=train,
            name=f"{cfg.data} {split}",
            crop_padding=cfg.crop_padding if train else 0,
            hflip=cfg.hflip if train else False,
            seed=cfg.seed,
        )
        if not train:
            self._val = ds
        return ds

    # -- model ----------------------------------------------------------------------------------
    def model_spec(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs = {
            **cfg.model_args,
            "vocab_size": len(self.state["vocab"]),
            "max_len": self.args["max_len"],
            "img_size": cfg.img_size,
            "drop_path_rate": cfg.drop_path,
        }
        return {"name": cfg.model, "kwargs": kwargs}

    @staticmethod
    def model_from_spec(spec: dict[str, Any]) -> nn.Module:
        from vit.models import CaptionConfig, CaptioningTransformer, create_model

        if spec["name"].startswith("caption_"):
            return create_model(spec["name"], **spec["kwargs"])
        # A ViT variant: it becomes the encoder of the default decoder.
        return CaptioningTransformer(CaptionConfig(encoder=spec["name"]), **spec["kwargs"])

    def build_model(self) -> nn.Module:
        try:
            model = self.model_from_spec(self.model_spec())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build captioning model {self.cfg.model!r}: {e}") from None
        if self.args["encoder_checkpoint"]:
            path = Path(self.args["encoder_checkpoint"])
            if not path.is_file():
                raise ConfigError(f"task_args.encoder_checkpoint {path} does not exist")
            try:
                model.load_encoder(path)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"cannot initialise the encoder from {path}: {e}") from None
        return model

    # -- steps ----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        images, tokens, index = batch
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        x = (images.to(device, non_blocking=True).float().div_(255) - mean) / std
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Trim the padding columns no caption of this batch reaches.
        length = int((tokens != self.tokenizer.pad_id).sum(1).max())
        return x, tokens[:, :length].to(device, non_blocking=True), index

    def _loss(self, model: nn.Module, x: Tensor, tokens: Tensor, smoothing: float) -> Tensor:
        logits = model(x, tokens[:, :-1])  # (B, T-1, V): predict token t+1 from tokens <= t
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            tokens[:, 1:].flatten(),
            ignore_index=self.tokenizer.pad_id,
            label_smoothing=smoothing,
        )

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], step: int) -> Tensor:
        x, tokens, _ = batch
        return self._loss(model, x, tokens, self.cfg.label_smoothing)

    def caption(self, model: nn.Module, x: Tensor) -> list[str]:
        """Captions of normalised images ``x`` (B, 3, H, W) with the task's beam size."""
        from vit.rollout import unwrap_model

        inner = unwrap_model(model)
        ids = inner.generate(x, self.args["max_len"] - 1, beam_size=self.args["beam_size"])
        return [self.tokenizer.decode(row) for row in ids.tolist()]

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> dict[str, Any]:
        dataset = loader.dataset
        hyps: list[str] = []
        refs: list[list[str]] = []
        total_loss, n_tokens = 0.0, 0
        for batch in loader:
            x, tokens, index = self.prepare_batch(batch, device)
            # Loss per predicted token of each image's first reference, without smoothing.
            count = int((tokens[:, 1:] != self.tokenizer.pad_id).sum())
            total_loss += self._loss(model, x, tokens, 0.0).item() * count
            n_tokens += count
            hyps += self.caption(model, x)
            refs += [dataset.references[i] for i in index.tolist()]
        return {
            **bleu_scores(hyps, refs),
            "cider": cider_d(hyps, refs),
            "loss": total_loss / n_tokens,
            "n": len(hyps),
        }

    # -- TensorBoard ----------------------------------------------------------------------------
    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:
        if writer is None or self._val is None:
            return
        ds = self._val
        k = min(self.args["sample_images"], len(ds))
        device = next(model.parameters()).device
        # The same images every epoch: the first k of the validation split.
        images = torch.stack([ds[i][0] for i in range(k)])  # uint8 (k, 3, H, W)
        x, _, _ = self.prepare_batch((images, ds.tokens[:k], torch.arange(k)), device)
        captions = self.caption(model, x)
        rows = ["| image | generated | reference |", "|---|---|---|"]
        rows += [f"| {i} | {c} | {ds.references[i][0]} |" for i, c in enumerate(captions)]
        writer.add_text("captions/samples", "\n".join(rows), step)
        for i, caption in enumerate(captions):
            writer.add_image(
                f"captions/attention_{i}",
                attention_strip(model, x[i : i + 1], images[i].float() / 255, caption, self),
                step,
            )


def attention_strip(
    model: nn.Module, x: Tensor, display: Tensor, caption: str, task: CaptionTask | Tokenizer
) -> Tensor:
    """One (3, H', W') picture: the image, then for each word of ``caption`` the last decoder
    block's cross-attention (word → patches) over the image, labelled with the word."""
    from PIL import Image, ImageDraw

    from vit.rollout import overlay, unwrap_model

    tok = task.tokenizer if isinstance(task, CaptionTask) else task
    inner = unwrap_model(model)
    ids, _, _ = tok.encode(caption)
    words = Tokenizer.split(caption)
    # Inputs <bos> w1 .. wn: row t of the maps is where the model looked to predict word t+1.
    tokens = torch.tensor([ids[:-1]], device=x.device)
    maps = cross_attention_maps(inner, x, tokens)[0, : len(words)].float()  # (n, gh, gw)
    scale = max(1, 64 // display.shape[-1])
    size = (display.shape[-2] * scale, display.shape[-1] * scale)
    big = torch.nn.functional.interpolate(display[None].cpu(), size=size, mode="nearest")[0]
    heat = torch.nn.functional.interpolate(maps[:, None].cpu(), size=size, mode="bilinear")[:, 0]
    lo = heat.flatten(1).amin(1)[:, None, None]
    hi = heat.flatten(1).amax(1)[:, None, None]
    heat = (heat - lo) / (hi - lo).clamp_min(1e-12)
    panels = [big, *overlay(big.expand(len(heat), -1, -1, -1), heat)]
    words = ["", *words]
    label_h = 12
    h, w = size
    canvas = Image.new("RGB", (len(panels) * (w + 2), h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (panel, word) in enumerate(zip(panels, words, strict=True)):
        arr = (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(arr), (j * (w + 2), 0))
        draw.text((j * (w + 2) + 1, h), word, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)  # uint8 (3, H', W')
