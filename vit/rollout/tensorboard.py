"""The training engine's TensorBoard hook: rollout maps of a fixed image batch."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.models._helpers import unwrap_model
from vit.rollout.capture import capture_attention, capture_tokenizer_attention
from vit.rollout.maps import (
    HeadFusion,
    attention_rollout,
    last_or_none,
    model_geometry,
    normalize_maps,
    rollout_to_maps,
    upsample,
)
from vit.rollout.render import colorize, rollout_grid

__all__ = ["log_rollout"]


def log_rollout(
    writer: Any,
    model: nn.Module,
    images: Tensor,
    display: Tensor,
    step: int,
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    per_layer: bool = False,
) -> None:
    """Write rollout maps of a fixed image batch to TensorBoard.

    ``images``: the normalised batch on the model's device; ``display``: the same images as float
    RGB in [0, 1], (B, 3, H, W) on the CPU. Writes ``rollout/maps`` (a row per image: image |
    heatmap | overlay) at ``step``, and with ``per_layer`` ``rollout/per_layer`` (a row per image,
    a column per block: that block's head-mean attention, read as the rollout maps are). A model
    whose tokenizer has a spatial attention (CBAM) also gets ``rollout/tokenizer``, laid out as
    ``rollout/maps``: the last stage's map (:func:`tokenizer_attention_maps`), min-max
    normalised like the rollout. Runs one forward pass in eval mode without gradients, then
    restores the model's mode.
    """
    inner = unwrap_model(model)
    grid, layout = model_geometry(inner)
    size = (display.shape[-2], display.shape[-1])
    was_training = inner.training
    inner.eval()
    try:
        with (
            torch.no_grad(),
            capture_attention(inner) as attentions,
            capture_tokenizer_attention(inner) as tokenizer_maps,
        ):
            inner(images)
    finally:
        inner.train(was_training)
    pool_weights = last_or_none([w.float().cpu() for w in attentions.pool_weights])
    weights = [a.float().cpu() for a in attentions]
    joint = attention_rollout(
        weights, head_fusion, discard_ratio, class_token=layout["class_token"]
    )
    maps = rollout_to_maps(joint, grid, size, pool_weights=pool_weights, **layout)
    display = display.float().cpu()
    writer.add_image("rollout/maps", rollout_grid(display, maps), step)
    if tokenizer_maps:
        gated = upsample(tokenizer_maps[-1].float().cpu()[:, 0], size)
        writer.add_image("rollout/tokenizer", rollout_grid(display, normalize_maps(gated)), step)
    if per_layer:
        from torchvision.utils import make_grid

        # Raw per-block attention (no rollout): a block's own head-mean weights as the "joint",
        # read with the last forward's pooling weights where the model pools by sequence.
        layers = [
            rollout_to_maps(a.mean(dim=1), grid, size, pool_weights=pool_weights, **layout)
            for a in weights
        ]
        heat = colorize(rearrange(torch.stack(layers, dim=1), "b l h w -> (b l) h w"))
        writer.add_image(
            "rollout/per_layer", make_grid(heat, nrow=len(layers), padding=2, pad_value=1.0), step
        )
