"""Draw a checkpoint's attention maps for the first validation image of each class, the way the
docs' figures are made (docs/cifar10_rollout.png), and print what each map shows so the caption
can say it.

    python docs/rollout_figure.py --checkpoint runs/cifar10/best.pt --out docs/cifar10_rollout.png

The validation split is rebuilt by the checkpoint's own task and config (``--data-dir`` if the
data moved), so the images are the ones training validated on; the maps, labels and scale come
from the package's renderer (:func:`vit.rollout.render_maps`), as in TensorBoard.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit.engine.checkpoint import load_model
from vit.engine.config import make_config
from vit.engine.tasks import get_task
from vit.models.pretrained import read_export
from vit.rollout import explain, render_maps
from vit.rollout.maps import HEAD_FUSIONS, METHODS
from vit.rollout.tensorboard import method_title


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a classifier's best.pt/last.pt or export folder"
    )
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument(
        "--data-dir", help="where the checkpoint's data is now (default: as trained)"
    )
    parser.add_argument("--method", choices=METHODS, default="rollout")
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--max-classes", type=int, default=10)
    parser.add_argument("--columns", type=int, default=2, help="side-by-side groups of rows")
    args = parser.parse_args()

    if Path(args.checkpoint).is_dir():  # an export folder records the run's config and classes
        model, export = read_export(args.checkpoint)
        state = {"classes": export["class_names"], "preprocess": export["preprocess"]}
        ckpt = {"config": export["train_config"], "task": export["task"], "task_state": state}
    else:
        model, ckpt = load_model(args.checkpoint)
    cfg = make_config(ckpt["config"])
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    task = get_task(ckpt["task"])(cfg, ckpt["task_state"])
    val = task.build_dataset("val")
    classes = ckpt["task_state"]["classes"]
    labels = val.labels.tolist()
    idx = [labels.index(c) for c in range(len(classes)) if c in labels][: args.max_classes]
    raw = torch.stack([val[i][0] for i in idx])  # uint8 (K, 3, H, W)
    x, _ = task.prepare_batch((raw, torch.tensor([labels[i] for i in idx])), torch.device("cpu"))
    found = explain(
        model,
        x,
        method=args.method,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
    )
    top = found.probs.max(-1)
    true = [classes[labels[i]] for i in idx]
    predicted = [classes[c] for c in top.indices.tolist()]
    title = method_title(args.method, args.head_fusion, args.discard_ratio)
    display = raw.float() / 255
    per = -(-len(idx) // args.columns)
    pictures = []
    for start in range(0, len(idx), per):
        part = slice(start, start + per)
        pictures.append(
            render_maps(
                display[part],
                found.maps[part],
                true=true[part],
                predicted=predicted[part],
                probs=top.values[part].tolist(),
                title=title,
            )
        )
    height = max(p.shape[0] for p in pictures)
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in pictures
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(padded, axis=1)).save(args.out, optimize=True)

    gh, gw = found.maps.shape[-2:]
    print(f"{args.out}: {title}, {ckpt['config']['model']}, validation images {idx}")
    print("| true | predicted | p | peak x uniform | peak patch (row, col) of | on the border |")
    print("|---|---|---:|---:|---|---|")
    for k in range(len(idx)):
        flat = int(found.maps[k].argmax())
        r, c = divmod(flat, gw)
        border = r in (0, gh - 1) or c in (0, gw - 1)
        print(
            f"| {true[k]} | {predicted[k]} | {top.values[k]:.2f} | {found.maps[k].max():.2f} | "
            f"({r}, {c}) of {gh}x{gw} | {'yes' if border else 'no'} |"
        )


if __name__ == "__main__":
    main()
