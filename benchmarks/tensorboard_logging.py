"""Extra time per validation of the TensorBoard pictures, against a validation without them.

At each validation the classification task writes the labelled confusion figure and its top
confusions (always), the attention-map picture of its fixed sample (``--rollout-every``, on by
default), and optionally the per-block maps (``--rollout-per-layer``) and the class-specific
gradient map (``--rollout-gradient``). Each case is timed as the engine runs it
(``task.on_epoch_end`` into a real ``SummaryWriter``, flushed), alternately in one process so load
from other processes hits all alike, and set against the validation pass itself.

    python benchmarks/tensorboard_logging.py [--model vit_tiny_patch4_32] [--repeats 10]
    python benchmarks/tensorboard_logging.py --quick   # a smoke run: tiny model, one repeat
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_cpu

from vit.engine.config import make_config
from vit.engine.trainer import Trainer

CASES = {
    "validation pass (reference)": None,
    "maps off (confusion figure + text)": {"rollout_every": 0},
    "maps on (default)": {"rollout_every": 1},
    "maps + per-layer": {"rollout_every": 1, "rollout_per_layer": True},
    "maps + gradient": {"rollout_every": 1, "rollout_gradient": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch4_32")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=1000, help="synthetic validation set")
    parser.add_argument("--rollout-images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (a check)")
    args = parser.parse_args()

    values = {
        "data": "synthetic",
        "model": args.model,
        "img_size": args.img_size,
        "synthetic_train": 256,
        "synthetic_val": args.val_images,
        "batch_size": 128,
        "epochs": 1,
        "rollout_images": args.rollout_images,
        "device": args.device,
    }
    if args.quick:
        values |= {"model_args": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
        values |= {"synthetic_val": 64, "img_size": 16}
        args.repeats = 1
    with tempfile.TemporaryDirectory() as out:
        from torch.utils.tensorboard import SummaryWriter

        trainer = Trainer(make_config({**values, "out_dir": out}))
        task, model = trainer.task, trainer.eval_model()
        base_cfg = task.cfg
        writer = SummaryWriter(out)

        def run(name: str) -> float:
            overrides = CASES[name]
            sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            if overrides is None:
                trainer.validate()
            else:
                task.cfg = dataclasses.replace(base_cfg, **overrides)
                task.on_epoch_end(writer, model, 0, 0)
                writer.flush()
            sync()
            return time.perf_counter() - start

        trainer.validate()  # sets the confusion matrix the pictures draw
        for name in CASES:  # warm-up: imports (matplotlib), first-call allocations
            run(name)
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(args.repeats):
            for name in CASES:
                times[name].append(run(name))
        writer.close()
    validation = statistics.median(times["validation pass (reference)"])
    off = statistics.median(times["maps off (confusion figure + text)"])
    cfg = trainer.cfg
    print(
        f"model {cfg.model} ({cfg.img_size}x{cfg.img_size}), {len(trainer.val_set)} validation "
        f"images, {min(cfg.rollout_images, 10)} map images, device {trainer.device} "
        f"({describe_cpu() if trainer.device.type == 'cpu' else torch.cuda.get_device_name()}), "
        f"torch threads {torch.get_num_threads()}, {args.repeats} alternating repeats"
    )
    head = ("case", "median ms", "min ms", "+ ms vs off", "% of val")
    print(f"| {head[0]:<36} | {head[1]:>9} | {head[2]:>8} | {head[3]:>11} | {head[4]:>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 13}|{'-' * 10}|")
    for name, ts in times.items():
        t = statistics.median(ts)
        extra = "" if CASES[name] is None else f"{(t - off) * 1e3:+.0f}"
        share = "" if CASES[name] is None else f"{t / validation:.0%}"
        print(
            f"| {name:<36} | {t * 1e3:>9.0f} | {min(ts) * 1e3:>8.0f} | {extra:>11} | {share:>8} |"
        )


if __name__ == "__main__":
    main()
