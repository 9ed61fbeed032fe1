"""Transformer building blocks, each defined once and shared by the classifier and the captioners.

One module per concept: attention (self, masked self, cross; the explicit reference path), patch
embedding, positional encodings, the feed-forward network, DropPath / PatchDropout, LayerScale, the
pre-norm encoder and decoder blocks; beside them the attention modules of CNNs, the convolutional
tokenizer of CCT and additive attention.

References: Vaswani et al. 2017, "Attention Is All You Need"; Dosovitskiy et al. 2021, "An Image
is Worth 16x16 Words"; Huang et al. 2016 (stochastic depth); Touvron et al. 2021, CaiT (layer
scale); Bahdanau et al. 2015 (additive attention); Hassani et al. 2021, CCT.
"""

from vit.layers.additive_attention import AdditiveAttention
from vit.layers.attention import (
    Attention,
    CrossAttention,
    causal_mask,
    masked_scores,
    merge_masks,
    scaled_dot_product_attention,
)
from vit.layers.blocks import DecoderBlock, EncoderBlock
from vit.layers.drop import DropPath, PatchDropout
from vit.layers.layer_scale import LayerScale
from vit.layers.mlp import FeedForward
from vit.layers.patch_embed import PatchEmbedding, check_images
from vit.layers.pos_embed import sincos_2d_position_encoding, sinusoidal_position_encoding

__all__ = [
    "AdditiveAttention",
    "Attention",
    "CrossAttention",
    "DecoderBlock",
    "DropPath",
    "EncoderBlock",
    "FeedForward",
    "LayerScale",
    "PatchDropout",
    "PatchEmbedding",
    "causal_mask",
    "check_images",
    "masked_scores",
    "merge_masks",
    "scaled_dot_product_attention",
    "sincos_2d_position_encoding",
    "sinusoidal_position_encoding",
]
