"""Multi-head attention, one module family for self-, masked self- and cross-attention (Vaswani et
al. 2017 §3.2), with the explicit reference path that returns the softmax weights.

The fast path is ``torch.nn.functional.scaled_dot_product_attention``; the explicit path
(:func:`scaled_dot_product_attention`) runs only while a ``recorder`` is set (by
:func:`vit.rollout.capture_attention`), so training never pays for visualisation.

Head splits are plain ``unflatten``/``transpose``/``flatten`` calls rather than einops patterns,
each with its shapes in a comment: ``torch.fx`` tracing and ``torch.jit.script`` (timm's model
tests, feature extraction for detection) cannot follow einops functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "CrossAttention",
    "causal_mask",
    "masked_scores",
    "merge_masks",
    "scaled_dot_product_attention",
]


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
    weights = masked_scores(scores, mask).softmax(dim=-1)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return torch.matmul(attn, v), weights


def masked_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Apply an attention mask to scores: boolean True = may attend (the others get ``-inf``, so
    exactly zero weight), float = added. The one mask convention of every attention here."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


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
    keep = (~key_padding_mask)[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.to(dtype).masked_fill(~keep, float("-inf"))


def _split_heads(x: Tensor, parts: int, num_heads: int) -> Tensor:
    """A fused projection (B, L, parts·D) → (B, L, parts, heads, head_dim).

    Callers unbind the ``parts`` axis while tokens stay outermost, then move heads (each part
    (B, L, h, d) → (B, h, L, d)): the same strided views as splitting ``parts b h n d``, but
    backward stacks the gradients straight into (B, L, parts, h, d), which saves a full copy of
    them per block. The unbind is unpacked in the caller (``q, k, v = ...``), the one way
    ``torch.fx`` can trace splitting a tensor into several.
    """
    return x.unflatten(-1, (parts, num_heads, -1))


class _MultiHeadAttention(nn.Module):
    """What self- and cross-attention share: heads, scale, output projection, the two paths."""

    def __init__(
        self, dim: int, *, num_heads: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"width {dim} is not divisible by num_heads={num_heads}; choose a width that is a "
                f"multiple of the head count (e.g. {num_heads * max(1, round(dim / num_heads))})"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # the head width, not the model width
        self.attn_drop = attn_drop
        self.to_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by vit.rollout.capture_attention: called with each forward's (B, heads, L, S) weights.
        self.recorder: Callable[[Tensor], None] | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """(B, h, L, d) queries over (B, h, S, d) keys/values → (B, L, D) after the projection.
        ``causal``: a square causal mask the fused kernel applies itself (no mask tensor)."""
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recorder is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.scale
            )
        else:
            if causal:
                mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
            out, weights = scaled_dot_product_attention(q, k, v, mask, self.scale, dropout_p)
            self.recorder(weights)
        out = out.transpose(1, 2).flatten(2)  # (B, h, L, d) -> (B, L, h·d)
        return self.proj_drop(self.to_out(out))


class Attention(_MultiHeadAttention):
    """Multi-head self-attention (Vaswani et al. 2017 §3.2.2), optionally causal (the decoder's
    masked self-attention): q, k and v from one fused projection ``to_qkv``, scores scaled by
    ``1/sqrt(head_dim)``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: dict[str, Tensor] | None = None,
        num_queries: int | None = None,
    ) -> Tensor:
        """``x`` (B, L, D) → (B, L, D), or (B, num_queries, D) when only the first ``num_queries``
        positions query (still over every key; ``attn_mask`` then has that many rows).

        ``attn_mask``/``key_padding_mask`` follow :func:`merge_masks`; ``is_causal`` blocks future
        keys; ``cache`` (a dict owned by the caller, one per layer) keeps the keys/values of earlier
        decode steps.
        """
        q, k, v = _split_heads(self.to_qkv(x), 3, self.num_heads).unbind(2)  # each (B, L, h, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, h, L, d)
        if cache is not None:  # decoding: this step's keys/values after the earlier ones
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if num_queries is not None:
            if is_causal or cache is not None:
                raise ValueError(
                    "num_queries is for plain self-attention (no causal mask, no cache)"
                )
            q = q[:, :, :num_queries]  # (B, h, num_queries, d)
        # One query (a cached decode step) may see every key. A plain square causal mask is the
        # fused kernel's own `is_causal`; any other combination becomes one mask tensor.
        causal = is_causal and q.shape[2] > 1
        square = q.shape[2] == k.shape[2]
        fused_causal = causal and square and attn_mask is None and key_padding_mask is None
        if causal and not fused_causal:
            attn_mask = _and_causal(attn_mask, q.shape[2], k.shape[2])
        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        return self._attend(q, k, v, mask, fused_causal)


def _and_causal(attn_mask: Tensor | None, q_len: int, k_len: int) -> Tensor:
    """``attn_mask`` (boolean or additive) with future keys blocked as well."""
    device = None if attn_mask is None else attn_mask.device
    causal = causal_mask(q_len, k_len, device=device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


class CrossAttention(_MultiHeadAttention):
    """Multi-head cross-attention (Vaswani et al. 2017 §3.2.3, "encoder-decoder attention"):
    queries from ``x`` (``to_q``), keys and values from ``context`` (``to_kv``), whose width
    ``context_dim`` may differ (default ``dim``)."""

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Attend from ``x`` (B, L, D) to ``context`` (B, S, context_dim) → (B, L, D).
        ``key_padding_mask`` (B, S): True marks padding; ``cache``: the context's keys/values,
        projected once and reused by later decode steps (the memory does not change)."""
        q = self.to_q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, h, L, d)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = _split_heads(self.to_kv(context), 2, self.num_heads).unbind(2)  # (B, S, h, d)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # each (B, h, S, d)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        return self._attend(q, k, v, merge_masks(None, key_padding_mask, q.dtype), False)
