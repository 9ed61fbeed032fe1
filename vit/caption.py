"""``python -m vit.caption --checkpoint CKPT|EXPORT_DIR PATH [PATH ...] [--beam-size K]``.

Captions image files, and the images in folders (recursively; hidden files skipped), with a
checkpoint written by ``python train.py --task caption`` or its export folder: prints one line
``<image>: <caption>`` per image. Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vit.engine.checkpoint import checkpoint_preprocess, load_model
from vit.engine.config import resolve_device
from vit.errors import CliParser, ConfigError, DataError, UsageError, run_command
from vit.fileio import is_regular_file
from vit.models.decoding import DEFAULT_LENGTH_PENALTY
from vit.preprocess import Preprocess, display_path, image_paths

__all__ = ["caption_images", "main"]


def caption_images(
    checkpoint: str | Path,
    images: list[str | Path],
    *,
    beam_size: int = 1,
    max_len: int | None = None,
    device: str = "auto",
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
) -> list[str]:
    """Captions of image files by the captioner in ``checkpoint`` (a training checkpoint, EMA
    weights when present, or an export folder), each file preprocessed as the captioner was
    trained (:mod:`vit.preprocess`). Folders in ``images`` are not expanded here: pass
    :func:`vit.preprocess.image_paths` of the command-line arguments.
    ``length_penalty``: beam search ranks by summed log-probability / length ** this (default 1,
    the mean per token; see :func:`vit.models.decoding.beam_search`). An empty caption is ``""``.

    Raises:
        UsageError: a bad checkpoint (or one of another task), an unreadable image, a bad option.
    """
    from vit.captions import Tokenizer

    if beam_size < 1:
        raise ConfigError(f"--beam-size must be at least 1, got {beam_size}")
    if max_len is not None and max_len < 1:
        raise ConfigError(f"--max-len must be at least 1, got {max_len}")
    if Path(checkpoint).is_dir():
        from vit.models.pretrained import read_export

        model, config = read_export(checkpoint)
        task, vocab = config["task"], config.get("vocab")
        preprocess = Preprocess.from_dict(config["preprocess"])
    else:
        model, ckpt = load_model(checkpoint)
        task, vocab = ckpt["task"], ckpt["task_state"].get("vocab")
        preprocess = checkpoint_preprocess(ckpt) if task == "caption" else None
    if task != "caption":
        raise UsageError(
            f"{checkpoint} is a {task!r} model, not a captioner; use python -m vit.predict for it"
        )
    missing = [str(p) for p in images if not Path(p).exists()]
    if missing:  # all of them in one line, before any work
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    special = [str(p) for p in images if not is_regular_file(p)]
    if special:  # a FIFO named *.png would block the reader forever
        raise DataError(f"not regular files (folders, FIFOs or devices): {', '.join(special)}")
    tokenizer = Tokenizer(vocab)
    limit, size = model.config.max_len - 1, model.config.vocab_size
    if beam_size > size:  # before any image is read
        raise ConfigError(f"--beam-size is at most the vocabulary's {size} words, got {beam_size}")
    if max_len is not None and max_len > limit:
        raise ConfigError(f"--max-len is at most this model's {limit} words, got {max_len}")
    if not 0 <= length_penalty <= 10:
        raise ConfigError(f"--length-penalty must be in [0, 10], got {length_penalty}")
    dev = resolve_device(device)
    model.to(dev)
    batch = preprocess.normalize(torch.stack([preprocess.load(p) for p in images])).to(dev)
    ids = model.generate(batch, max_len, beam_size=beam_size, length_penalty=length_penalty)
    return [tokenizer.decode(row) for row in ids.tolist()]


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m vit.caption", description=__doc__.split("\n\n")[1])
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders of images")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="best.pt/last.pt of a caption run, or its python -m vit.export folder",
    )
    p.add_argument(
        "--images", nargs="+", default=[], metavar="PATH", help="more image files or folders"
    )
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=int, help="most words to generate (default: the model's)")
    p.add_argument(
        "--length-penalty",
        type=float,
        default=DEFAULT_LENGTH_PENALTY,
        help="beam search ranks by log-probability / length**this: 1 the mean per word "
        "(default), 0 the sum (favours short captions)",
    )
    p.add_device()

    def run() -> None:
        options = vars(p.parse_args(argv))
        given = options.pop("paths") + options.pop("images")
        if not given:
            raise ConfigError(f"name the images: {p.prog} --checkpoint CKPT PATH [PATH ...]")
        paths = image_paths(given)
        captions = caption_images(options.pop("checkpoint"), paths, **options)
        for path, caption in zip(paths, captions, strict=True):
            print(f"{display_path(path)}: {caption}")
        empty = [display_path(p) for p, c in zip(paths, captions, strict=True) if not c.strip()]
        if empty:  # a blank line is never the whole answer
            print(
                f"note: the model ended the caption at once for {', '.join(empty[:5])} (empty "
                f"caption); try --beam-size 1, a larger --length-penalty, or a better-trained "
                f"checkpoint",
                file=sys.stderr,
            )

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
