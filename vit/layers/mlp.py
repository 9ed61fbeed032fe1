"""The Transformer's position-wise feed-forward network."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """Position-wise feed-forward network (Vaswani et al. 2017 §3.3): Linear → act → Linear."""

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
