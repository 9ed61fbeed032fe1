"""``python -m vit.rollout``: labelled attention-map pictures for image files and folders.

python -m vit.rollout --checkpoint runs/synthetic/best.pt docs/rollout_examples/ --out-dir maps/
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vit.rollout.capture import encoder_attentions
from vit.rollout.maps import HEAD_FUSIONS, METHODS, explain
from vit.rollout.render import render_maps
from vit.rollout.tensorboard import method_title

# Pictures are drawn at the model's input crop, enlarged to at least this many pixels (CIFAR's 32
# px is unreadable) and at most the larger bound, whatever the file's resolution.
_DISPLAY_MIN, _DISPLAY_MAX = 128, 512
_BATCH = 32  # images per forward pass


def output_suffix(args: Any, class_name: str | None = None) -> str:
    """The part of an output name that says how the map was made, so runs with other options
    never overwrite each other: ``rollout-mean-discard0``, ``rollout-max-discard0.9-from2``,
    ``gradient-predicted``, ``gradient-cat``."""
    if args.method == "gradient":
        suffix = f"gradient-{_safe(class_name) if class_name is not None else 'predicted'}"
    else:
        suffix = f"rollout-{args.head_fusion}-discard{args.discard_ratio:g}"
    return suffix + (f"-from{args.start_layer}" if args.start_layer else "")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _output_paths(paths: list[Path], out_dir: Path, suffix: str) -> list[Path]:
    seen: dict[str, int] = {}
    outs = []
    for p in paths:
        stem = p.stem
        seen[stem] = seen.get(stem, 0) + 1
        n = f"_{seen[stem]}" if seen[stem] > 1 else ""  # a/x.png and b/x.png both survive
        outs.append(out_dir / f"{stem}{n}_{suffix}.png")
    return outs


def main(argv: list[str] | None = None) -> int:
    """``python -m vit.rollout``: one labelled picture per image (image | map | overlay, the
    predicted class and its probability, the map's peak on the fixed scale of
    :mod:`vit.rollout.render`), and each image's predicted class (the same prediction as
    ``vit.evaluate`` and ``vit.predict``: the model's own preprocessing)."""
    from vit.errors import CliParser, run_command

    parser = CliParser(
        prog="python -m vit.rollout",
        description="Attention maps of a trained classifier: attention rollout (Abnar & Zuidema "
        "2020) or the class-specific gradient map (Chefer et al. 2021).",
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help="image files or folders of images (recursive)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a best.pt/last.pt, or a python -m vit.export folder"
    )
    parser.add_argument("--images", nargs="+", default=[], help="more image files or folders")
    parser.add_argument("--out-dir", default="maps", help="where the PNGs go (default: maps)")
    parser.add_argument(
        "--tensorboard", metavar="DIR", help="also write the first 32 images' maps as an event file"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="rollout",
        help="rollout: where the class token's information comes from (default); gradient: "
        "the class-specific relevance, for the predicted class or --class",
    )
    parser.add_argument(
        "--class",
        dest="target",
        metavar="NAME|INDEX",
        help="with --method gradient: the class to explain (default: the predicted class)",
    )
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument(
        "--discard-ratio", type=float, default=0.0, help="in [0, 1) (default 0, as in training)"
    )
    parser.add_argument("--start-layer", type=int, default=0, help="first block of the product")
    parser.add_device()
    parser.add_weights()
    return run_command(lambda: _run_cli(parser.parse_args(argv)))


def _target(value: str | None, classes: list[str]) -> int | None:
    from vit.errors import ConfigError, did_you_mean

    if value is None:
        return None
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    hint = did_you_mean(value, classes, n=1)
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise ConfigError(
        f"--class {value!r} is not a class of this model (a name or an index in "
        f"[0, {len(classes)}): {shown}){hint}"
    )


def _run_cli(args: Any) -> None:
    from PIL import Image

    from vit.engine.config import resolve_device
    from vit.errors import ConfigError
    from vit.predict import load_classifier
    from vit.preprocess import decode_image, display_path, image_paths

    if not 0.0 <= args.discard_ratio < 1.0:  # also refuses NaN
        raise ConfigError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if args.target is not None and args.method != "gradient":
        raise ConfigError("--class needs --method gradient (rollout is not class-specific)")
    given = [*args.paths, *args.images]
    if not given:
        raise ConfigError(
            "name the images: python -m vit.rollout --checkpoint CKPT PATH [PATH ...]"
        )
    out_dir = Path(args.out_dir)
    for flag, folder in (("--out-dir", out_dir), ("--tensorboard", args.tensorboard)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder} is a file; pass a folder")
    files = image_paths(given)
    device = resolve_device(args.device)
    model, classes, preprocess = load_classifier(args.checkpoint, args.weights)
    target = _target(args.target, classes)
    model.to(device)
    depth = len(encoder_attentions(model))
    if not 0 <= args.start_layer < depth:
        raise ConfigError(f"--start-layer must be in [0, {depth}) for this {depth}-block model")
    size = preprocess.img_size
    shown = min(_DISPLAY_MAX, max(_DISPLAY_MIN, size))
    suffix = output_suffix(args, classes[target] if target is not None else None)
    outs = _output_paths(files, out_dir, suffix)
    inputs = {p.resolve() for p in files}
    clash = [o for o in outs if o.resolve() in inputs]
    if clash:
        raise ConfigError(f"{display_path(clash[0])} is an input; pass another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {out_dir}: {e.strerror}") from None
    title = method_title(args.method, args.head_fusion, args.discard_ratio)
    if target is not None:
        title = f"gradient rollout ({classes[target]})"
    all_display: list[torch.Tensor] = []
    all_maps: list[torch.Tensor] = []
    all_pred: list[str] = []
    all_prob: list[float] = []
    for start in range(0, len(files), _BATCH):
        batch = files[start : start + _BATCH]
        pixels: list[torch.Tensor] = []
        shown_list: list[torch.Tensor] = []
        for path in batch:
            im = decode_image(path)
            if im.size != (size, size):
                how = (
                    "whole image" if preprocess.resize == "squash" else "shorter side, centre crop"
                )
                print(
                    f"note: {display_path(path)} is {im.width}x{im.height}; resized to "
                    f"{size}x{size} ({how}, as in training)",
                    file=sys.stderr,
                )
            pixels.append(preprocess.resize_image(im))  # uint8 (3, S, S)
            # The same crop at display resolution: the maps line up with what the model saw.
            shown_list.append(preprocess.resize_image(im, shown).float() / 255)
        x = preprocess.normalize(torch.stack(pixels)).to(device)
        found = explain(
            model,
            x,
            method=args.method,
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
            start_layer=args.start_layer,
            target=target,
        )
        top = found.probs.max(dim=-1)
        predicted = [classes[c] for c in top.indices.tolist()]
        display = torch.stack(shown_list)
        for i, path in enumerate(batch):
            out = outs[start + i]
            picture = render_maps(
                display[i : i + 1],
                found.maps[i : i + 1],
                names=[path.name],
                predicted=predicted[i : i + 1],
                probs=top.values[i : i + 1].tolist(),
                title=title,
                panel=shown,
            )
            _save(Image.fromarray(picture), out)
            if found.tokenizer is not None:  # CBAM tokenizer: its own spatial map too
                gated = render_maps(
                    display[i : i + 1],
                    found.tokenizer[i : i + 1],
                    names=[path.name],
                    predicted=predicted[i : i + 1],
                    probs=top.values[i : i + 1].tolist(),
                    title="tokenizer (CBAM)",
                    panel=shown,
                )
                _save(Image.fromarray(gated), out.with_name(f"{out.stem}_tokenizer.png"))
            print(
                f"{display_path(path)} -> {display_path(out)} (predicted {predicted[i]}, "
                f"p={top.values[i].item():.2f}; map peak {found.maps[i].max().item():.2f}x "
                f"uniform)"
            )
        if args.tensorboard and start == 0:  # one picture of the first batch, not of thousands
            all_display.append(display)
            all_maps.append(found.maps)
            all_pred += predicted
            all_prob += top.values.tolist()
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        picture = render_maps(
            torch.cat(all_display),
            torch.cat(all_maps),
            names=[p.name for p in files[:_BATCH]],
            predicted=all_pred,
            probs=all_prob,
            title=title,
            panel=shown,
        )
        with SummaryWriter(args.tensorboard) as writer:
            writer.add_image(f"rollout/{suffix}", picture, 0, dataformats="HWC")
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard} --host 127.0.0.1")


def _save(image: Any, out: Path) -> None:
    """Write a PNG atomically, never through a link at ``out``, never half a picture."""
    from vit.fileio import atomic_write

    with atomic_write(out, "wb") as f:
        image.save(f, format="PNG")


if __name__ == "__main__":
    sys.exit(main())
