"""Regularisers that drop work: stochastic depth (DropPath) and patch dropout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DropPath", "PatchDropout"]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch with probability
    ``p`` during training, scaling the kept ones by ``1/(1-p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchDropout(nn.Module):
    """Patch dropout (Liu et al. 2022; FLIP, Li et al. 2023): in training, each sample keeps a
    random ``int(N * (1 - p))`` of its N patch tokens (the prefix tokens always stay), so every
    block runs on fewer tokens: a cheaper step that also regularises. The kept tokens carry their
    position embedding, and evaluation sees every token. Draws its randomness as timm's
    ``PatchDropout`` does, so the two agree under the same seed."""

    def __init__(self, p: float = 0.0, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - self.p)))
        idx = torch.argsort(torch.randn(b, n, device=x.device), dim=-1)[:, :keep]
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}, num_prefix_tokens={self.num_prefix_tokens}"
