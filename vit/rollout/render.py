"""Drawing maps: heatmaps, overlays and the image | heatmap | overlay grid."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["colorize", "overlay", "rollout_grid"]


def colorize(maps: Tensor) -> Tensor:
    """Maps (B, H, W) in [0, 1] → RGB heatmaps (B, 3, H, W) with the jet colormap.

    The piecewise-linear jet ramp is written out so rendering needs no matplotlib.
    """
    x = maps.clamp(0, 1)[:, None]
    centres = torch.tensor([0.75, 0.5, 0.25], device=maps.device)[None, :, None, None]  # r, g, b
    return (1.5 - (4 * x - 4 * centres).abs()).clamp(0, 1)


def overlay(display: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend RGB images (B, 3, H, W) in [0, 1] with the heatmaps of ``maps`` (B, H, W)."""
    return ((1 - alpha) * display + alpha * colorize(maps)).clamp(0, 1)


def rollout_grid(display: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """One (3, H', W') image: a row per image with image | heatmap | overlay."""
    from torchvision.utils import make_grid

    heat = colorize(maps)
    rows = torch.stack([display, heat, overlay(display, maps, alpha)], dim=1)  # (B, 3, C, H, W)
    return make_grid(rearrange(rows, "b k c h w -> (b k) c h w"), nrow=3, padding=2, pad_value=1.0)
