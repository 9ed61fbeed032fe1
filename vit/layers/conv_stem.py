"""The Compact Convolutional Transformer's tokenizer and sequence pooling.

Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers", Sec. 3: a few
convolution → ReLU → max-pool stages replace ViT's patch embedding (Sec. 3.3), and an attention
pooling over the output tokens replaces the class token (SeqPool, Sec. 3.2). Layer shapes,
initialisation and parameter names follow the authors' code (SHI-Labs/Compact-Transformers), so
CCT-7/3x1 has the paper's 3.76M parameters and the checkpoints' keys line up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from itertools import pairwise
from typing import Any

from torch import Tensor, nn

from vit.errors import did_you_mean
from vit.layers.conv_attention import create_conv_attention

__all__ = ["ConvTokenizer", "SequencePool", "conv_grid_size"]


@dataclass(frozen=True)
class _Stage:
    """A tokenizer stage's convolution and max-pool settings; the defaults are CCT's."""

    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    pool_kernel: int = 3
    pool_stride: int = 2
    pool_padding: int = 1

    @classmethod
    def of(cls, settings: Mapping[str, int]) -> _Stage:
        """The stage for keyword ``settings``; an unknown name is a TypeError naming the options."""
        names = [f.name for f in fields(cls)]
        for key in settings:
            if key not in names:
                raise TypeError(
                    f"unknown ConvTokenizer option {key!r}{did_you_mean(key, names)} "
                    f"(stage options: {', '.join(names)})"
                )
        return cls(**settings)

    def out_length(self, n: int) -> int:
        """Output length of the convolution, then the max-pool (dilation 1, floor mode), over
        ``n`` inputs."""
        n = (n + 2 * self.padding - self.kernel_size) // self.stride + 1
        return (n + 2 * self.pool_padding - self.pool_kernel) // self.pool_stride + 1

    def grid(self, img_size: int | tuple[int, int], num_layers: int) -> tuple[int, int]:
        rows, cols = (img_size, img_size) if isinstance(img_size, int) else img_size
        for _ in range(num_layers):
            rows, cols = self.out_length(rows), self.out_length(cols)
        return rows, cols


def conv_grid_size(
    img_size: int | tuple[int, int], *, num_layers: int, **stage: int
) -> tuple[int, int]:
    """The (rows, columns) token grid of ``ConvTokenizer(num_layers=num_layers, **stage)`` for
    ``img_size`` (int or (H, W)) images, without building one (``stage``: the tokenizer's
    convolution and max-pool settings, with its defaults)."""
    return _Stage.of(stage).grid(img_size, num_layers)


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer (Hassani et al. 2021, Sec. 3.3):
    ``x₀ = MaxPool(ReLU(Conv2d(x)))``, repeated ``num_layers`` times, then flattened to tokens.

    Stage widths are ``in_chans → hidden_channels → … → embed_dim`` (the last stage outputs
    ``embed_dim``); convolutions have no bias and Kaiming-normal weights, as in CCT. With
    ``attention`` set (a key of :data:`vit.layers.conv_attention.CONV_ATTENTION`), that module,
    built with ``attention_kwargs``, follows each stage's max-pool; it is not part of CCT.

    ``stage``: every stage's convolution (``kernel_size`` 3, ``stride`` 1, ``padding`` 1) and
    max-pool (``pool_kernel`` 3, ``pool_stride`` 2, ``pool_padding`` 1) settings; the defaults
    are CCT's.

    Shapes: (B, in_chans, H, W) -> (B, N, embed_dim), ``N = prod(grid_size((H, W)))``.

    Raises:
        ValueError: ``num_layers`` < 1, or ``attention`` is not a registered name.
        TypeError: a ``stage`` keyword that is none of the above.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dim: int,
        num_layers: int,
        hidden_channels: int = 64,
        attention: str | None = None,
        attention_kwargs: Mapping[str, Any] | None = None,
        **stage: int,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ConvTokenizer needs num_layers >= 1, got {num_layers}")
        widths = [in_chans] + [hidden_channels] * (num_layers - 1) + [embed_dim]
        self._stage = spec = _Stage.of(stage)
        # `conv_layers.{i}.0.weight` is CCT's own key for stage i's convolution.
        self.conv_layers = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, spec.kernel_size, spec.stride, spec.padding, bias=False),
                    nn.ReLU(),
                    nn.MaxPool2d(spec.pool_kernel, spec.pool_stride, spec.pool_padding),
                    create_conv_attention(attention, c_out, **(attention_kwargs or {}))
                    if attention is not None
                    else nn.Identity(),
                )
                for c_in, c_out in pairwise(widths)
            )
        )
        for i in range(num_layers):  # CCT: fan_in, gain sqrt(2)
            nn.init.kaiming_normal_(self.get_parameter(f"conv_layers.{i}.0.weight"))

    def grid_size(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """The (rows, columns) of the token grid for ``img_size`` (int or (H, W)) images."""
        return self._stage.grid(img_size, len(self.conv_layers))

    def num_tokens(self, img_size: int | tuple[int, int]) -> int:
        """Sequence length N for ``img_size`` images (sizes the positional embedding)."""
        rows, cols = self.grid_size(img_size)
        return rows * cols

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_layers(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)


class SequencePool(nn.Module):
    """CCT's sequence pooling (Hassani et al. 2021, Sec. 3.2): a linear layer scores
    each token, a softmax over the N tokens turns the scores into weights, and the output is the
    weighted sum of the tokens. ``x_L`` (B, N, D) -> (B, D).

    :meth:`forward_with_weights` also returns the (B, N) weights; ``recorder`` (a callable, e.g.
    ``list.append``) receives them on every forward while set. Initialised as CCT: truncated
    normal weights (std 0.02), zero bias.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_pool = nn.Linear(dim, 1)  # CCT's name for the scoring layer
        nn.init.trunc_normal_(self.attention_pool.weight, std=0.02)
        nn.init.zeros_(self.attention_pool.bias)
        self.recorder: Callable[[Tensor], None] | None = None

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (B, N, D) → ``(pooled (B, D), weights (B, N))``."""
        weights = self.attention_pool(x).squeeze(-1).softmax(dim=-1)  # (B, N, 1) -> (B, N)
        pooled = (weights.unsqueeze(1) @ x).squeeze(1)  # (B, 1, N) @ (B, N, D) -> (B, D)
        if self.recorder is not None:
            self.recorder(weights)
        return pooled, weights

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, N, D) → (B, D). One return type: ``torch.jit.script`` compiles it."""
        return self.forward_with_weights(x)[0]
