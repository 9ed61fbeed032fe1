"""Fixed positional encodings: the 1-D sinusoid of Vaswani et al. (2017, §3.5) and the 2-D sin-cos
of MoCo v3 / "Better plain ViT baselines"."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sincos_2d_position_encoding", "sinusoidal_position_encoding"]


def sinusoidal_position_encoding(length: int, dim: int) -> Tensor:
    """The 1-D encoding of Vaswani et al. (2017, §3.5), shape (length, dim):

    ``PE[pos, 2i] = sin(pos / 10000^(2i/dim))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))``.
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal position encoding needs an even width, got {dim}")
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


def sincos_2d_position_encoding(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos encoding (Chen et al. 2021, MoCo v3; Beyer et al. 2022, "Better plain ViT
    baselines"), shape (grid_h·grid_w, dim): half the channels encode the row, half the column."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position encoding needs a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y = ys.flatten()[:, None] * omega[None]
    x = xs.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()
