"""``python -m vit.caption --checkpoint PATH --images a.png b.jpg [--beam-size K]``.

Captions images with a checkpoint written by ``python train.py --task caption``: prints one line
``<image>: <caption>`` per image. Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vit.engine.checkpoint import checkpoint_preprocess, load_model
from vit.engine.config import resolve_device
from vit.errors import CliParser, ConfigError, DataError, UsageError, run_command
from vit.preprocess import display_path

__all__ = ["caption_images", "main"]


def caption_images(
    checkpoint: str | Path,
    images: list[str | Path],
    *,
    beam_size: int = 1,
    max_len: int | None = None,
    device: str = "auto",
) -> list[str]:
    """Captions of image files by the captioner in ``checkpoint`` (EMA weights when present),
    each file preprocessed as the captioner was trained (:mod:`vit.preprocess`).

    Raises:
        UsageError: a bad checkpoint (or one of another task), an unreadable image, a bad option.
    """
    from vit.captions import Tokenizer

    if beam_size < 1:
        raise ConfigError(f"--beam-size must be at least 1, got {beam_size}")
    if max_len is not None and max_len < 1:
        raise ConfigError(f"--max-len must be at least 1, got {max_len}")
    model, ckpt = load_model(checkpoint)
    if ckpt["task"] != "caption":
        raise UsageError(
            f"{checkpoint} is a {ckpt['task']!r} checkpoint, not a captioner; use "
            f"python -m vit.evaluate for it"
        )
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:  # all of them in one line, before any work
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    tokenizer = Tokenizer(ckpt["task_state"]["vocab"])
    preprocess = checkpoint_preprocess(ckpt)
    dev = resolve_device(device)
    model.to(dev)
    batch = preprocess.normalize(torch.stack([preprocess.load(p) for p in images])).to(dev)
    ids = model.generate(batch, max_len, beam_size=beam_size)
    return [tokenizer.decode(row) for row in ids.tolist()]


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m vit.caption", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="best.pt/last.pt of a caption run")
    p.add_argument("--images", nargs="+", required=True, help="image files (any PIL format)")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=int, help="most words to generate (default: the model's)")
    p.add_device()

    def run() -> None:
        options = vars(p.parse_args(argv))
        paths = options.pop("images")
        captions = caption_images(options.pop("checkpoint"), paths, **options)
        for path, caption in zip(paths, captions, strict=True):
            print(f"{display_path(path)}: {caption}")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
