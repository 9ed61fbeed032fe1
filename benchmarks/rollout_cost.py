"""Cost of attention-rollout maps against a plain forward pass of the same batch.

Target (issue 4): maps for a batch of 64 images cost at most 2x a plain (fused-attention) forward.
The two are timed alternately in one process, so load from other processes hits both alike.

    python benchmarks/rollout_cost.py [--model vit_tiny_patch4_32] [--batch-size 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vit.models import create_model
from vit.rollout import overlay, rollout_maps


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch4_32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device).eval()
    size = model.patch_embed.img_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    display = torch.rand(args.batch_size, 3, size, size)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def maps() -> None:
        rollout_maps(model, images)

    def maps_and_overlays() -> None:
        overlay(display, rollout_maps(model, images).cpu())

    cases = {
        "forward (fused attention)": forward,
        "rollout maps": maps,
        "maps + overlays": maps_and_overlays,
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_time(fn, device))

    base = statistics.median(times["forward (fused attention)"])
    best = min(times["forward (fused attention)"])
    print(
        f"model {args.model}, batch {args.batch_size}, {size}x{size} images, device {device}, "
        f"torch threads {torch.get_num_threads()}, {args.repeats} alternating repeats"
    )
    # The minimum is the least disturbed by other processes; the median shows the spread.
    print(
        f"| {'case':<26} | {'median ms':>9} | {'x forward':>9} | {'min ms':>7} | {'x forward':>9} |"
    )
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 11}|")
    for name, ts in times.items():
        t, m = statistics.median(ts), min(ts)
        print(
            f"| {name:<26} | {t * 1e3:>9.1f} | {t / base:>9.2f} | {m * 1e3:>7.1f} | "
            f"{m / best:>9.2f} |"
        )


if __name__ == "__main__":
    main()
