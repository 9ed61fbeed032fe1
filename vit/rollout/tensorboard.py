"""The training engine's TensorBoard hook: labelled maps of a fixed set of validation images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from vit.rollout.maps import HeadFusion, explain
from vit.rollout.render import render_layer_maps, render_maps

__all__ = ["log_rollout", "method_title"]


def method_title(method: str, head_fusion: str = "mean", discard_ratio: float = 0.0) -> str:
    """The map column's title: which map, with which options."""
    if method == "gradient":
        return "gradient rollout (predicted)"
    discard = f", discard {discard_ratio:g}" if discard_ratio else ""
    return f"rollout ({head_fusion}{discard})"


def log_rollout(
    writer: Any,
    model: nn.Module,
    images: Tensor,
    display: Tensor,
    step: int,
    *,
    labels: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    per_layer: bool = False,
    gradient: bool = False,
) -> None:
    """Write the labelled map pictures (:func:`vit.rollout.render.render_maps`) of a fixed image
    batch to TensorBoard at ``step``.

    ``images``: the normalised batch on the model's device; ``display``: the same images as float
    RGB in [0, 1], (B, 3, H, W); ``labels``: their true classes (indices into ``classes``, the
    class names). Writes ``rollout/maps`` (a row per image: image | rollout map | overlay, true
    and predicted class, probability, the map's peak relative to uniform, one colour bar);
    with ``per_layer`` ``rollout/per_layer`` (a column per block: that block's own head-mean
    attention); with ``gradient`` ``rollout/gradient`` (the class-specific map of Chefer et al.
    2021 for the predicted class: a forward and backward pass more). A model whose tokenizer has
    a spatial attention (CBAM) also gets ``rollout/tokenizer``, its last stage's map. All on the
    same fixed scale, so pictures of different steps compare. Runs in eval mode and restores the
    model's mode.
    """
    found = explain(
        model,
        images,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        per_layer=per_layer,
    )
    display = display.float().cpu()
    names = list(classes) if classes is not None else None

    def name(i: int) -> str:
        return names[i] if names is not None and i < len(names) else str(i)

    top = found.probs.max(dim=-1)
    text: dict[str, Any] = {
        "true": [name(int(y)) for y in labels] if labels is not None else None,
        "predicted": [name(int(c)) for c in top.indices],
        "probs": top.values.tolist(),
    }
    title = method_title("rollout", head_fusion, discard_ratio)
    add = writer.add_image
    add(
        "rollout/maps",
        render_maps(display, found.maps, title=title, **text),
        step,
        dataformats="HWC",
    )
    if found.tokenizer is not None:
        picture = render_maps(display, found.tokenizer, title="tokenizer (CBAM)", **text)
        add("rollout/tokenizer", picture, step, dataformats="HWC")
    if found.layers is not None:
        add(
            "rollout/per_layer",
            render_layer_maps(display, found.layers, **text),
            step,
            dataformats="HWC",
        )
    if gradient:
        grad = explain(model, images, method="gradient")
        picture = render_maps(display, grad.maps, title=method_title("gradient"), **text)
        add("rollout/gradient", picture, step, dataformats="HWC")
