"""Models: the Vision Transformer classifier, its named variants and the model factory.

ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale". ``import vit.models`` stays light: no tensorboard, albumentations or training engine.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vit.layers import EncoderBlock, PatchEmbedding, sincos_2d_position_encoding
from vit.layers import sinusoidal_position_encoding as sinusoidal_1d

__all__ = [
    "VARIANTS",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "from_timm",
    "list_models",
]


@dataclass
class ViTConfig:
    """Everything that defines a :class:`VisionTransformer`'s architecture."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10  # 0: no head, forward() returns the pooled features
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3  # head width = embed_dim / num_heads; attention scales by its inverse sqrt
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # "cls": classify from a learned [class] token (ViT). "mean": average the patch tokens, which
    # works as well on small images and needs no extra token (Beyer et al. 2022).
    pool: Literal["cls", "mean"] = "cls"
    # "learned" (ViT), "sincos2d" (fixed 2-D, Beyer et al. 2022) or "sinusoidal" (fixed 1-D of
    # Vaswani et al. 2017 over the flattened patch order). Fixed encodings give the class token 0.
    pos_embed: Literal["learned", "sincos2d", "sinusoidal"] = "learned"
    class_token: bool | None = None  # None: a class token exactly when pool == "cls"
    # timm's layout for average pooling: LayerNorm after pooling instead of before it. With it,
    # forward_features returns tokens before that norm (as timm's does).
    fc_norm: bool = False
    drop_rate: float = 0.0  # dropout after the position embedding and before the head
    proj_drop_rate: float = 0.0  # dropout inside the blocks (attention output, feed-forward)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, increasing linearly with depth to this value
    layer_scale_init: float | None = None  # CaiT layer scale; None: off
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.class_token is None:
            self.class_token = self.pool == "cls"
        problems = []
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            problems.append(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.pool not in ("cls", "mean"):
            problems.append(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            problems.append("pool='cls' needs class_token=True")
        if self.pos_embed not in ("learned", "sincos2d", "sinusoidal"):
            problems.append(
                f"pos_embed must be 'learned', 'sincos2d' or 'sinusoidal', got {self.pos_embed!r}"
            )
        for name in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        if self.img_size % self.patch_size != 0:
            divisors = [d for d in range(1, 33) if self.img_size % d == 0]
            raise ValueError(
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                f"use a patch size from {divisors} or another image size"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                f"choose a head count that divides the width (e.g. "
                f"{[h for h in range(1, 17) if self.embed_dim % h == 0]})"
            )

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches as words, a pre-norm Transformer encoder, a head.

    Stage API as in timm: :meth:`forward_features` (B, prefix+N, D) after the final norm,
    :meth:`forward_head` (pooling + classifier), :meth:`no_weight_decay`.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or ViTConfig(), **_checked(overrides))
        self.config = cfg
        d = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = d
        self.patch_embed = PatchEmbedding(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, dim=d
        )
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d))
        else:
            fixed = (
                sincos_2d_position_encoding(cfg.grid_size, cfg.grid_size, d)
                if cfg.pos_embed == "sincos2d"
                else sinusoidal_1d(self.patch_embed.num_patches, d)
            )
            prefix = torch.zeros(self.num_prefix_tokens, d)
            self.register_buffer("pos_embed", torch.cat([prefix, fixed])[None], persistent=False)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.Sequential(
            *[
                EncoderBlock(
                    d,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    proj_drop=cfg.proj_drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=dpr[i],
                    layer_scale_init=cfg.layer_scale_init,
                    norm_eps=cfg.norm_eps,
                )
                for i in range(cfg.depth)
            ]
        )
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for linear layers and the learned
        position embedding, a near-zero class token, zero biases, a zero-initialised head."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):  # a zero head starts at uniform predictions
            nn.init.zeros_(self.head.weight)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases (timm's convention)."""
        return {"pos_embed", "cls_token"}

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → tokens (B, prefix+N, D), after the final norm."""
        self.patch_embed.check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, prefix+N, D) → logits (B, num_classes) (or pooled features (B, D))."""
        x = x[:, 0] if self.config.pool == "cls" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Named variants
# ----------------------------------------------------------------------------------------------
# Sizes (width / depth / heads; MLP ratio 4 throughout):
#   Ti  192 / 12 /  3   Touvron et al. 2021, "Training data-efficient image transformers"
#                       (DeiT), Tab. 1
#   S   384 / 12 /  6   Touvron et al. 2021 (DeiT), Tab. 1
#   B   768 / 12 / 12   Dosovitskiy et al. 2021 (ViT), Tab. 1
# `patch4_32`: 4-pixel patches on 32-pixel images (8x8 = 64 tokens, CIFAR); `patch16_224`: the
# ImageNet geometry of the papers (14x14 = 196 tokens).
VARIANTS: dict[str, Callable[..., nn.Module]] = {}

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def register_variant(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model constructor ``fn(**overrides) -> nn.Module`` to :func:`create_model`'s table."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in VARIANTS:
            raise ValueError(f"model variant {name!r} is already registered")
        VARIANTS[name] = fn
        return fn

    return deco


def _vit_variant(name: str, **defaults: Any) -> None:
    def build(**overrides: Any) -> VisionTransformer:
        return VisionTransformer(ViTConfig(**{**defaults, **_checked(overrides)}))

    build.__doc__ = f"{name}: ViTConfig({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    register_variant(name)(build)


for _size, _dims in _SIZES.items():
    _vit_variant(f"vit_{_size}_patch4_32", img_size=32, patch_size=4, **_dims)
    _vit_variant(f"vit_{_size}_patch16_224", img_size=224, patch_size=16, num_classes=1000, **_dims)


def _checked(overrides: dict[str, Any]) -> dict[str, Any]:
    """Refuse keywords that are not :class:`ViTConfig` fields, suggesting the closest names."""
    fields = [f.name for f in dataclasses.fields(ViTConfig)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, fields, n=3)
            hints.append(
                f"{k!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
            )
        raise TypeError(
            f"unknown model option(s): {', '.join(hints)}. Valid options: {', '.join(fields)}"
        )
    return overrides


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_model`, sorted; ``pattern`` is a shell-style wildcard."""
    import fnmatch

    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the named variant; keyword overrides (``num_classes=10``, ``drop_path_rate=0.1``, ...)
    win over the variant's defaults.

    >>> create_model("vit_tiny_patch4_32", num_classes=10)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Available: {', '.join(list_models())} "
            f"(see vit.models.list_models())"
        )
    return VARIANTS[name](**overrides)


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """Build our :class:`VisionTransformer` from a timm ``VisionTransformer`` with the same weights
    (and, in eval mode, the same logits). See :mod:`vit.timm_interop`."""
    from vit.timm_interop import from_timm as _from_timm

    return _from_timm(timm_model)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
