"""The Vision Transformer classifier and its named variants.

ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale". The convolutional tokenizer and sequence pooling options are those of the Compact
Convolutional Transformer (Hassani et al. 2021; variants in :mod:`vit.models.cct`).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vit.errors import did_you_mean
from vit.layers import (
    EncoderBlock,
    PatchDropout,
    PatchEmbedding,
    check_images,
    sincos_2d_position_encoding,
)
from vit.layers import sinusoidal_position_encoding as sinusoidal_1d
from vit.layers.conv_attention import CONV_ATTENTION
from vit.layers.conv_stem import ConvTokenizer, SequencePool, conv_grid_size
from vit.models._registry import check_options, register_config_variant

try:  # torch.fx.symbolic_trace only; torch.export and torch.compile run the input check
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
except ImportError:  # torch < 2.6
    from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_tracing

__all__ = ["GLOBAL_POOL", "POOLS", "ViTConfig", "VisionTransformer", "take_indices"]

POOLS = ("cls", "mean", "seq", "none")
# ViTConfig.pool → timm's name for it (the `global_pool` argument and attribute of timm's models).
GLOBAL_POOL = {"cls": "token", "mean": "avg", "seq": "seq", "none": ""}


@dataclass
class ViTConfig:
    """Everything that defines a :class:`VisionTransformer`'s architecture."""

    img_size: int = 32
    patch_size: int = 4  # the "patch" tokenizer's; unused by "conv"
    in_chans: int = 3
    # How images become tokens. "patch": ViT's linear projection of non-overlapping patches.
    # "conv": CCT's convolutional tokenizer (Hassani et al. 2021, Sec. 3.3), `conv_layers` stages
    # of conv (`conv_kernel`, no bias) → ReLU → 3x3 max-pool of stride 2: overlapping receptive
    # fields and a locality bias that small datasets reward. Its stride and padding follow CCT's
    # rule, max(1, k // 2 - 1) and max(1, k // 2): 3x3 convolutions keep the resolution, so a
    # 32-px image gives 16x16 tokens after one stage, 8x8 after two.
    tokenizer: Literal["patch", "conv"] = "patch"
    conv_layers: int = 1
    conv_kernel: int = 3
    conv_channels: int = 64  # width of the inner stages (the last outputs embed_dim); CCT's
    # A module of vit.layers.conv_attention.CONV_ATTENTION ("cbam", "se", ...) after each stage's
    # max-pool: a hybrid beyond CCT, which has none. None: no module.
    conv_attention: str | None = None
    num_classes: int = 10  # 0: no head, forward() returns the pooled features
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3  # head width = embed_dim / num_heads; attention scales by its inverse sqrt
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # "cls": classify from a learned [class] token (ViT). "mean": average the patch tokens, which
    # works as well on small images and needs no extra token (Beyer et al. 2022). "seq": CCT's
    # sequence pooling (Hassani et al. 2021, Sec. 3.2), a learned softmax-weighted average of the
    # tokens: one linear layer instead of a class token attended to in every block. "none": no
    # pooling, forward_head maps every token (timm's global_pool='', for dense features).
    pool: Literal["cls", "mean", "seq", "none"] = "cls"
    # "learned" (ViT), "sincos2d" (fixed 2-D, Beyer et al. 2022) or "sinusoidal" (fixed 1-D of
    # Vaswani et al. 2017 over the flattened patch order). Fixed encodings give the class token 0.
    pos_embed: Literal["learned", "sincos2d", "sinusoidal"] = "learned"
    class_token: bool | None = None  # None: a class token exactly when pool == "cls"
    # Initial std of a learned position embedding: 0.02 as in ViT/timm; CCT's code uses 0.2.
    pos_embed_std: float = 0.02
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
        positive = ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"]
        positive += ["conv_layers", "conv_kernel", "conv_channels"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            problems.append(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.tokenizer not in ("patch", "conv"):
            problems.append(f"tokenizer must be 'patch' or 'conv', got {self.tokenizer!r}")
        if self.conv_attention is not None and self.conv_attention not in CONV_ATTENTION:
            hint = did_you_mean(str(self.conv_attention), CONV_ATTENTION)
            problems.append(
                f"conv_attention {self.conv_attention!r} is not a module of "
                f"vit.layers.conv_attention{hint} (known: {', '.join(sorted(CONV_ATTENTION))})"
            )
        if self.conv_attention is not None and self.tokenizer != "conv":
            problems.append("conv_attention needs tokenizer='conv'")
        if self.pool not in POOLS:
            problems.append(f"pool must be one of {', '.join(map(repr, POOLS))}, got {self.pool!r}")
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
        if not self.pos_embed_std >= 0.0:
            problems.append(f"pos_embed_std must be >= 0, got {self.pos_embed_std!r}")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        if self.tokenizer == "patch" and self.img_size % self.patch_size != 0:
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
    def conv_stride_padding(self) -> tuple[int, int]:
        """The convolutions' stride and padding, by CCT's rule from the kernel size."""
        return max(1, self.conv_kernel // 2 - 1), max(1, self.conv_kernel // 2)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the (square) token grid, for either tokenizer."""
        if self.tokenizer == "patch":
            return self.img_size // self.patch_size
        stride, padding = self.conv_stride_padding
        rows, _ = conv_grid_size(
            self.img_size,
            num_layers=self.conv_layers,
            kernel_size=self.conv_kernel,
            stride=stride,
            padding=padding,
        )
        return rows


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches as words, a pre-norm Transformer encoder, a head.

    With ``tokenizer="conv"`` and ``pool="seq"`` it is the Compact Convolutional Transformer
    (Hassani et al. 2021): convolutional tokens, no class token, sequence pooling.

    The model API is timm's (timm's own model tests pass on it, see ``vit.timm_interop``):

    - stages: :meth:`forward_features` (B, prefix+N, D) after the final norm, :meth:`forward_head`
      (pooling + classifier), :meth:`no_weight_decay`, :meth:`group_matcher`;
    - classifier: :meth:`get_classifier`, :meth:`reset_classifier`, ``num_classes``,
      ``global_pool`` (``'token'``, ``'avg'``, ``'seq'`` or ``''``: no pooling), ``num_features``
      and ``head_hidden_size`` (both the width D);
    - features: :meth:`forward_intermediates`, :meth:`prune_intermediate_layers`,
      ``feature_info`` (one entry per block: ``blocks.i``, D channels, the token grid's stride in
      pixels), which ``timm.create_model(..., features_only=True)`` wraps;
    - :meth:`set_grad_checkpointing`: activation checkpointing of every block.

    ``config`` records the architecture as built; :meth:`reset_classifier` and
    :meth:`prune_intermediate_layers` change the modules (and ``num_classes``, ``global_pool``),
    not the record. :attr:`grid_size` is the token grid of either tokenizer. ``torch.fx`` traces
    and ``torch.jit.script`` compiles :meth:`forward`; the input check runs in eager mode only.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        check_options(overrides, ViTConfig)
        cfg = dataclasses.replace(config or ViTConfig(), **overrides)
        self.config = cfg
        d = cfg.embed_dim
        # Plain attributes, not `config` reads, on the forward path: torch.jit.script compiles them.
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans
        self.num_classes = cfg.num_classes
        self.global_pool = GLOBAL_POOL[cfg.pool]
        self.num_features = self.head_hidden_size = self.embed_dim = d
        self.grad_checkpointing = False
        # `patch_embed` holds either tokenizer (timm's name for the image → tokens stage, its
        # hybrid models included), so optimiser rules for the input layer apply to both.
        self.patch_embed: nn.Module
        if cfg.tokenizer == "patch":
            self.patch_embed = PatchEmbedding(
                img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, dim=d
            )
        else:
            stride, padding = cfg.conv_stride_padding
            self.patch_embed = ConvTokenizer(
                in_chans=cfg.in_chans,
                embed_dim=d,
                num_layers=cfg.conv_layers,
                kernel_size=cfg.conv_kernel,
                stride=stride,
                padding=padding,
                hidden_channels=cfg.conv_channels,
                attention=cfg.conv_attention,
            )
        self._grid_size = (cfg.grid_size, cfg.grid_size)
        num_patches = cfg.grid_size**2
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        num_tokens = self.num_prefix_tokens + num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d))
        else:
            fixed = (
                sincos_2d_position_encoding(cfg.grid_size, cfg.grid_size, d)
                if cfg.pos_embed == "sincos2d"
                else sinusoidal_1d(num_patches, d)
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
        # The stride of the token grid in input pixels: the patch size, or the conv tokenizer's
        # total downsampling (2 per stage for CCT's 3x3 convolutions and max-pools).
        reduction = cfg.img_size // cfg.grid_size
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=d, reduction=reduction) for i in range(cfg.depth)
        ]
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        # timm keeps an attention-pooling head as None when off; so does this one.
        self.seq_pool = SequencePool(d) if cfg.pool == "seq" else None
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for linear layers and the learned
        position embedding (std ``pos_embed_std``), a near-zero class token, zero biases, a
        zero-initialised head. A convolutional tokenizer keeps its own initialisation (CCT's
        Kaiming-normal convolutions, its attention modules' papers')."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=self.config.pos_embed_std)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("patch_embed."):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):  # a zero head starts at uniform predictions
            nn.init.zeros_(self.head.weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases (timm's convention):
        the learned position embedding and the class token, where the model has them."""
        return {n for n in ("pos_embed", "cls_token") if isinstance(getattr(self, n), nn.Parameter)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, as timm's ViT: the stem (embeddings, tokenizer), each block,
        then the final norm; what layer-wise lr decay (``timm.optim.param_groups_layer_decay``)
        reads. The head and pooling come last, at full lr."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)"
            if coarse
            else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
        Cost"): in training, each block keeps only its input and recomputes its activations in
        the backward pass (``torch.utils.checkpoint``, non-reentrant). Same outputs and gradients;
        benchmarks/grad_checkpointing.py measures the memory saved and the time it costs."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head (``nn.Identity`` without one)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new zero-initialised head for ``num_classes`` (0: none, ``forward`` returns the pooled
        (B, D) features) on the model's device and dtype; ``global_pool`` (None: keep the current
        one) is timm's name of the pooling: ``'token'`` (the class token), ``'avg'``, ``'seq'``
        (sequence pooling, only kept: it cannot be added) or ``''`` (none: every token).

        Raises:
            ValueError: an unknown pooling, ``'token'`` without a class token, ``'seq'`` on a
                model built without sequence pooling.
        """
        if global_pool is not None:
            if global_pool not in GLOBAL_POOL.values():
                raise ValueError(
                    f"global_pool={global_pool!r} is not supported; use one of "
                    f"{', '.join(map(repr, GLOBAL_POOL.values()))}"
                )
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token; this model has none")
            if global_pool == "seq" and self.seq_pool is None:
                raise ValueError(
                    "global_pool='seq' cannot be added to a model built without sequence pooling; "
                    "create it with pool='seq'"
                )
            if global_pool != "seq":
                self.seq_pool = None  # its parameters would receive no gradient
            self.global_pool = global_pool
        ref = next(self.parameters())
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the token grid: the patch grid, or the conv tokenizer's output."""
        return self._grid_size

    def _embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → tokens (B, prefix+N, D) with positions, before the blocks."""
        # Eager mode only: a traced or scripted graph holds no Python checks (shapes are fixed
        # there anyway), and the check's messages are not TorchScript. The `if`s stay nested:
        # TorchScript skips compiling a branch only under a lone `not torch.jit.is_scripting()`.
        if not torch.jit.is_scripting():  # noqa: SIM102
            if not _is_fx_tracing():
                check_images(x, in_chans=self.in_chans, img_size=self.img_size)
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.patch_drop(self.pos_drop(x + self.pos_embed))

    def _blocks(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102  (nested for TorchScript, see _embed)
            if self.grad_checkpointing:
                for block in self.blocks:
                    x = checkpoint(block, x, use_reentrant=False)
                return x
        return self.blocks(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → tokens (B, prefix+N, D), after the final norm."""
        return self.norm(self._blocks(self._embed(x)))

    def _pool(self, x: Tensor) -> Tensor:
        """Tokens (B, prefix+N, D) → (B, D): the class token, or the mean or sequence pooling of
        the patch tokens (a class token kept beside mean/seq pooling is not pooled); with
        ``global_pool=''`` every token, unchanged."""
        if self.seq_pool is not None:
            return self.seq_pool(x[:, self.num_prefix_tokens :])
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, prefix+N, D) → logits (B, num_classes) (or pooled features (B, D))."""
        x = self.head_drop(self.fc_norm(self._pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → logits; equal to ``forward_head(forward_features(x))``."""
        if not torch.jit.is_scripting():  # noqa: SIM102  (nested for TorchScript, see _embed)
            if self._class_token_only():
                return self._forward_class_token(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def _class_token_only(self) -> bool:
        # Not while attention is recorded (rollout needs every token's row of the last block).
        last = cast(EncoderBlock, self.blocks[-1])
        return self.global_pool == "token" and last.attn.recorder is None

    @torch.jit.unused
    def _forward_class_token(self, x: Tensor) -> Tensor:
        # The head reads only the class token, and no other output of the last block reaches it:
        # that block runs for the class token alone, still attending to every token. Same logits
        # and gradients, minus the last block's output projection and MLP for every patch (a
        # ~1/depth saving timm does not make).
        *blocks, last = self.blocks
        x = self._embed(x)
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
        if self.grad_checkpointing:
            x = checkpoint(last, x, num_queries=1, use_reentrant=False)
        else:
            x = last(x, num_queries=1)
        return self.forward_head(self.norm(x))  # (B, 1, D) → logits

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Images (B, C, H, W) → the outputs of the blocks ``indices`` (timm's API and semantics).

        Args:
            indices: None: every block; an int n: the last n; a sequence: those blocks (negative
                counts from the end).
            return_prefix_tokens: each intermediate as ``(patch tokens, prefix tokens (B, P, D))``.
            norm: apply the final norm to each intermediate.
            stop_early: run no block past the last one asked for (the final features are then
                those of that block).
            output_fmt: ``"NCHW"`` (B, D, rows, cols) on the token grid, or ``"NLC"`` (B, N, D).
            intermediates_only: return only the intermediates.

        Returns:
            ``(forward_features-like final tokens (B, prefix+N, D), intermediates)``, or only the
            intermediates (a list, in block order).

        Raises:
            ValueError: an unknown ``output_fmt`` or an index out of range.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in intermediates]
        intermediates = [y[:, n:] for y in intermediates]  # (B, N, D)
        if output_fmt == "NCHW":
            rows, cols = self._grid_size
            intermediates = [  # (B, N, D) -> (B, rows, cols, D) -> (B, D, rows, cols)
                y.reshape(y.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (as :meth:`forward_intermediates` reads
        them), and the final norm (``prune_norm``) and the head and pooling (``prune_head``):
        what a feature extractor needs. Returns the absolute indices kept."""
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


def take_indices(
    num_blocks: int, indices: int | list[int] | tuple[int, ...] | None
) -> tuple[list[int], int]:
    """Absolute block indices for timm's ``indices`` argument (None: all; n: the last n; a
    sequence: those, negative from the end), and the largest (as ``timm``'s
    ``feature_take_indices``, which ``vit.models`` does not import).

    Raises:
        ValueError: an index out of range.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_blocks})")
        return list(range(num_blocks - indices, num_blocks)), num_blocks - 1
    take = [num_blocks + i if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, take, strict=True) if not 0 <= t < num_blocks]
    if bad or not take:
        raise ValueError(
            f"block indices {list(indices)} are out of range (0 to {num_blocks - 1}, or negative)"
        )
    return take, max(take)


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
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    # One ViTConfig from both, so that derived defaults (class_token from pool) follow overrides.
    check_options(overrides, ViTConfig)
    return VisionTransformer(ViTConfig(**{**defaults, **overrides}))


for _size, _dims in _SIZES.items():
    register_config_variant(
        f"vit_{_size}_patch4_32", _build, dict(img_size=32, patch_size=4, **_dims)
    )
    register_config_variant(
        f"vit_{_size}_patch16_224",
        _build,
        dict(img_size=224, patch_size=16, num_classes=1000, **_dims),
    )
