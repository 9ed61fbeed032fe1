"""Throughput of the Compact Convolutional Transformer with each convolutional attention module in
its tokenizer, beside the plain ViT of the CPU recipe.

Rows: the recipe's model (``--config``'s ``model`` and ``model_args``: ViT with 4-pixel patches,
width 128, depth 6, patch dropout 0.5), timm's ``VisionTransformer`` of the same shape (the one
model timm has to compare with: timm has no CCT), then ``--models`` (default CCT-7/3x1) with no
attention module and with each of :data:`vit.layers.conv_attention.CONV_ATTENTION` after its
tokenizer stage(s) (``conv_attention=NAME``). The ratio columns are against the recipe's ViT row.

Images/second for a training step (forward + backward + AdamW step, train mode: dropout, stochastic
depth and patch dropout as configured) and for inference (eval mode, ``torch.inference_mode``),
on random 32-pixel images, fp32. Every round times each model once, in a rotating order, so a
shared machine's drift hits them alike; the table reports the median over the rounds.

    python benchmarks/conv_attention.py --threads 1                   # batch 128, a few minutes
    python benchmarks/conv_attention.py --threads 1 --models cct_2_3x2_32 cct_4_3x2_32 \\
        --attention none cbam
    python benchmarks/conv_attention.py --quick                        # smoke run, tiny settings
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import timm
import torch
from torch import nn

from benchmarks.machine import describe_cpu
from benchmarks.throughput import make_step, timm_twin
from vit.engine.config import load_config, make_config
from vit.layers.conv_attention import CONV_ATTENTION
from vit.models import create_model, list_models, num_params

ATTENTIONS = ["none", *sorted(CONV_ATTENTION)]
COLUMNS = ["model", "conv attention", "params", "train img/s", "infer img/s"]
COLUMNS += ["train vs ViT", "infer vs ViT"]


def build_models(args: argparse.Namespace) -> dict[str, tuple[str, str, nn.Module]]:
    """label → (model name, conv attention, model), the recipe's ViT first."""
    cfg = make_config(load_config(args.config))
    torch.manual_seed(0)
    recipe = create_model(cfg.model, num_classes=10, img_size=32, **cfg.model_args)
    twin = timm_twin(recipe.config)
    twin.patch_drop = timm.layers.PatchDropout(recipe.config.patch_drop_rate)
    models = {
        "recipe": (cfg.model, "(recipe's ViT)", recipe),
        "timm": ("timm VisionTransformer", "(same shape)", twin),
    }
    for name in args.models:
        for attention in args.attention:
            extra = {} if attention == "none" else {"conv_attention": attention}
            model = create_model(name, num_classes=10, img_size=32, **extra)
            models[f"{name}/{attention}"] = (name, attention, model)
    return models


def measure(models: dict[str, tuple[str, str, nn.Module]], args: argparse.Namespace) -> dict:
    """label → mode → median images/s."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    results: dict[str, dict[str, float]] = {label: {} for label in models}
    for mode in ("train", "infer"):
        steps = {
            label: make_step(model, mode == "train", x, y, contextlib.nullcontext)
            for label, (_, _, model) in models.items()
        }
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        rates: dict[str, list[float]] = {label: [] for label in models}
        order = list(models)
        for r in range(args.rounds):
            for label in order[r % len(order) :] + order[: r % len(order)]:  # rotate the start
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[label]()
                rates[label].append(args.steps * args.batch_size / (time.perf_counter() - start))
        for label in models:
            results[label][mode] = statistics.median(rates[label])
            print(f"  {label} {mode}: {results[label][mode]:.1f} img/s", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cifar10_cpu_30min.yaml", help="the recipe")
    parser.add_argument("--models", nargs="+", default=["cct_7_3x1_32"], help="cct_* variants")
    parser.add_argument("--attention", nargs="+", default=ATTENTIONS, choices=ATTENTIONS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per model and mode")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: batch 8, one round, no warm-up"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.rounds, args.steps, args.warmup = 8, 1, 1, 0
    unknown = [m for m in args.models if m not in list_models("cct_*")]
    if unknown:
        print(
            f"error: unknown model(s) {unknown}; choose from {list_models('cct_*')}",
            file=sys.stderr,
        )
        return 2
    if min(args.batch_size, args.rounds, args.steps, args.threads or 1) < 1 or args.warmup < 0:
        print(
            "error: --batch-size, --rounds, --steps and --threads must be >= 1, --warmup >= 0",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_models(args)
    print(
        f"# {describe_cpu()}, {torch.get_num_threads()} threads, fp32, batch {args.batch_size}, "
        f"32 px, median of {args.rounds} rotating rounds x {args.steps} steps, "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )
    results = measure(models, args)
    base = results["recipe"]
    print(f"| {' | '.join(COLUMNS)} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, (name, attention, model) in models.items():
        r = results[label]
        print(
            f"| {name} | {attention} | {num_params(model) / 1e6:.3f}M | {r['train']:.1f} | "
            f"{r['infer']:.1f} | {r['train'] / base['train']:.3f} | "
            f"{r['infer'] / base['infer']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
