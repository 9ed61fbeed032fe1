"""``python -m vit.caption --checkpoint PATH --images a.png b.jpg [--beam-size K]``.

Captions images with a checkpoint written by ``python train.py --task caption``: prints one line
``<image>: <caption>`` per image. Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["caption_images", "main"]


def caption_images(
    checkpoint: str | Path,
    images: list[str | Path],
    *,
    beam_size: int = 1,
    max_len: int | None = None,
    device: str = "auto",
) -> list[str]:
    """Captions of image files by the captioner in ``checkpoint`` (EMA weights when present)."""
    from vit.captions import Tokenizer, _read_image, normalize
    from vit.train import load_model, resolve_device

    model, ckpt = load_model(checkpoint)
    if ckpt["task"] != "caption":
        raise ValueError(
            f"{checkpoint} is a {ckpt['task']!r} checkpoint, not a captioner; use "
            f"python -m vit.evaluate for it"
        )
    tokenizer = Tokenizer(ckpt["task_state"]["vocab"])
    dev = resolve_device(device)
    model.to(dev)
    size = model.encoder.patch_embed.img_size
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    batch = torch.stack([normalize(_read_image(Path(p), size)) for p in images]).to(dev)
    ids = model.generate(batch, max_len, beam_size=beam_size)
    return [tokenizer.decode(row) for row in ids.tolist()]


def main(argv: list[str] | None = None) -> int:
    from vit.train import CheckpointError, CliParser

    p = CliParser(prog="python -m vit.caption", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="best.pt/last.pt of a caption run")
    p.add_argument("--images", nargs="+", required=True, help="image files (any PIL format)")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=int, help="most words to generate (default: the model's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    try:
        args = p.parse_args(argv)
        captions = caption_images(
            args.checkpoint,
            args.images,
            beam_size=args.beam_size,
            max_len=args.max_len,
            device=args.device,
        )
    except (CheckpointError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, caption in zip(args.images, captions, strict=True):
        print(f"{path}: {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
