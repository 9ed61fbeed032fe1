"""``python -m vit.rollout``: rollout overlays for image files.

python -m vit.rollout --checkpoint PATH --images a.jpg b.png --out-dir maps/
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vit.rollout.capture import capture_attention, capture_tokenizer_attention, encoder_attentions
from vit.rollout.maps import (
    HEAD_FUSIONS,
    attention_rollout,
    last_or_none,
    model_geometry,
    normalize_maps,
    rollout_to_maps,
    upsample,
)
from vit.rollout.render import rollout_grid

# Overlays are drawn at the model's input crop, enlarged to at least this many pixels (CIFAR's 32
# px is unreadable) and at most the larger bound, whatever the file's resolution.
_DISPLAY_MIN, _DISPLAY_MAX = 128, 512


def _output_paths(paths: list[str], out_dir: Path) -> list[Path]:
    seen: dict[str, int] = {}
    outs = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        suffix = f"_{seen[stem]}" if seen[stem] > 1 else ""  # a/x.png and b/x.png both survive
        outs.append(out_dir / f"{stem}{suffix}_rollout.png")
    return outs


def main(argv: list[str] | None = None) -> int:
    """``python -m vit.rollout``: rollout overlays (image | heatmap | overlay PNGs) for images,
    and each image's predicted class (the same prediction as ``vit.evaluate`` and
    ``vit.predict``: the checkpoint's own preprocessing)."""
    from vit.errors import CliParser, run_command

    parser = CliParser(
        prog="python -m vit.rollout",
        description="Attention-rollout maps (Abnar & Zuidema 2020) of a trained checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--images", nargs="+", required=True, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--out-dir", default="maps", help="where the PNGs go (default: maps)")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write the maps as an event file")
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="in [0, 1)")
    parser.add_argument("--start-layer", type=int, default=0, help="first block of the rollout")
    parser.add_device()
    return run_command(lambda: _run_cli(parser.parse_args(argv)))


def _run_cli(args: Any) -> None:
    from torchvision.utils import save_image

    from vit.engine.checkpoint import checkpoint_preprocess, load_model
    from vit.engine.config import resolve_device
    from vit.errors import ConfigError, UsageError
    from vit.fileio import atomic_write
    from vit.preprocess import decode_image, display_path

    if not 0.0 <= args.discard_ratio < 1.0:  # also refuses NaN
        raise ConfigError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    out_dir = Path(args.out_dir)
    for flag, folder in (("--out-dir", out_dir), ("--tensorboard", args.tensorboard)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder} is a file; pass a folder")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint)
    if ckpt["task"] != "classify":
        raise UsageError(
            f"{args.checkpoint} is a {ckpt['task']!r} checkpoint; rollout maps need an image "
            f"classifier trained with --task classify"
        )
    preprocess = checkpoint_preprocess(ckpt)
    classes = list(ckpt["task_state"].get("classes") or [])
    model.to(device)
    depth = len(encoder_attentions(model))
    if not 0 <= args.start_layer < depth:
        raise ConfigError(f"--start-layer must be in [0, {depth}) for this {depth}-block model")
    size = preprocess.img_size
    shown = min(_DISPLAY_MAX, max(_DISPLAY_MIN, size))
    input_list: list[torch.Tensor] = []
    display_list: list[torch.Tensor] = []
    for path in args.images:
        im = decode_image(path)
        if im.size != (size, size):
            how = "whole image" if preprocess.resize == "squash" else "shorter side, centre crop"
            print(
                f"note: {display_path(path)} is {im.width}x{im.height}; resized to "
                f"{size}x{size} ({how}, as in training)",
                file=sys.stderr,
            )
        input_list.append(preprocess.resize_image(im))  # uint8 (3, S, S)
        # The same crop at display resolution: the maps line up with what the model saw.
        display_list.append(preprocess.resize_image(im, shown).float() / 255)
    inputs, display = torch.stack(input_list), torch.stack(display_list)

    grid, layout = model_geometry(model)
    with (
        torch.no_grad(),
        capture_attention(model) as attentions,
        capture_tokenizer_attention(model) as tokenizer_maps,
    ):
        probs = model(preprocess.normalize(inputs).to(device)).float().softmax(dim=-1).cpu()
    joint = attention_rollout(
        [a.float().cpu() for a in attentions],
        args.head_fusion,
        args.discard_ratio,
        args.start_layer,
        class_token=layout["class_token"],
    )
    pool_weights = last_or_none([w.float().cpu() for w in attentions.pool_weights])
    maps = rollout_to_maps(joint, grid, shown, pool_weights=pool_weights, **layout)  # (B, S, S)
    gated = None
    if tokenizer_maps:  # CBAM in the tokenizer: its last stage's spatial map beside the rollout
        gated = normalize_maps(upsample(tokenizer_maps[-1].float().cpu()[:, 0], shown))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {out_dir}: {e.strerror}") from None
    for i, out in enumerate(_output_paths(args.images, out_dir)):
        with atomic_write(out, "wb") as f:  # never through a link, never half a picture
            save_image(rollout_grid(display[i : i + 1], maps[i : i + 1]), f, format="png")
        if gated is not None:
            tokenizer_out = out.with_name(out.name.replace("_rollout.png", "_tokenizer.png"))
            with atomic_write(tokenizer_out, "wb") as f:
                save_image(rollout_grid(display[i : i + 1], gated[i : i + 1]), f, format="png")
        conf, cls = probs[i].max(dim=0)
        name = classes[cls.item()] if cls.item() < len(classes) else str(cls.item())
        written = f"{display_path(args.images[i])} -> {display_path(out)}"
        print(f"{written} (predicted {name}, p={conf.item():.2f})")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            writer.add_image("rollout/maps", rollout_grid(display, maps), 0)
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")


if __name__ == "__main__":
    raise SystemExit(main())


if __name__ == "__main__":
    sys.exit(main())
