"""Muon's cost on the CPU: one optimizer step alone (AdamW, timm's Muon, ours), and whole
data-parallel training steps on two gloo ranks (one thread each) with AdamW, with ours, and with
ours splitting its Newton-Schulz iterations over the two ranks (what the engine does under DDP).

The model and optimizers are built as the engine builds them (``vit.train.build_optimizer``:
timm's parameter groups, AdamW for the patch embedding, head and 1-D parameters); timm's Muon
gets the same groups. A lone optimizer step gets random gradients; a training step is a forward
and backward pass of each rank's share of the recipe's batch (random images), DDP's gradient
all-reduce and the optimizer step, counted until the slower rank is done. Times are medians,
after warm-up steps; the two-rank variants alternate in rounds so that a machine's drift hits
them alike.

    python benchmarks/optimizer_step.py [--config configs/cifar10_cpu_30min.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import timm.optim
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.engine.config import RunConfig, load_config, make_config
from vit.engine.optim import build_optimizer
from vit.models import create_model

# name: (optimizer, whether the ranks split Muon's Newton-Schulz iterations)
DDP_VARIANTS = {
    "AdamW": ("adamw", False),
    "ours, each rank all matrices": ("muon", False),
    "ours, split over the ranks": ("muon", True),
}


def _model(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(cfg.model, num_classes=10, img_size=cfg.img_size, **cfg.model_args)


def _optimizer_step_ms(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int) -> float:
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(steps + 2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        t0 = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rank(
    rank: int, port: int, cfg: RunConfig, rounds: int, steps: int, out: mp.SimpleQueue
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model(cfg)
    ddp = DistributedDataParallel(model)
    share = cfg.batch_size // 2
    x, y = torch.randn(share, 3, cfg.img_size, cfg.img_size), torch.randint(0, 10, (share,))
    times: dict[str, list[float]] = {v: [] for v in DDP_VARIANTS}
    for _ in range(rounds):
        for variant, (optimizer, split) in DDP_VARIANTS.items():
            run_cfg = dataclasses.replace(cfg, optimizer=optimizer)
            opt = build_optimizer(model, run_cfg, distributed=split)
            for i in range(steps + 2):
                dist.barrier()
                t0 = time.perf_counter()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
                if i >= 2:
                    times[variant].append(time.perf_counter() - t0)
    out.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def ddp_step_ms(cfg: RunConfig, rounds: int, steps: int) -> dict[str, float]:
    """Median training-step time of each variant on two gloo ranks: the slower rank's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    args = (port, cfg, rounds, steps, out)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    times = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank exited with {p.exitcode}")
    return {
        v: statistics.median(max(a, b) for a, b in zip(times[0][v], times[1][v], strict=True)) * 1e3
        for v in DDP_VARIANTS
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10_cpu_30min.yaml")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds on two ranks")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = make_config(load_config(args.config))
    muon_cfg = dataclasses.replace(cfg, optimizer="muon")
    params = sum(p.numel() for p in _model(cfg).parameters())
    print(f"{describe_cpu()}, one thread per process, torch {torch.__version__}")
    print(f"{cfg.model} {cfg.model_args}: {params / 1e6:.2f}M parameters\n")

    def timm_muon(m: torch.nn.Module) -> torch.optim.Optimizer:
        keys = ("params", "weight_decay", "use_fallback")  # the same groups, fallback included
        groups = [{k: g[k] for k in keys} for g in build_optimizer(m, muon_cfg).param_groups]
        return timm.optim.Muon(groups, lr=cfg.lr, nesterov=True)

    alone = {}
    for name, make in (
        (
            "AdamW (torch, foreach)",
            lambda m: build_optimizer(m, dataclasses.replace(cfg, optimizer="adamw")),
        ),
        ("timm Muon (bf16 Newton-Schulz)", timm_muon),
        ("ours (fp32 Newton-Schulz)", lambda m: build_optimizer(m, muon_cfg)),
    ):
        m = _model(cfg)
        alone[name] = _optimizer_step_ms(make(m), m, args.steps)
    timm_ms = alone["timm Muon (bf16 Newton-Schulz)"]
    print("| optimizer step alone, one process | ms | vs timm Muon |\n|---|---|---|")
    for name, ms in alone.items():
        print(f"| {name} | {ms:.1f} | {timm_ms / ms:.1f}x faster |")

    steps = ddp_step_ms(cfg, args.rounds, args.steps)
    unsplit = steps["ours, each rank all matrices"]
    print(f"\n| training step, 2 ranks x {cfg.batch_size // 2} images | ms | vs ours unsplit |")
    print("|---|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.1f} | {unsplit / ms:.2f}x |")


if __name__ == "__main__":
    main()
