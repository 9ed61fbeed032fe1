"""Pre-norm Transformer blocks ("Add & Norm" with the norm first): the encoder block of ViT and the
decoder block of the captioner (Vaswani et al. 2017 §3.1; Dosovitskiy et al. 2021 §3.1)."""

from __future__ import annotations

from torch import Tensor, nn

from vit.layers.attention import Attention, CrossAttention
from vit.layers.drop import DropPath
from vit.layers.layer_scale import LayerScale
from vit.layers.mlp import FeedForward

__all__ = ["DecoderBlock", "EncoderBlock"]


def _maybe(module: nn.Module, enabled: bool) -> nn.Module:
    """Options that are off become ``nn.Identity`` so ``forward`` has no branches."""
    return module if enabled else nn.Identity()


def _residual_branch(
    dim: int, drop_path: float, layer_scale_init: float | None = None
) -> tuple[nn.Module, nn.Module]:
    """What wraps a residual branch's sub-layer output: ``(layer_scale, drop_path)``, each
    ``nn.Identity`` when off (``layer_scale_init`` None, ``drop_path`` 0)."""
    layer_scale = _maybe(LayerScale(dim, layer_scale_init or 0.0), layer_scale_init is not None)
    return layer_scale, _maybe(DropPath(drop_path), drop_path > 0.0)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block: ``x + MHSA(LN(x))``, then ``x + FFN(LN(x))``.

    Deliberate deviation from Vaswani et al. (post-norm): LayerNorm sits before each sub-layer, as
    in ViT (Dosovitskiy et al. 2021), which trains stably without learning-rate warmup tricks.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.ls1, self.drop_path1 = _residual_branch(dim, drop_path, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FeedForward(
            dim, hidden_dim=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop
        )
        self.ls2, self.drop_path2 = _residual_branch(dim, drop_path, layer_scale_init)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        num_queries: int | None = None,
    ) -> Tensor:
        """``x`` (B, L, D) → (B, L, D); with ``num_queries`` only the first ``num_queries`` tokens
        are updated (attending to all L) and returned, (B, num_queries, D)."""
        shortcut = x if num_queries is None else x[:, :num_queries]
        x = shortcut + self.drop_path1(
            self.ls1(
                self.attn(
                    self.norm1(x),
                    attn_mask=attn_mask,
                    key_padding_mask=key_padding_mask,
                    num_queries=num_queries,
                )
            )
        )
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class DecoderBlock(nn.Module):
    """Pre-norm Transformer decoder block (Vaswani et al. 2017 §3.1, with pre-norm as in ViT):

    ``x + MaskedMHSA(LN(x))`` → ``x + CrossAttention(LN(x), memory)`` → ``x + FFN(LN(x))``.

    Options as :class:`EncoderBlock`'s (no layer scale); ``context_dim``: the memory's width
    (default ``dim``), which cross-attention projects from."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(
            dim,
            context_dim=context_dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FeedForward(
            dim, hidden_dim=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop
        )
        self.drop_path = _maybe(DropPath(drop_path), drop_path > 0.0)  # shared by the branches

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        self_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: dict[str, dict[str, Tensor]] | None = None,
    ) -> Tensor:
        """``x`` (B, T, D) tokens so far, ``memory`` (B, S, D_mem) encoder output.

        Self-attention is always causal; ``self_mask`` adds to it. ``padding_mask`` (B, T) and
        ``memory_padding_mask`` (B, S) mark padding with True. ``cache`` ({"self": {}, "cross": {}})
        keeps keys/values between decode steps, so a step costs one token's work.
        """
        self_cache = cache.setdefault("self", {}) if cache is not None else None
        cross_cache = cache.setdefault("cross", {}) if cache is not None else None
        x = x + self.drop_path(
            self.self_attn(
                self.norm1(x),
                attn_mask=self_mask,
                key_padding_mask=padding_mask,
                is_causal=True,
                cache=self_cache,
            )
        )
        x = x + self.drop_path(
            self.cross_attn(
                self.norm2(x), memory, key_padding_mask=memory_padding_mask, cache=cross_cache
            )
        )
        x = x + self.drop_path(self.mlp(self.norm3(x)))
        return x
