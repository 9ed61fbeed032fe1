"""Attention rollout: where a Vision Transformer looks, from its own attention weights.

Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers": fuse each block's heads, add
the identity for the residual connection, renormalise the rows and multiply the blocks' matrices
from the first to the last; the class token's row over the patch columns is the map (for models
without a class token: the mean of the patch rows, or, with CCT's sequence pooling, the rows
weighted by the pooling's softmax weights, the last mixing step). Chefer et al. 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", weight
the attention by its gradient for a class-specific map (:func:`gradient_rollout`).

Modules, in the order the data flows: ``capture`` (recording the weights), ``maps`` (rollout and
the maps on the image), ``render`` (the one renderer of every map picture), ``tensorboard`` (the
training engine's hook), ``__main__`` (``python -m vit.rollout``). A convolutional tokenizer
with CBAM (``tokenizer="conv", conv_attention="cbam"``) has its own spatial attention, shown
beside the rollout by :func:`tokenizer_attention_maps`.
"""

from vit.rollout.capture import AttentionRecord, capture_attention
from vit.rollout.maps import (
    Explanation,
    attention_rollout,
    explain,
    gradient_rollout,
    normalize_maps,
    relative_to_uniform,
    rollout_maps,
    rollout_to_maps,
    tokenizer_attention_maps,
)
from vit.rollout.render import colorize, overlay, render_layer_maps, render_maps

__all__ = [
    "AttentionRecord",
    "Explanation",
    "attention_rollout",
    "capture_attention",
    "colorize",
    "explain",
    "gradient_rollout",
    "normalize_maps",
    "overlay",
    "relative_to_uniform",
    "render_layer_maps",
    "render_maps",
    "rollout_maps",
    "rollout_to_maps",
    "tokenizer_attention_maps",
]
