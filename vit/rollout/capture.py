"""Recording attention weights: :func:`capture_attention` switches the encoder's attention modules
to their explicit path only while it is active (training never pays for visualisation);
a convolutional tokenizer's spatial attention (CBAM) is recorded alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, cast

from torch import Tensor, nn

from vit.layers import Attention, EncoderBlock
from vit.layers.conv_stem import SequencePool
from vit.models._helpers import unwrap_model

__all__ = ["AttentionRecord", "capture_attention"]


def encoder_attentions(model: nn.Module) -> list[Attention]:
    inner = unwrap_model(model)
    found = [m.attn for m in inner.modules() if isinstance(m, EncoderBlock)]
    if not found:
        raise ValueError(
            f"{type(inner).__name__} has no vit.layers.EncoderBlock to record attention from; "
            f"pass a vit VisionTransformer (timm models: convert them with vit.models.from_timm)"
        )
    return found


class _Recording(Protocol):
    recorder: Callable[[Tensor], None] | None


class AttentionRecord(list[Tensor]):
    """What :func:`capture_attention` yields: a list of the blocks' (B, heads, L, L) attention
    weights in execution order, and in :attr:`pool_weights` the (B, N) softmax weights of the
    model's sequence pooling, one tensor per forward pass (empty without sequence pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_weights: list[Tensor] = []


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionRecord]:
    """Record every encoder block's softmax attention weights while the context is active.

    Yields a list (an :class:`AttentionRecord`) that receives one (B, heads, L, L) tensor per block
    per forward pass, in execution order (L = prefix tokens + patches); a model with sequence
    pooling (``pool="seq"``, CCT) also records that pooling's (B, N) weights in
    ``.pool_weights``. The weights keep their autograd graph when the forward runs with gradients
    (see :func:`gradient_rollout`). Outside the context, and after an exception inside it, the
    attention modules are back on their fused path and record nothing. Works through
    ``torch.compile``, DDP and EMA wrappers (the underlying modules are switched) and on models
    from :func:`vit.models.from_timm`.
    """
    modules = encoder_attentions(model)
    pools = [m for m in unwrap_model(model).modules() if isinstance(m, SequencePool)]
    recording: list[Attention | SequencePool] = [*modules, *pools]
    if any(m.recorder is not None for m in recording):
        raise RuntimeError(
            "capture_attention is already active on this model; nesting is not supported"
        )
    attentions = AttentionRecord()
    try:
        for m in modules:
            m.recorder = attentions.append
        for p in pools:
            p.recorder = attentions.pool_weights.append
        yield attentions
    finally:
        for module in recording:
            module.recorder = None


def tokenizer_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The tokenizer's modules that expose a spatial attention map (CBAM), stage by stage."""
    tokenizer = getattr(unwrap_model(model), "patch_embed", None)
    if tokenizer is None:
        return []
    return [m for m in tokenizer.modules() if callable(getattr(m, "spatial_attention", None))]


@contextlib.contextmanager
def capture_tokenizer_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Record the tokenizer's spatial maps, (B, 1, h, w) per stage per forward, while active."""
    # The modules with a spatial map (CBAM) take a recorder, as the encoder's attention does.
    modules = cast("list[_Recording]", tokenizer_attention_modules(model))
    maps: list[Tensor] = []
    try:
        for m in modules:
            m.recorder = maps.append
        yield maps
    finally:
        for m in modules:
            m.recorder = None
