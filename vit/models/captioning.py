"""Image captioning: the ViT encoder + a Transformer decoder (masked self-attention,
cross-attention), with greedy and beam-search generation over a KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from vit.layers import DecoderBlock
from vit.layers import sinusoidal_position_encoding as sinusoidal_1d
from vit.models.decoding import Captioner, StepFn, check_caption_config

__all__ = ["CaptionConfig", "CaptioningTransformer"]


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
        check_caption_config(
            self,
            positive=("vocab_size", "max_len", "decoder_depth"),
            optional=("decoder_dim", "decoder_heads"),
            rates=("decoder_drop_rate", "decoder_attn_drop_rate", "decoder_drop_path_rate"),
        )


class CaptioningTransformer(Captioner):
    """Image captioner: our ViT encoder → memory (B, 1+N, D) → a pre-norm Transformer decoder
    (Vaswani et al. 2017 §3.1; the "Show, Attend and Tell" recipe of Xu et al. 2015 with attention
    replaced by Transformer cross-attention) → vocabulary logits.

    Tokens are embedded, scaled by ``sqrt(D)`` and summed with the sinusoidal encoding (Vaswani et
    al. §3.4–3.5); the output projection shares the embedding matrix (weight tying, Press & Wolf
    2017, as in Vaswani et al. §3.4).
    """

    config_class = CaptionConfig
    pos_embed: Tensor  # a buffer, (max_len, D)

    def __init__(self, config: CaptionConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg, enc_dim = self.config, self.encoder.num_features
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
        dpr = torch.linspace(
            0, cfg.decoder_drop_path_rate, cfg.decoder_depth, device="cpu"
        ).tolist()
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

    # -- stages (forward_memory: Captioner's) ---------------------------------------------------
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

    @torch.no_grad()
    def word_attention(self, images: Tensor, tokens: Tensor, layer: int = -1) -> Tensor:
        """Word → patch attention when the captioner reads ``tokens`` (B, T) (``<bos>`` first) for
        ``images``: the ``layer``-th decoder block's cross-attention weights, head mean, on the
        patch grid (B, T, gh, gw). Row t is where the model looks to predict token t+1. The
        prefix columns (the class token) are dropped, so rows need not sum to one."""
        attn = cast(DecoderBlock, self.blocks[layer]).cross_attn
        captured: list[Tensor] = []
        attn.recorder = captured.append
        try:
            self(images, tokens)
        finally:
            attn.recorder = None
        weights = captured[-1].mean(dim=1)[:, :, self.encoder.num_prefix_tokens :]  # (B, T, N)
        return self._on_grid(weights)

    # -- generation (generate, generate_from_memory: Captioner's) -------------------------------
    def _stepper(self, memory: Tensor, use_cache: bool) -> tuple[StepFn, list | None]:
        """The search's step function over ``memory`` and its state: one cache per block, or None
        to re-run the decoder over the whole prefix at every step."""

        def step(seq: Tensor, caches: list | None) -> tuple[Tensor, list | None]:
            if caches is None:
                logits = self.decode(seq, memory, last_only=True)
            else:  # only the newest token: the caches hold the earlier ones' keys/values
                logits = self.decode(seq[:, -1:], memory, caches=caches, start=seq.shape[1] - 1)
            return logits[:, -1].float().log_softmax(dim=-1), caches

        return step, ([{} for _ in self.blocks] if use_cache else None)

    @staticmethod
    def _reorder(caches: list | None, src: Tensor) -> list | None:
        """Beam search: the self-attention caches follow their hypotheses; the memory's keys/values
        are the same within an image, so they stay."""
        if caches is not None:
            for cache in caches:
                cache["self"] = {name: t[src] for name, t in cache["self"].items()}
        return caches


# Caption variants: encoder = the named ViT variant; decoder = the encoder's width and heads.
#   caption_transformer     CaptionConfig's defaults: any ViT variant as `encoder` (ViT-Ti by
#                           default) + 4 decoder blocks; what `--task caption --model vit_*` trains
#   caption_tiny_patch4_32  ViT-Ti encoder (DeiT, Touvron et al. 2021, Tab. 1) + 4 decoder blocks
#   caption_mini_patch8_32  ours: a 96-wide, 3-deep, 4-head encoder on 8-pixel patches (4x4 = 16
#                           tokens) + 2 decoder blocks, sized to learn the `shapes` captions in
#                           minutes on a laptop CPU (configs/caption_shapes.yaml)
_CAPTION_VARIANTS: dict[str, dict[str, Any]] = {
    "caption_transformer": dict(),
    "caption_tiny_patch4_32": dict(encoder="vit_tiny_patch4_32", decoder_depth=4),
    "caption_mini_patch8_32": dict(
        encoder="vit_tiny_patch4_32",
        encoder_kwargs=dict(patch_size=8, embed_dim=96, depth=3, num_heads=4),
        decoder_depth=2,
    ),
}

CaptioningTransformer.register_variants(_CAPTION_VARIANTS)
