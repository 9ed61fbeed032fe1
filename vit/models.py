"""Models: the Vision Transformer classifier, its named variants and the model factory.

ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale". ``import vit.models`` stays light: no tensorboard, albumentations or training engine.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.layers import (
    DecoderBlock,
    EncoderBlock,
    PatchDropout,
    PatchEmbedding,
    sincos_2d_position_encoding,
)
from vit.layers import sinusoidal_position_encoding as sinusoidal_1d

__all__ = [
    "VARIANTS",
    "CaptionConfig",
    "CaptioningTransformer",
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
    # Training only: the share of patch tokens each sample drops before the blocks (patch dropout,
    # Liu et al. 2022): 0.5 runs the blocks on half the tokens. Evaluation sees all of them.
    patch_drop_rate: float = 0.0
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
        for name in (
            "drop_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
            "patch_drop_rate",
        ):
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
        self.patch_drop = PatchDropout(cfg.patch_drop_rate, self.num_prefix_tokens)
        # On CPU explicitly, so that models can be built under `with torch.device("meta")`.
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
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

    def _embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → tokens (B, prefix+N, D) with positions, before the blocks."""
        self.patch_embed.check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.patch_drop(self.pos_drop(x + self.pos_embed))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → tokens (B, prefix+N, D), after the final norm."""
        return self.norm(self.blocks(self._embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, prefix+N, D) → logits (B, num_classes) (or pooled features (B, D))."""
        x = x[:, 0] if self.config.pool == "cls" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → logits; equal to ``forward_head(forward_features(x))``."""
        if self.config.pool != "cls" or self.blocks[-1].attn.recorder is not None:
            return self.forward_head(self.forward_features(x))
        # The head reads only the class token, and no other output of the last block reaches it:
        # that block runs for the class token alone, still attending to every token. Same logits
        # and gradients, minus the last block's output projection and MLP for every patch (a
        # ~1/depth saving timm does not make). Recording attention (rollout) takes the full path.
        *blocks, last = self.blocks
        x = self._embed(x)
        for block in blocks:
            x = block(x)
        return self.forward_head(self.norm(last(x, num_queries=1)))  # (B, 1, D) → logits


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


# Registers the vit_* variants in timm as vitpkg_*; imported here, after everything it uses is
# defined, so that `import vit.models` is enough for timm.create_model("vitpkg_...").
from vit import timm_interop as _timm_interop  # noqa: E402, F401


# ----------------------------------------------------------------------------------------------
# Image captioning: ViT encoder + Transformer decoder
# ----------------------------------------------------------------------------------------------
@dataclass
class CaptionConfig:
    """Everything that defines a :class:`CaptioningTransformer` besides its encoder's ViTConfig.

    The encoder is any :func:`create_model` ViT variant (``encoder``) built with ``num_classes=0``
    and ``encoder_kwargs`` overriding its defaults; the decoder has the encoder's width unless
    ``decoder_dim`` says otherwise (cross-attention then projects the memory to that width).
    """

    encoder: str = "vit_tiny_patch4_32"
    encoder_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    vocab_size: int = 1000  # set from the tokenizer: len(tokenizer)
    # Longest token sequence the decoder sees, <bos> and <eos> included: the length of the
    # positional-encoding table and of the training sequences.
    max_len: int = 32
    decoder_dim: int | None = None  # None: the encoder's width
    decoder_depth: int = 4
    decoder_heads: int | None = None  # None: the encoder's head count
    decoder_mlp_ratio: float = 4.0
    decoder_drop_rate: float = 0.0  # dropout on the embedded tokens and inside the blocks
    decoder_attn_drop_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    # The tokenizer's special ids (vit.captions.Tokenizer puts them first in this order).
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "max_len", "decoder_depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("decoder_dim", "decoder_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("decoder_drop_rate", "decoder_attn_drop_rate", "decoder_drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if max(self.pad_id, self.bos_id, self.eos_id) >= self.vocab_size:
            problems.append(
                f"vocab_size {self.vocab_size} does not cover the special ids (pad {self.pad_id}, "
                f"bos {self.bos_id}, eos {self.eos_id}); pass vocab_size=len(tokenizer)"
            )
        if problems:
            raise ValueError("invalid CaptionConfig: " + "; ".join(problems))


class CaptioningTransformer(nn.Module):
    """Image captioner: our ViT encoder → memory (B, 1+N, D) → a pre-norm Transformer decoder
    (Vaswani et al. 2017 §3.1; the "Show, Attend and Tell" recipe of Xu et al. 2015 with attention
    replaced by Transformer cross-attention) → vocabulary logits.

    Tokens are embedded, scaled by ``sqrt(D)`` and summed with the sinusoidal encoding (Vaswani et
    al. §3.4–3.5); the output projection shares the embedding matrix (weight tying, Press & Wolf
    2017, as in Vaswani et al. §3.4).
    """

    def __init__(self, config: CaptionConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        base = config or CaptionConfig()
        caption_overrides, encoder_overrides = _checked_caption(overrides)
        encoder_kwargs = {
            **base.encoder_kwargs,
            **caption_overrides.pop("encoder_kwargs", {}),
            **encoder_overrides,
        }
        cfg = dataclasses.replace(base, **caption_overrides, encoder_kwargs=encoder_kwargs)
        self.config = cfg
        self.encoder = create_model(cfg.encoder, **{**cfg.encoder_kwargs, "num_classes": 0})
        if not isinstance(self.encoder, VisionTransformer):
            raise TypeError(f"encoder {cfg.encoder!r} is not a VisionTransformer variant")
        enc_dim = self.encoder.num_features
        d = cfg.decoder_dim or enc_dim
        heads = cfg.decoder_heads or self.encoder.config.num_heads
        if d % heads != 0 or d % 2 != 0:
            raise ValueError(
                f"decoder width {d} must be even and divisible by decoder_heads={heads}; pass "
                f"decoder_dim / decoder_heads that fit (e.g. decoder_heads="
                f"{[h for h in range(1, 17) if d % h == 0]})"
            )
        self.embed_dim = d
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.embed_scale = d**0.5
        self.register_buffer(
            "pos_embed", sinusoidal_1d(cfg.max_len, d), persistent=False
        )  # (max_len, D)
        self.embed_drop = nn.Dropout(cfg.decoder_drop_rate)
        dpr = torch.linspace(0, cfg.decoder_drop_path_rate, cfg.decoder_depth).tolist()
        self.blocks = nn.ModuleList(
            DecoderBlock(
                d,
                num_heads=heads,
                mlp_ratio=cfg.decoder_mlp_ratio,
                proj_drop=cfg.decoder_drop_rate,
                attn_drop=cfg.decoder_attn_drop_rate,
                drop_path=dpr[i],
                context_dim=enc_dim,
                norm_eps=cfg.norm_eps,
            )
            for i in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_decoder()
        self.head.weight = self.token_embed.weight  # tied after init: one matrix, both roles

    def _init_decoder(self) -> None:
        for m in [*self.blocks.modules(), self.head]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def load_encoder(self, source: str | os.PathLike[str] | dict[str, Tensor]) -> None:
        """Initialise the encoder from a classification checkpoint: a path, a state dict or a
        training checkpoint holding one under ``"model"``, ours or timm's.

        :func:`vit.timm_interop.load_pretrained` does the loading (key names, position-embedding
        resampling, the classifier head dropped); anything else that does not fit is a
        ``ValueError`` naming the keys.
        """
        from vit.timm_interop import load_pretrained

        load_pretrained(self.encoder, source)

    # -- stages ---------------------------------------------------------------------------------
    def forward_memory(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) → encoder memory (B, prefix+N, D_enc)."""
        return self.encoder.forward_features(images)

    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        *,
        padding_mask: Tensor | None = None,
        caches: list[dict[str, dict[str, Tensor]]] | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> Tensor:
        """Tokens (B, T) at positions ``start..start+T-1`` → logits (B, T, V) (``last_only``:
        only the last position's, (B, 1, V), as generation needs).

        ``caches`` (one dict per block, owned by the caller) keep self-attention keys/values of
        earlier positions and the memory's cross-attention keys/values between decode steps.
        """
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise TypeError(
                f"tokens must be a (B, T) int64 tensor, got {tokens.dtype} of shape "
                f"{tuple(tokens.shape)}"
            )
        end = start + tokens.shape[1]
        if end > self.config.max_len:
            raise ValueError(
                f"sequence of {end} tokens is longer than the model's max_len="
                f"{self.config.max_len}; truncate the captions or build the model with a larger "
                f"max_len"
            )
        x = self.token_embed(tokens) * self.embed_scale + self.pos_embed[start:end]  # (B, T, D)
        x = self.embed_drop(x)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = block(x, memory, padding_mask=padding_mask, cache=cache)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))  # (B, T, V)

    def forward(self, images: Tensor, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: images (B, C, H, W), input tokens (B, T) starting with ``<bos>``
        → next-token logits (B, T, V). ``padding_mask`` (B, T) marks padding with True."""
        return self.decode(tokens, self.forward_memory(images), padding_mask=padding_mask)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        max_len: int | None = None,
        beam_size: int = 1,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Caption images: token ids (B, L) after ``<bos>``, ``<eos>`` included, ``<pad>`` after it.

        ``max_len``: the most tokens to generate (default: as many as the positional table allows,
        ``config.max_len - 1``). ``beam_size`` 1 is greedy decoding; larger runs beam search ranking
        hypotheses by their summed log-probability (no length penalty). With ``use_cache`` each
        step feeds only the newest token and reuses the keys/values of the earlier ones; without
        it every step re-runs the decoder over the whole prefix (the reference for tests and the
        speed benchmark).
        """
        return self.generate_from_memory(
            self.forward_memory(images), max_len, beam_size, use_cache=use_cache
        )

    @torch.no_grad()
    def generate_from_memory(
        self,
        memory: Tensor,
        max_len: int | None = None,
        beam_size: int = 1,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """:meth:`generate` for encoder memory (B, S, D_enc) computed by :meth:`forward_memory`."""
        limit = self.config.max_len - 1
        max_len = limit if max_len is None else max_len
        if not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ValueError(
                f"max_len must be an integer in [1, {limit}] (the model's max_len minus <bos>), "
                f"got {max_len!r}"
            )
        if not isinstance(beam_size, int) or not 1 <= beam_size <= self.config.vocab_size:
            raise ValueError(
                f"beam_size must be an integer in [1, vocab_size={self.config.vocab_size}], "
                f"got {beam_size!r}"
            )
        if beam_size == 1:
            return self._greedy(memory, max_len, use_cache)
        return self._beam_search(memory, max_len, beam_size, use_cache)

    def _step(self, seq: Tensor, memory: Tensor, caches: list | None) -> Tensor:
        """Log-probabilities (B, V) of the token after ``seq`` (B, t)."""
        if caches is None:
            logits = self.decode(seq, memory, last_only=True)
        else:
            logits = self.decode(seq[:, -1:], memory, caches=caches, start=seq.shape[1] - 1)
        return logits[:, -1].float().log_softmax(dim=-1)

    def _greedy(self, memory: Tensor, max_len: int, use_cache: bool) -> Tensor:
        cfg = self.config
        b = memory.shape[0]
        seq = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        caches = [{} for _ in self.blocks] if use_cache else None
        for _ in range(max_len):
            nxt = self._step(seq, memory, caches).argmax(dim=-1)  # (B,)
            nxt = nxt.masked_fill(done, cfg.pad_id)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
        return seq[:, 1:]

    def _beam_search(self, memory: Tensor, max_len: int, k: int, use_cache: bool) -> Tensor:
        cfg = self.config
        b, dev = memory.shape[0], memory.device
        memory = memory.repeat_interleave(k, dim=0)  # (B·K, S, D): beam j of image i at i·K + j
        seq = torch.full((b * k, 1), cfg.bos_id, dtype=torch.long, device=dev)
        # Only the first beam is live at the start, so the K initial hypotheses are distinct.
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        caches = [{} for _ in self.blocks] if use_cache else None
        # A finished hypothesis can only be extended by <pad>, at no cost, so it keeps competing
        # with its unchanged score.
        pad_row = torch.full((cfg.vocab_size,), float("-inf"), device=dev)
        pad_row[cfg.pad_id] = 0.0
        for _ in range(max_len):
            logp = self._step(seq, memory, caches)  # (B·K, V)
            logp = torch.where(done[:, None], pad_row, logp)
            cand = rearrange(scores, "b k -> (b k) 1") + logp
            scores, idx = rearrange(cand, "(b k) v -> b (k v)", k=k).topk(k, dim=1)  # (B, K)
            beam, tok = idx // cfg.vocab_size, idx % cfg.vocab_size
            src = (torch.arange(b, device=dev)[:, None] * k + beam).flatten()  # (B·K,)
            tok = tok.flatten()
            seq = torch.cat([seq[src], tok[:, None]], dim=1)
            done = done[src] | (tok == cfg.eos_id)
            if caches is not None:  # the memory's keys/values are the same within an image
                for cache in caches:
                    cache["self"] = {name: t[src] for name, t in cache["self"].items()}
            if bool(done.all()):
                break
        # topk returns the hypotheses best first: beam 0 of each image is its best caption.
        return rearrange(seq, "(b k) t -> b k t", k=k)[:, 0, 1:]


def _checked_caption(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword overrides: CaptionConfig fields stay, ViTConfig fields go to the encoder."""
    cap_fields = [f.name for f in dataclasses.fields(CaptionConfig)]
    vit_fields = [f.name for f in dataclasses.fields(ViTConfig)]
    out = {k: v for k, v in overrides.items() if k in cap_fields}
    enc = {k: v for k, v in overrides.items() if k in vit_fields}
    unknown = [k for k in overrides if k not in out and k not in enc]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, cap_fields + vit_fields, n=3)
            hints.append(
                f"{k!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
            )
        raise TypeError(
            f"unknown captioning model option(s): {', '.join(hints)}. Decoder options: "
            f"{', '.join(cap_fields)}; encoder options: {', '.join(vit_fields)}"
        )
    if "num_classes" in enc:
        raise ValueError("a captioner's encoder has no classifier head: drop num_classes")
    return out, enc


# Caption variants: encoder = the named ViT variant; decoder = the encoder's width and heads.
#   caption_tiny_patch4_32  ViT-Ti encoder (DeiT, Touvron et al. 2021, Tab. 1) + 4 decoder blocks
#   caption_mini_patch8_32  ours: a 96-wide, 3-deep, 4-head encoder on 8-pixel patches (4x4 = 16
#                           tokens) + 2 decoder blocks, sized to learn the `shapes` captions in
#                           minutes on a laptop CPU (configs/caption_shapes.yaml)
_CAPTION_VARIANTS = {
    "caption_tiny_patch4_32": dict(encoder="vit_tiny_patch4_32", decoder_depth=4),
    "caption_mini_patch8_32": dict(
        encoder="vit_tiny_patch4_32",
        encoder_kwargs=dict(patch_size=8, embed_dim=96, depth=3, num_heads=4),
        decoder_depth=2,
    ),
}


def _caption_variant(name: str, defaults: dict[str, Any]) -> None:
    def build(**overrides: Any) -> CaptioningTransformer:
        return CaptioningTransformer(CaptionConfig(**defaults), **overrides)

    build.__doc__ = f"{name}: CaptionConfig({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    register_variant(name)(build)


for _name, _defaults in _CAPTION_VARIANTS.items():
    _caption_variant(_name, _defaults)
