"""Where a captioner looks: word → patch attention maps, and the labelled strip drawn from them."""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from vit.captions.tokenizer import Tokenizer
from vit.models._helpers import unwrap_model
from vit.rollout import overlay, relative_to_uniform
from vit.rollout.render import MIN_PANEL, to_unit

__all__ = ["attention_strip", "cross_attention_maps"]


class _WordAttention(Protocol):
    """What a captioner (CaptioningTransformer, CaptioningLSTM) provides for the maps."""

    def word_attention(self, images: Tensor, tokens: Tensor, **options: Any) -> Tensor: ...


@torch.no_grad()
def cross_attention_maps(
    model: nn.Module, images: Tensor, tokens: Tensor, **options: Any
) -> Tensor:
    """Word → patch attention of a captioner reading ``tokens`` (B, T) (``<bos>`` first) for
    ``images``, on the patch grid: (B, T, gh, gw); row t is where the model looks to predict token
    t+1. Each captioner says what that is through its ``word_attention(images, tokens)``: the last
    decoder block's cross-attention (head mean; ``layer=i`` picks another block) for
    :class:`~vit.models.CaptioningTransformer`, the soft attention α for
    :class:`~vit.models.CaptioningLSTM`."""
    captioner = cast(_WordAttention, unwrap_model(model))
    return captioner.word_attention(images, tokens, **options)


def attention_strip(
    model: nn.Module, x: Tensor, display: Tensor, caption: str, tokenizer: Tokenizer
) -> Tensor:
    """One (3, H', W') picture: the image, then for each word of ``caption`` where the captioner
    looked to write it (:func:`cross_attention_maps`: a Transformer's last cross-attention, an
    LSTM's α) over the image, labelled with the word and the map's peak. Panels of at least 96
    pixels; the maps on the fixed scale of every map picture (:mod:`vit.rollout.render`: relative
    to a uniform map, log axis from 1/8 to 8, ``inferno``), so a word the model wrote while
    looking everywhere shows a flat panel rather than a stretched one."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    inner = unwrap_model(model)
    ids, _, _ = tokenizer.encode(caption)
    words = Tokenizer.split(caption)
    # Inputs <bos> w1 .. wn: row t of the maps is where the model looked to predict word t+1.
    tokens = torch.tensor([ids[:-1]], device=x.device)
    maps = cross_attention_maps(inner, x, tokens)[0, : len(words)].float().cpu()  # (n, gh, gw)
    maps = relative_to_uniform(maps)
    scale = max(1, math.ceil(MIN_PANEL / display.shape[-1]))
    size = (display.shape[-2] * scale, display.shape[-1] * scale)
    big = torch.nn.functional.interpolate(display[None].cpu(), size=size, mode="nearest")[0]
    heat = torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear")[:, 0]
    panels = [big, *overlay(big.expand(len(heat), -1, -1, -1), to_unit(heat))]
    # "x", not "×": Pillow's bundled default font has no multiplication sign.
    labels = ["", *(f"{w} {m.max():.1f}x" for w, m in zip(words, maps, strict=True))]
    label_h = 16
    h, w = size
    font = ImageFont.load_default(size=12)
    canvas = Image.new("RGB", (len(panels) * (w + 2), h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        arr = (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(arr), (j * (w + 2), 0))
        draw.text((j * (w + 2) + 1, h + 1), label, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)  # uint8 (3, H', W')
