"""Show, Attend and Tell (Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation
with Visual Attention"): an LSTM caption decoder with soft attention, beside the Transformer decoder
of :class:`vit.models.CaptioningTransformer` and with its public interface.

The encoder is the same ViT; its patch tokens are the annotation vectors a_1..a_N (Sec. 3.1.1).
Soft ("deterministic") attention, Sec. 3.1.2 and 4.2:

    h_0, c_0 = f_init,h(ā), f_init,c(ā),   ā = (1/N) Σ_i a_i           Sec. 3.1.2
    α_t      = softmax_i f_att(a_i, h_{t-1})                             Eq. 4-5
    ẑ_t      = β_t Σ_i α_ti a_i,   β_t = σ(f_β(h_{t-1}))                 Eq. 6, 13; Sec. 4.2.1
    h_t, c_t = LSTM([E y_{t-1}; ẑ_t], (h_{t-1}, c_{t-1}))                 Eq. 1-3
    p(y_t)   ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t))                    Eq. 7

Training adds λ Σ_i (1 − Σ_t α_ti)² to the loss (Eq. 14): :func:`doubly_stochastic_penalty` of the
α that ``forward(..., return_attention=True)`` returns (the engine's caption task does, with λ =
``task_args.attention_penalty``). docs/captioning_lstm.md compares this decoder with the
Transformer's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from vit.layers.additive_attention import AdditiveAttention
from vit.models.captioning import _CAPTION_VARIANTS
from vit.models.decoding import Captioner, StepFn, check_caption_config

__all__ = ["CaptioningLSTM", "LSTMCaptionConfig", "doubly_stochastic_penalty"]


@dataclass
class LSTMCaptionConfig:
    """Everything that defines a :class:`CaptioningLSTM` besides its encoder's ViTConfig.

    As for CaptionConfig, keyword overrides that are ViTConfig fields go to the encoder, so no
    field here shares a ViTConfig field's name.
    """

    encoder: str = "vit_tiny_patch4_32"
    encoder_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    vocab_size: int = 1000  # set from the tokenizer: len(tokenizer)
    # Longest token sequence, <bos> and <eos> included. The recurrence has no length limit; this
    # bounds generation (generate's max_len is at most max_len - 1), as CaptionConfig's does.
    max_len: int = 32
    # m of the paper: width of the word embedding E y and of the deep output layer (Eq. 1, 7).
    # 512 and the LSTM's 1800 are the authors' MS COCO settings (their released code).
    word_dim: int = 512
    hidden_dim: int = 1800  # n: the LSTM's hidden and cell width
    # Hidden width of f_att (W_q h + W_k a); None: the encoder's width. The authors' code uses the
    # annotation width.
    attn_dim: int | None = None
    # The paper says only that it used dropout (Sec. 5); placement (h_t before L_h, the deep
    # output before L_o, the hidden layer of the f_init MLPs) and p = 0.5 follow the authors' code.
    decoder_drop_rate: float = 0.5
    # "linear" is Eq. 7 as printed: then the three terms and L_o collapse into one linear map of
    # rank ≤ m. "tanh" (default) puts a tanh before L_o, as the authors' code does: a deep output
    # layer in the sense of Pascanu et al. (2014).
    deep_output: Literal["tanh", "linear"] = "tanh"
    # The tokenizer's special ids (vit.captions.Tokenizer puts them first in this order).
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.deep_output not in ("tanh", "linear"):
            problems.append(f"deep_output must be 'tanh' or 'linear', got {self.deep_output!r}")
        check_caption_config(
            self,
            positive=("vocab_size", "max_len", "word_dim", "hidden_dim"),
            optional=("attn_dim",),
            rates=("decoder_drop_rate",),
            problems=problems,
        )


class _Context(NamedTuple):
    """What attention reads at every step, fixed per image."""

    annotations: Tensor  # (B, N, D): a_i
    keys: Tensor  # (B, N, attn_dim): W_k a_i + b, projected once instead of once per step


def _init_mlp(in_dim: int, out_dim: int, drop: float) -> nn.Sequential:
    """f_init,h / f_init,c (Sec. 3.1.2): a hidden ReLU layer (as the authors' code), then a tanh
    layer, in the range of the LSTM's outputs."""
    return nn.Sequential(
        nn.Linear(in_dim, in_dim),
        nn.ReLU(),
        nn.Dropout(drop),
        nn.Linear(in_dim, out_dim),
        nn.Tanh(),
    )


class CaptioningLSTM(Captioner):
    """Image captioner: our ViT encoder → annotation vectors (the patch tokens) → an LSTM decoder
    with soft additive attention over them (Xu et al. 2015; see the module docstring) →
    vocabulary logits. Same public interface as :class:`vit.models.CaptioningTransformer`.

    The annotations are the patch tokens only, not the class token: Xu et al.'s a_i are image
    locations, α_t a distribution over them (a word → patch map on the encoder's grid) and the
    doubly stochastic penalty asks every location for attention. The class token is no location;
    as one more key it would offer a place to look at no part of the image, which the gate β_t
    already provides. It still shapes the patch tokens through the encoder's self-attention.
    """

    config_class = LSTMCaptionConfig

    def __init__(self, config: LSTMCaptionConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        d, m, n = self.encoder.num_features, cfg.word_dim, cfg.hidden_dim
        self.token_embed = nn.Embedding(cfg.vocab_size, m)  # E
        self.init_h = _init_mlp(d, n, cfg.decoder_drop_rate)  # f_init,h
        self.init_c = _init_mlp(d, n, cfg.decoder_drop_rate)  # f_init,c
        self.attention = AdditiveAttention(n, d, cfg.attn_dim or d)  # f_att
        self.gate = nn.Linear(n, 1)  # f_β
        # Eq. 1's T_{D+m+n,n}: nn.LSTMCell applies it to [E y; ẑ] and h as two matrices.
        self.cell = nn.LSTMCell(m + d, n)
        self.out_h = nn.Linear(n, m)  # L_h
        self.out_z = nn.Linear(d, m, bias=False)  # L_z (L_h's bias serves the sum)
        self.out_act = nn.Tanh() if cfg.deep_output == "tanh" else nn.Identity()
        self.drop = nn.Dropout(cfg.decoder_drop_rate)
        self.head = nn.Linear(m, cfg.vocab_size)  # L_o
        # Small word vectors (as the authors' code): E y enters the deep output's tanh unscaled.
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)

    # -- stages (forward_memory: Captioner's) ---------------------------------------------------
    def _context(self, memory: Tensor) -> _Context:
        annotations = memory[:, self.num_prefix_tokens :]  # (B, N, D)
        return _Context(annotations, self.attention.project_keys(annotations))

    def _init_state(self, ctx: _Context) -> tuple[Tensor, Tensor]:
        mean = ctx.annotations.mean(dim=1)  # (B, D)
        return self.init_h(mean), self.init_c(mean)  # (B, n) each

    def _recur(
        self, emb: Tensor, h: Tensor, c: Tensor, ctx: _Context
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step: E y_{t-1} (B, m) and (h_{t-1}, c_{t-1}) → h_t, c_t, ẑ_t (B, D), α_t (B, N)."""
        z, alpha = self.attention(h, ctx.annotations, ctx.annotations, projected_keys=ctx.keys)
        z = torch.sigmoid(self.gate(h)) * z  # β_t Σ_i α_ti a_i
        h, c = self.cell(torch.cat([emb, z], dim=-1), (h, c))
        return h, c, z, alpha

    def _readout(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """Eq. 7 with the authors' dropout: logits (..., V) from E y_{t-1}, h_t and ẑ_t."""
        return self.head(self.drop(self.out_act(emb + self.out_h(self.drop(h)) + self.out_z(z))))

    @overload
    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        *,
        return_attention: Literal[False] = False,
        padding_mask: Tensor | None = None,
    ) -> Tensor: ...

    @overload
    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        *,
        return_attention: Literal[True],
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        *,
        return_attention: bool = False,
        padding_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        *,
        return_attention: bool = False,
        padding_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: tokens (B, T), ``<bos>`` first, and encoder memory → next-token logits
        (B, T, V); with ``return_attention`` also α (B, T, N), row t over the patches read to
        predict token t+1 (``reshape(B, T, *encoder.grid_size)`` puts it on the patch grid).

        ``padding_mask`` (B, T) marks padding with True: the recurrent state passes those steps
        unchanged, so padding (left or right) cannot reach the real steps; the logits and α rows
        of padding steps mean nothing (leave them out of the loss and the penalty).
        """
        if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] == 0:
            raise TypeError(
                f"tokens must be a non-empty (B, T) int64 tensor, got {tokens.dtype} of shape "
                f"{tuple(tokens.shape)}"
            )
        if padding_mask is not None and padding_mask.dtype != torch.bool:
            raise TypeError(
                f"padding_mask must be a bool tensor (True = padding), got {padding_mask.dtype}"
            )
        ctx = self._context(memory)
        h, c = self._init_state(ctx)
        emb = self.token_embed(tokens)  # (B, T, m)
        hs, zs, alphas = [], [], []
        for t in range(tokens.shape[1]):
            h_t, c_t, z, alpha = self._recur(emb[:, t], h, c, ctx)
            if padding_mask is not None:
                pad = padding_mask[:, t, None]  # (B, 1)
                h_t, c_t = torch.where(pad, h, h_t), torch.where(pad, c, c_t)
            h, c = h_t, c_t
            hs.append(h)
            zs.append(z)
            alphas.append(alpha)
        # The output layer has no recurrence: one batched call over all steps.
        logits = self._readout(emb, torch.stack(hs, dim=1), torch.stack(zs, dim=1))  # (B, T, V)
        return (logits, torch.stack(alphas, dim=1)) if return_attention else logits

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        padding_mask: Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: images (B, C, H, W), input tokens (B, T) starting with ``<bos>``
        → next-token logits (B, T, V), or ``(logits, alphas)`` with α (B, T, N) when
        ``return_attention`` (for :func:`doubly_stochastic_penalty` and word → patch maps)."""
        return self.decode(
            tokens,
            self.forward_memory(images),
            padding_mask=padding_mask,
            return_attention=return_attention,
        )

    @torch.no_grad()
    def word_attention(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Word → patch attention when the captioner reads ``tokens`` (B, T) (``<bos>`` first) for
        ``images``: α on the patch grid (B, T, gh, gw), the same contract as
        :meth:`vit.models.CaptioningTransformer.word_attention`. Row t is where the model looks
        to predict token t+1; each row sums to one (the annotations are the patches only)."""
        _, alphas = self(images, tokens, return_attention=True)  # (B, T, N)
        return self._on_grid(alphas)

    # -- generation (generate, generate_from_memory: Captioner's) -------------------------------
    def _stepper(self, memory: Tensor, use_cache: bool) -> tuple[StepFn, tuple | None]:
        """The search's step function over ``memory`` and its state: the recurrent state (h, c)
        and the attention context, carried from step to step, or None to re-run the decoder over
        the whole prefix at every step."""
        if not use_cache:

            def step(seq: Tensor, state: None) -> tuple[Tensor, None]:
                return self.decode(seq, memory)[:, -1].float().log_softmax(dim=-1), state

            return step, None

        def cached_step(seq: Tensor, state: tuple) -> tuple[Tensor, tuple]:
            h, c, ctx = state
            emb = self.token_embed(seq[:, -1])  # (N, m): only the newest token is read
            h, c, z, _ = self._recur(emb, h, c, ctx)
            return self._readout(emb, h, z).float().log_softmax(dim=-1), (h, c, ctx)

        ctx = self._context(memory)
        return cached_step, (*self._init_state(ctx), ctx)

    @staticmethod
    def _reorder(state: tuple | None, src: Tensor) -> tuple | None:
        """Beam search: (h, c) follow their hypotheses; the annotations are the same within an
        image, so they stay."""
        if state is None:
            return None
        h, c, ctx = state
        return h[src], c[src], ctx


def doubly_stochastic_penalty(
    alphas: Tensor, mask: Tensor | None = None, lam: float = 1.0
) -> Tensor:
    """Doubly stochastic attention penalty (Xu et al. 2015, Sec. 4.2.1, Eq. 14):
    ``λ Σ_i (1 − Σ_t α_ti)²``, averaged over the batch.

    Softmax makes each step's weights sum to one over the N locations; the penalty asks each
    location's weight summed over the caption's steps to be one too, so that over the caption the
    model attends to every part of the image (the paper finds this improves BLEU and gives richer
    captions). Add it to the caption's negative log-likelihood.

    Args:
        alphas: (B, T, N) attention weights from ``forward(..., return_attention=True)``.
        mask: (B, T) boolean, True marks the steps to leave out of Σ_t: padding (the
            ``padding_mask`` given to ``forward``, or ``targets == pad_id``).
        lam: λ, the penalty's weight (1 in the authors' code).

    Returns:
        A scalar: the mean over the batch of each caption's penalty.
    """
    if mask is not None:
        alphas = alphas.masked_fill(mask[..., None], 0.0)
    return lam * (1.0 - alphas.sum(dim=1)).pow(2).sum(dim=-1).mean()


# Show, Attend and Tell variants: encoder = a ViT variant, as for the caption_* variants.
#   caption_lstm_mini_patch8_32  the encoder of caption_mini_patch8_32 (96 wide, 3 deep, 4 heads,
#                                8-pixel patches); word width 96, LSTM 192 (m, n of the paper;
#                                ours, sized for the `shapes` captions as that variant is)
# LSTMCaptionConfig's defaults are the authors' MS COCO decoder sizes, for larger encoders.
_MINI = _CAPTION_VARIANTS["caption_mini_patch8_32"]
_LSTM_VARIANTS = {
    "caption_lstm_mini_patch8_32": dict(
        encoder=_MINI["encoder"],
        encoder_kwargs=dict(_MINI["encoder_kwargs"]),
        word_dim=96,
        hidden_dim=192,
    ),
}
CaptioningLSTM.register_variants(_LSTM_VARIANTS)
