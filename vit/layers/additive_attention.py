"""Additive attention (Bahdanau et al. 2015), the ``f_att`` of Show, Attend and Tell (Xu et al.
2015). It follows the mask convention of :mod:`vit.layers.attention` (boolean True = may attend,
float = added to the scores)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.layers.attention import masked_scores

__all__ = ["AdditiveAttention"]


class AdditiveAttention(nn.Module):
    """Additive attention (Bahdanau et al. 2015, §3.1 and App. A.1.2), the ``f_att`` of Show,
    Attend and Tell (Xu et al. 2015, Eq. 4-5): ``score(q, k) = vᵀ tanh(W_q q + W_k k + b)``,
    softmax over the keys, weighted sum of the values.

    ``bias``: the ``b`` inside the tanh, on the key projection (one bias there suffices; a bias
    after ``v`` would cancel in the softmax), as in Xu et al.'s released code; Bahdanau's equation
    has none (``bias=False``). ``W_k k + b`` does not depend on the query: a recurrent decoder
    computes it once per image with :meth:`project_keys` and passes it as ``projected_keys``.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.to_q = nn.Linear(query_dim, attn_dim, bias=False)  # W_q
        self.to_k = nn.Linear(key_dim, attn_dim, bias=bias)  # W_k, b
        self.to_score = nn.Linear(attn_dim, 1, bias=False)  # v

    def project_keys(self, keys: Tensor) -> Tensor:
        """Keys (B, Tk, Dk) → ``W_k k + b`` (B, Tk, attn_dim)."""
        return self.to_k(keys)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None = None,
        *,
        projected_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Query (B, Tq, Dq) or (B, Dq), keys (B, Tk, Dk), values (B, Tk, Dv) → ``(out, weights)``:
        (B, Tq, Dv) and (B, Tq, Tk), or (B, Dv) and (B, Tk) for a (B, Dq) query.

        ``mask`` follows :func:`scaled_dot_product_attention`: broadcastable to the weights' shape,
        boolean True = may attend (masked keys get exactly zero weight) or additive float.
        ``projected_keys``: :meth:`project_keys` of ``keys``, when already computed.
        """
        single = query.ndim == 2
        if single:  # one query per sample, as in a recurrent decoder's step
            query = rearrange(query, "b d -> b 1 d")
            mask = mask.unsqueeze(-2) if mask is not None else None
        pk = self.project_keys(keys) if projected_keys is None else projected_keys
        hidden = torch.tanh(
            rearrange(self.to_q(query), "b q a -> b q 1 a") + rearrange(pk, "b k a -> b 1 k a")
        )  # (B, Tq, Tk, attn_dim)
        scores = rearrange(self.to_score(hidden), "b q k 1 -> b q k")
        weights = masked_scores(scores, mask).softmax(dim=-1)
        out = torch.matmul(weights, values)  # (B, Tq, Dv)
        if single:
            return out[:, 0], weights[:, 0]
        return out, weights
