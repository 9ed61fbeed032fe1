"""Throughput of our ViT against timm's ``VisionTransformer`` of identical shape and weights.

Measures images/second for a training step (forward + backward + AdamW step) and for inference
(eval mode, ``torch.inference_mode``). The two implementations are timed alternately in one
process — warm-up first, then rounds of ours/timm whose order flips every round — and the table
reports the median of each with the ratio ours/timm (> 1: ours is faster). Same batch, dtype,
threads and mode for both. CPU runs fp32 unless ``--amp bf16``; CUDA runs bf16 autocast.

    python benchmarks/throughput.py                                   # tiny + small, CPU
    python benchmarks/throughput.py --models vit_tiny_patch4_32 --batch-size 128 --rounds 20
    python benchmarks/throughput.py --device cuda --batch-size 256    # bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from benchmarks.machine import describe_cpu
from vit.models import ViTConfig, create_model, list_models
from vit.timm_interop import convert_timm_state_dict


def timm_twin(config: ViTConfig) -> nn.Module:
    """timm's VisionTransformer with the architecture of ``config`` (the converse of from_timm)."""
    return TimmViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool="token" if config.pool == "cls" else "avg",
        class_token=bool(config.class_token),
        fc_norm=config.fc_norm,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        init_values=config.layer_scale_init,
    )


def make_step(
    model: nn.Module, train: bool, x: torch.Tensor, y: torch.Tensor, autocast: Callable
) -> Callable[[], None]:
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        model.eval()

        @torch.inference_mode()
        def step() -> None:
            with autocast():
                model(x)

    return step


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    ours = create_model(name, num_classes=10)
    theirs = timm_twin(ours.config)
    ours.load_state_dict(convert_timm_state_dict(theirs.state_dict()))  # same weights
    ours.to(device)
    theirs.to(device)
    cfg = ours.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,), generator=gen)
    x, y = x.to(device), y.to(device)
    if args.amp == "bf16":

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=torch.bfloat16)

    else:
        autocast = contextlib.nullcontext

    rows = []
    for mode in ("train", "infer"):
        steps = {
            "ours": make_step(ours, mode == "train", x, y, autocast),
            "timm": make_step(theirs, mode == "train", x, y, autocast),
        }
        for step in steps.values():
            time_steps(step, args.warmup, device)
        rates: dict[str, list[float]] = {"ours": [], "timm": []}
        order = ["ours", "timm"]
        for _ in range(args.rounds):
            for impl in order:
                seconds = time_steps(steps[impl], args.steps, device)
                rates[impl].append(args.steps * args.batch_size / seconds)
            order.reverse()  # neither implementation always runs first
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append((name, mode, med["ours"], med["timm"], med["ours"] / med["timm"]))
        print(
            f"  {name} {mode}: ours {med['ours']:.1f}  timm {med['timm']:.1f}  "
            f"ratio {med['ours'] / med['timm']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit_tiny_patch4_32", "vit_small_patch4_32"]
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per implementation")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--amp",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="auto: bf16 on CUDA, else off",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default)")
    args = parser.parse_args(argv)

    unknown = [m for m in args.models if m not in list_models("vit_*")]
    if unknown:
        choices = ", ".join(list_models("vit_*"))
        print(f"error: unknown model(s) {unknown}; choose from {choices}", file=sys.stderr)
        return 2
    if min(args.batch_size, args.rounds, args.steps, args.threads or 1) < 1 or args.warmup < 0:
        print(
            "error: --batch-size, --rounds, --steps and --threads must be >= 1, --warmup >= 0",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.amp == "auto":
        args.amp = "bf16" if args.device == "cuda" else "off"
    device = torch.device(args.device)

    dtype = "bf16 autocast" if args.amp == "bf16" else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    print(
        f"# {where}, {torch.get_num_threads()} threads, {dtype}, batch {args.batch_size}, "
        f"median of {args.rounds} alternating rounds x {args.steps} steps, "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )
    rows = [row for name in args.models for row in bench(name, args, device)]
    print("| model | mode | ours img/s | timm img/s | ours/timm |")
    print("|---|---|---:|---:|---:|")
    for name, mode, ours, theirs, ratio in rows:
        print(f"| {name} | {mode} | {ours:.1f} | {theirs:.1f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
