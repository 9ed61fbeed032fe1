"""Does the rollout map find the object? Share of validation images whose map maximum lies inside
the object's box, on the synthetic dataset (whose boxes are known), against two baselines.

Target (issue 4): >= 80% for a model trained with the quick-start config. Chance is the mean box
area over the image area (a uniformly random pixel); "image centre" always answers the centre pixel
(objects never touch the border, so it beats chance).

    python train.py --config configs/synthetic.yaml --out-dir runs/synthetic
    python benchmarks/rollout_localisation.py --checkpoint runs/synthetic/best.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from vit.rollout import gradient_rollout, rollout_maps, rollout_to_maps
from vit.train import CheckpointError, get_task, load_model, make_config


def hits(maps: Tensor, boxes: Tensor) -> Tensor:
    """(B, H, W) maps, (B, 4) boxes (x0, y0, x1, y1; x1/y1 exclusive) → (B,) bool: the map's
    maximum pixel lies inside the box."""
    w = maps.shape[-1]
    idx = maps.flatten(1).argmax(dim=1)
    y, x = idx // w, idx % w
    return (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a synthetic-data checkpoint")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()

    try:
        model, ckpt = load_model(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = make_config(ckpt["config"])
    if cfg.data != "synthetic":
        msg = f"{args.checkpoint} was trained on {cfg.data!r}; boxes exist only for synthetic"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    task = get_task(ckpt["task"])(cfg, ckpt["task_state"])
    val = task.build_dataset("val")
    device = torch.device("cpu")
    size = cfg.img_size

    methods: dict[str, Callable[[Tensor], Tensor]] = {
        "rollout, mean heads": lambda x: rollout_maps(model, x),
        "rollout, mean, discard 0.9": lambda x: rollout_maps(model, x, discard_ratio=0.9),
        "rollout, max, discard 0.9": lambda x: rollout_maps(
            model, x, head_fusion="max", discard_ratio=0.9
        ),
        "rollout, min heads": lambda x: rollout_maps(model, x, head_fusion="min"),
        "gradient rollout (Chefer)": lambda x: rollout_to_maps(
            gradient_rollout(model, x), model.grid_size, size
        ),
    }
    hit = {name: [] for name in methods}
    correct, centre, area = [], [], []
    for start in range(0, len(val), args.batch_size):
        images = val.images[start : start + args.batch_size].permute(0, 3, 1, 2)  # uint8 (B,3,H,W)
        labels = val.labels[start : start + args.batch_size]
        boxes = val.boxes[start : start + args.batch_size]
        x, y = task.prepare_batch((images, labels), device)
        with torch.no_grad():
            correct.append(model(x).argmax(dim=1) == y)
        for name, fn in methods.items():
            hit[name].append(hits(fn(x), boxes))
        centre.append(hits(_centre(size).expand(len(boxes), -1, -1), boxes))
        area.append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / size**2)

    n = len(val)
    top1 = torch.cat(correct).float().mean()
    print(f"{args.checkpoint}: {cfg.model} {ckpt['model_spec']['kwargs']}")
    print(f"val top-1 {top1:.3f} on {n} validation images")
    print(f"| {'map':<28} | {'max inside box':>14} |")
    print(f"|{'-' * 30}|{'-' * 16}|")
    for name, h in hit.items():
        print(f"| {name:<28} | {torch.cat(h).float().mean():>14.3f} |")
    print(f"| {'baseline: image centre':<28} | {torch.cat(centre).float().mean():>14.3f} |")
    print(f"| {'chance (random pixel)':<28} | {torch.cat(area).mean():>14.3f} |")
    return 0


def _centre(size: int) -> Tensor:
    m = torch.zeros(1, size, size)
    m[0, size // 2, size // 2] = 1.0
    return m


if __name__ == "__main__":
    raise SystemExit(main())
