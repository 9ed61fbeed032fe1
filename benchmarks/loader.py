"""Augmentation throughput of the training loaders on the CIFAR recipe's policy (random crop with
4 pixels of padding, horizontal flip, two RandAugment operations at magnitude 9, an 8-pixel cutout)
against timm's RandAugment, measured in the same run:

- timm: ``rand_augment_transform("rand-m9-n2-mstd0")`` after torchvision's crop and flip, one PIL
  image at a time in one process (no cutout), as a tutorial repository trains;
- ours, ``--loader cpu``: the albumentations pipeline (``vit.data.build_transform``), one image
  at a time in one process, what each ``--workers`` process does;
- ours, ``--loader device``: ``vit.data.DeviceLoader``, batches augmented where the images live
  (``--device``, CUDA when there is one), with and without the RandAugment operations.

Images are random 32x32 pixels (augmentation cost does not depend on content). Each row is the
median of ``--rounds`` passes over ``--images`` images, batches of ``--batch-size``, device
synchronised; the rounds alternate over the loaders, after a warm-up round.

    python benchmarks/loader.py [--device cpu] [--images 8192] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.data import AugmentPolicy, DeviceLoader, ImageDataset, build_transform, make_loader

POLICY = {"crop_padding": 4, "hflip": True, "randaugment_ops": 2, "cutout": 8}
MAGNITUDE = 9.0


def _seconds_per_pass(passes: Callable[[], Iterable[object]], device: torch.device) -> float:
    t0 = time.perf_counter()
    for _ in passes():
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    n, size = args.images, 32
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    ds = ImageDataset(images, torch.zeros(n, dtype=torch.long), ["0"])
    cpu = torch.device("cpu")

    timm_ra = v2.Compose(
        [
            v2.RandomCrop(size, padding=4),
            v2.RandomHorizontalFlip(),
            rand_augment_transform("rand-m9-n2-mstd0", {"translate_const": 10}),
            v2.PILToTensor(),
        ]
    )
    pil = [Image.fromarray(im.numpy()) for im in images]

    def timm_pass() -> Iterable[object]:
        return (timm_ra(im) for im in pil)

    ours = ds.with_transform(
        build_transform(size, AugmentPolicy(**POLICY, randaugment_magnitude=MAGNITUDE)), 0
    )
    cpu_loader = make_loader(ours, args.batch_size, shuffle=True, drop_last=False)

    # Built once: the images move to the device here, not in the timed passes.
    dev_ra, dev_plain = (
        DeviceLoader(
            ds, args.batch_size, device=device, shuffle=True, drop_last=False,
            policy=AugmentPolicy(
                **{**POLICY, "randaugment_ops": ops}, randaugment_magnitude=MAGNITUDE
            ),
        )
        for ops in (POLICY["randaugment_ops"], 0)
    )  # fmt: skip
    rows = [
        ("timm RandAugment (PIL, per image, 1 process; no cutout)", timm_pass, cpu),
        ("ours --loader cpu (albumentations, per image, 1 process)", lambda: cpu_loader, cpu),
        (f"ours --loader device ({device.type}, batched)", lambda: dev_ra, device),
        (f"ours --loader device ({device.type}), no RandAugment", lambda: dev_plain, device),
    ]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {n} random {size}x{size} images, batch {args.batch_size}, median of {args.rounds}")
    # Rounds alternate over the loaders, so that a machine's drift hits them alike.
    times: list[list[float]] = [[] for _ in rows]
    for r in range(args.rounds + 1):
        for (_, passes, dev), row_times in zip(rows, times, strict=True):
            t = _seconds_per_pass(passes, dev)
            if r > 0:  # the first round warms up
                row_times.append(t)
    print(f"{'loader':60s} {'images/s':>10s} {'vs timm':>8s}")
    rates = [n / statistics.median(t) for t in times]
    for (name, _, _), rate in zip(rows, rates, strict=True):
        print(f"{name:60s} {rate:10,.0f} {rate / rates[0]:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
