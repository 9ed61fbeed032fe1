"""Data-parallel training (DDP) under torchrun: joining and leaving the process group."""

from __future__ import annotations

import os

import torch

from vit.engine.config import RunConfig, resolve_device
from vit.errors import ConfigError

__all__ = ["init_distributed", "leave_process_group", "world_size"]


def world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Under torchrun (``WORLD_SIZE`` > 1) this process joins the
    group from torchrun's environment: nccl with one GPU per process (``LOCAL_RANK``) on CUDA,
    gloo on the CPU. ``batch_size`` stays the global batch and must divide among the ranks. On
    CUDA, TF32 matmuls are allowed and cuDNN's fused attention is off (see below)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's fused attention backward returns NaN gradients on Hopper GPUs in known cases
        # (pytorch/pytorch#196678); two bf16 CIFAR runs on an H100 stopped with a NaN loss
        # (steps 566 and 1268, sound gradient norms before). Flash and memory-efficient attention
        # take over at the same speed.
        torch.backends.cuda.enable_cudnn_sdp(False)
    world = world_size()
    if world == 1:
        return 0, 1, device
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch and must divide among the "
            f"{world} processes; use a multiple of {world}"
        )
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def leave_process_group(*, agreed: bool) -> None:
    """End DDP: after an exit every rank agreed on, wait for the others first (rank 0 may still
    be writing the last checkpoint); after a one-rank error, leave at once (torchrun stops the
    rest) rather than wait in a barrier the others never reach."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if agreed:
            dist.barrier()
        dist.destroy_process_group()
