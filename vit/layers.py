"""Transformer building blocks, each defined once and shared by the classifier and the captioner.

References: Vaswani et al. 2017, "Attention Is All You Need" (attention, sinusoidal encoding, the
encoder/decoder blocks); Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (patch embedding,
ViT); Huang et al. 2016 (stochastic depth); Touvron et al. 2021, CaiT (layer scale). Additive
attention (Bahdanau et al. 2015) is :mod:`vit.additive_attention`'s, re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "AdditiveAttention",  # noqa: F822 (vit.additive_attention's, re-exported by __getattr__)
    "Attention",
    "DecoderBlock",
    "DropPath",
    "EncoderBlock",
    "FeedForward",
    "LayerScale",
    "PatchDropout",
    "PatchEmbedding",
    "causal_mask",
    "check_images",
    "merge_masks",
    "scaled_dot_product_attention",
    "sincos_2d_position_encoding",
    "sinusoidal_position_encoding",
]


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Explicit reference attention: ``softmax(q·kᵀ·scale + mask)·v`` (Vaswani et al. 2017, eq. 1).

    Args:
        q: (..., L, d_k) queries; k: (..., S, d_k) keys; v: (..., S, d_v) values.
        mask: broadcastable to (..., L, S). Boolean: True marks the keys a query may attend to
            (the convention of ``torch.nn.functional.scaled_dot_product_attention``). Float: added
            to the scores (use ``-inf`` to block).
        scale: multiplies the scores; ``None`` means ``1/sqrt(d_k)``, the head width, not the model
            width.
        dropout_p: dropout on the attention weights (training only; the returned weights are the
            weights before dropout).

    Returns:
        ``(out, weights)``: (..., L, d_v) and the softmax weights (..., L, S).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    weights = _masked_scores(scores, mask).softmax(dim=-1)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return torch.matmul(attn, v), weights


def _masked_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Apply an attention mask to scores: boolean True = may attend (the others get ``-inf``, so
    exactly zero weight), float = added. The one mask convention of every attention here."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def __getattr__(name: str) -> object:
    # AdditiveAttention lives in vit.additive_attention, which imports this module's mask helper,
    # so it is re-exported on first use rather than imported above.
    if name == "AdditiveAttention":
        from vit.additive_attention import AdditiveAttention

        return AdditiveAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Boolean (q_len, k_len) mask, True where query i may attend key j.

    When ``k_len > q_len`` the queries are the last ``q_len`` positions (a key/value cache holds the
    earlier ones), so query i sits at position ``k_len - q_len + i``.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    dtype: torch.dtype,
) -> Tensor | None:
    """Combine an attention mask and a key padding mask into one mask for (B, heads, L, S) scores.

    ``attn_mask``: (L, S) or (B, heads|1, L, S); boolean (True = may attend) or additive float.
    ``key_padding_mask``: (B, S) boolean, True marks padding keys that must be ignored (the
    convention of ``torch.nn.Transformer``).
    """
    if key_padding_mask is None:
        return attn_mask
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}"
        )
    keep = rearrange(~key_padding_mask, "b s -> b 1 1 s")
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.to(dtype).masked_fill(~keep, float("-inf"))


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017 §3.2.2): self-, masked self- and cross-attention.

    Self-attention projects q, k and v with one fused matrix (``to_qkv``); cross-attention
    (``cross=True``) projects queries from ``x`` (``to_q``) and keys/values from ``context``
    (``to_kv``). Scores are scaled by ``1/sqrt(head_dim)``.

    The fast path is ``torch.nn.functional.scaled_dot_product_attention``; the explicit path
    (:func:`scaled_dot_product_attention`) runs only when weights are asked for
    (``need_weights=True``) or a ``recorder`` is set, so training never pays for visualisation.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cross: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"width {dim} is not divisible by num_heads={num_heads}; choose a width that is a "
                f"multiple of the head count (e.g. {num_heads * max(1, round(dim / num_heads))})"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.cross = cross
        if cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.to_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by vit.rollout.capture_attention: called with each forward's (B, heads, L, S) weights.
        self.recorder: Callable[[Tensor], None] | None = None

    def _project(
        self, x: Tensor, context: Tensor | None, cache: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        h = self.num_heads
        if not self.cross:
            qkv = self.to_qkv(x)  # (B, L, 3·D)
            # Split on the `three` axis while tokens stay outermost, then move heads: the same
            # strided views as splitting `three b h n d`, but backward stacks the gradients
            # straight into (B, L, 3, h, d), which saves a full copy of them per block.
            q, k, v = (
                t.transpose(1, 2)  # (B, h, L, d)
                for t in rearrange(qkv, "b n (three h d) -> b n three h d", three=3, h=h).unbind(2)
            )
            if cache is not None:  # decoding: append this step's keys/values to the earlier ones
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
            return q, k, v
        if context is None:
            raise ValueError("cross-attention needs a `context` (the encoder memory)")
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=h)
        if cache is not None and "k" in cache:  # the memory does not change between decode steps
            return q, cache["k"], cache["v"]
        kv = self.to_kv(context)  # (B, S, 2·D)
        k, v = (  # as for self-attention: split before moving heads (a cheaper backward)
            t.transpose(1, 2)  # (B, h, S, d)
            for t in rearrange(kv, "b s (two h d) -> b s two h d", two=2, h=h).unbind(2)
        )
        if cache is not None:
            cache["k"], cache["v"] = k, v
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        is_causal: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
        need_weights: bool = False,
        num_queries: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x`` (B, L, D) to itself, or to ``context`` (B, S, D) when ``cross``.

        ``attn_mask``/``key_padding_mask`` follow :func:`merge_masks`; ``is_causal`` blocks future
        keys; ``cache`` (a dict owned by the caller, one per layer) stores keys/values across decode
        steps. ``num_queries`` (self-attention): only the first ``num_queries`` positions query,
        still over every key; ``attn_mask`` then has ``num_queries`` rows. Returns the output
        (B, L or num_queries, D), or ``(output, weights)`` when ``need_weights``.
        """
        q, k, v = self._project(x, context, cache)
        if num_queries is not None:
            if self.cross or is_causal or cache is not None:
                raise ValueError("num_queries is for plain self-attention (no cross/causal/cache)")
            q = q[:, :, :num_queries]  # (B, h, num_queries, d)
        explicit = need_weights or self.recorder is not None
        fused_causal = False
        # One query (a cached decode step) may see every key: no mask needed. A plain square
        # causal mask is the fused kernel's own `is_causal`, which needs no mask tensor.
        if is_causal and q.shape[2] > 1:
            square = q.shape[2] == k.shape[2]
            if square and not explicit and attn_mask is None and key_padding_mask is None:
                fused_causal = True
            else:
                causal = causal_mask(q.shape[2], k.shape[2], device=q.device)
                if attn_mask is None:
                    attn_mask = causal
                elif attn_mask.dtype == torch.bool:
                    attn_mask = attn_mask & causal
                else:
                    attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if explicit:
            out, weights = scaled_dot_product_attention(q, k, v, mask, self.scale, dropout_p)
            if self.recorder is not None:
                self.recorder(weights)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=fused_causal,
                scale=self.scale,
            )
            weights = None
        out = self.proj_drop(self.to_out(rearrange(out, "b h n d -> b n (h d)")))
        return (out, weights) if need_weights else out


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------
def check_images(x: Tensor, *, in_chans: int, img_size: int) -> None:
    """Refuse a batch a model built for ``in_chans``-channel ``img_size`` square images cannot
    embed, naming the problem and the fix (shared by every tokenizer).

    Raises:
        TypeError: not a floating-point tensor. ValueError: wrong rank, channels or size.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(
            f"expected images of shape (B, C, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (shape "
            f"{tuple(x.shape)}); convert the images or create the model with "
            f"in_chans={x.shape[1]}"
        )
    if tuple(x.shape[2:]) != (img_size, img_size):
        raise ValueError(
            f"expected {img_size}x{img_size} images, got "
            f"{x.shape[2]}x{x.shape[3]}; resize the input or create the model with "
            f"img_size={x.shape[2]} (position embeddings of a trained model are resampled by "
            f"from_timm / load_pretrained)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected floating-point images, got {x.dtype}; convert with x.float() / 255 and "
            f"normalise"
        )


class PatchEmbedding(nn.Module):
    """Split an image into non-overlapping ``patch_size`` patches and project each to ``dim``.

    A strided convolution is the linear projection of flattened patches of Dosovitskiy et al.
    (2021, eq. 1), computed without materialising the patches.
    """

    def __init__(
        self, *, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 192
    ) -> None:
        super().__init__()
        side, rest = divmod(img_size, patch_size)
        if rest:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; pick a patch "
                f"size that divides it (e.g. {_divisors_hint(img_size)})"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (side, side)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: Tensor) -> None:
        """Refuse inputs the model cannot embed, naming the problem and the fix."""
        check_images(x, in_chans=self.in_chans, img_size=self.img_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")  # (B, N, D)


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n) if n % d == 0 and d <= 32) or "1"


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


# ----------------------------------------------------------------------------------------------
# Feed-forward, regularisers
# ----------------------------------------------------------------------------------------------
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


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


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
        *,
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
        attn_kw = dict(num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = Attention(dim, proj_drop=proj_drop, **attn_kw)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = Attention(
            dim, proj_drop=proj_drop, cross=True, context_dim=context_dim, **attn_kw
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
