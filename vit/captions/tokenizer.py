"""The captions' word-level tokenizer: lower case, punctuation split off, special tokens first."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from vit.fileio import atomic_write

__all__ = ["Tokenizer"]

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
        if max_len is not None and truncated:
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
        with atomic_write(path) as f:  # never through a link, never half a file
            f.write(json.dumps({"itos": self.itos}, indent=0) + "\n")

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
