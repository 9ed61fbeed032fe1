"""Activation checkpointing's trade: the memory a training step saves and the time it costs.

``model.set_grad_checkpointing()`` keeps only each block's input in the forward pass and recomputes
the block in the backward pass (``torch.utils.checkpoint``, non-reentrant). For each model and
batch size, one training step (forward, backward, AdamW step; random images, cross-entropy) runs
with checkpointing off and on:

- peak memory of the step above what was allocated before it: on CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``); on the CPU the process's peak resident set (VmHWM)
  above its resident set before the step, each configuration in a fresh process after one
  warm-up step, so that one configuration's peak cannot hide another's;
- the median time of a step over ``--steps`` steps after warm-up (CUDA-synchronised).

    python benchmarks/grad_checkpointing.py [--device cpu|cuda] [--models vit_tiny_patch4_32 ...]
        [--batch-sizes 128 256] [--steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.models import create_model


def _rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS: resident now, VmHWM: peak resident), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(model_name: str, batch: int, checkpointing: bool, device: str, steps: int) -> dict:
    """One configuration in this process: ``{"peak_mib": ..., "step_ms": ...}``."""
    torch.manual_seed(0)
    model = create_model(model_name).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.config.img_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: optimizer state and gradients exist from now on, as in training
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kib("VmRSS") * 1024
        step()
        peak = _rss_kib("VmHWM") * 1024 - before
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak / 2**20, "step_ms": 1000 * statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch4_32", "vit_small_patch16_224"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a seconds-long check of the script")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # MODEL BATCH CKPT(0|1) STEPS
    args = p.parse_args()
    if args.one:
        model, batch, ckpt, steps = args.one
        print(json.dumps(measure(model, int(batch), ckpt == "1", args.device, int(steps))))
        return
    if args.quick:
        args.models, args.batch_sizes, args.steps = ["vit_tiny_patch4_32"], [8], 1
    where = torch.cuda.get_device_name() if args.device == "cuda" else describe_cpu()
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| model | batch | peak MiB off | peak MiB on | memory saved | ms/step off | ms/step on "
        "| time cost |\n|---|---|---|---|---|---|---|---|"
    )
    for model in args.models:
        for batch in args.batch_sizes:
            off, on = (_run(model, batch, c, args) for c in ("0", "1"))
            saved = 1 - on["peak_mib"] / off["peak_mib"]
            cost = on["step_ms"] / off["step_ms"] - 1
            print(
                f"| {model} | {batch} | {off['peak_mib']:.0f} | {on['peak_mib']:.0f} | "
                f"{saved:.0%} | {off['step_ms']:.0f} | {on['step_ms']:.0f} | {cost:+.0%} |"
            )


def _run(model: str, batch: int, ckpt: str, args: argparse.Namespace) -> dict:
    """:func:`measure` in a fresh process (CPU peaks are per process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--device", args.device, "--one", model, str(batch), ckpt,
         str(args.steps)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
