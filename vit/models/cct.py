"""Compact Convolutional Transformer variants: our VisionTransformer with CCT's tokenizer, sequence
pooling and sizes.

Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers". Names as in the
authors' code (SHI-Labs/Compact-Transformers): ``cct_7_3x1_32`` = 7 encoder layers, 3x3
convolutions, 1 tokenizer stage, 32-pixel images.
"""

from __future__ import annotations

from typing import Any

from vit.models._registry import register_config_variant
from vit.models.vision_transformer import _build

__all__: list[str] = []

# Sizes, Hassani et al. 2021, Tab. 1 (CIFAR) and the authors' README (parameters to three
# decimals, 10 classes); encoder width / layers / heads / MLP ratio, tokenizer stages
# (`conv_layers`, 3x3 kernels), tokens on 32-pixel images:
#   CCT-2/3x2   128 / 2 / 2 / 1   2 stages   8x8 = 64 tokens    0.284M
#   CCT-4/3x2   128 / 4 / 2 / 1   2 stages   8x8                0.482M
#   CCT-6/3x1   256 / 6 / 4 / 2   1 stage    16x16 = 256 tokens 3.168M
#   CCT-6/3x2   256 / 6 / 4 / 2   2 stages   8x8                3.327M
#   CCT-7/3x1   256 / 7 / 4 / 2   1 stage    16x16              3.760M
#   CCT-7/3x2   256 / 7 / 4 / 2   2 stages   8x8                3.853M
# Our counts equal these (tests/test_cct.py). As in CCT's code: no qkv bias, attention dropout
# 0.1, stochastic depth 0.1 (train.py's --drop-path overrides it, default 0), no other dropout,
# LayerNorm eps 1e-5, learned positions initialised at std 0.2, sequence pooling and no class
# token. `*_sine` variants use the fixed 1-D sinusoidal positions instead, as CCT's do.
# Deliberate deviations, none of which changes a parameter count: the block is our pre-norm
# EncoderBlock (x + MHSA(LN(x)), then x + MLP(LN(x))), where CCT's code applies its second
# LayerNorm to the residual stream itself (x = LN(x + MHSA(LN(x))), then x + MLP(x)); the head is
# zero-initialised (timm's ViT), where CCT's is truncated normal.
_SIZES = {
    2: dict(embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0),
    4: dict(embed_dim=128, depth=4, num_heads=2, mlp_ratio=1.0),
    6: dict(embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0),
    7: dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
}
_CIFAR = ((2, 2), (4, 2), (6, 1), (6, 2), (7, 1), (7, 2))  # (layers, tokenizer stages) of Tab. 1

_CCT: dict[str, Any] = dict(
    img_size=32,
    num_classes=10,
    tokenizer="conv",
    conv_kernel=3,
    pool="seq",
    qkv_bias=False,
    attn_drop_rate=0.1,
    drop_path_rate=0.1,
    norm_eps=1e-5,
    pos_embed_std=0.2,
)

for _layers, _stages in _CIFAR:
    _name = f"cct_{_layers}_3x{_stages}_32"
    _defaults = dict(_CCT, conv_layers=_stages, **_SIZES[_layers])
    register_config_variant(_name, _build, _defaults)
    register_config_variant(f"{_name}_sine", _build, dict(_defaults, pos_embed="sinusoidal"))
