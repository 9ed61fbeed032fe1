"""The one map renderer: every attention-map picture of the package (TensorBoard, ``python -m
vit.rollout``, the notebooks, the docs) is drawn by :func:`render_maps` or
:func:`render_layer_maps`.

What a picture shows, and why:

- A row per image: the image, the map, the map over the image; above the row the true class (when
  known), the predicted class and its probability, green when right and red when wrong.
- One fixed colour scale for every panel, image, epoch and model: the map relative to a uniform
  map (:func:`~vit.rollout.maps.relative_to_uniform`; 1 = every patch gets the same share), on a
  log axis from ``1/scale`` to ``scale`` (default 1/8 to 8), with a colour bar. A flat map is one
  flat colour, however it was computed; a map stretched to its own min and max (what many tools
  draw) makes a 1.03x difference look as vivid as a 20x one. Each map panel prints its peak, the
  most-attended patch's share relative to uniform ("peak 3.2x").
- A perceptual colormap (matplotlib's ``inferno``: lightness rises monotonically, readable in grey
  and by colour-blind readers), not jet.
- Panels of ``panel`` pixels (default 128, at least 96: TensorBoard's default view shows images
  at their own size, and 32-pixel panels are unreadable).

Drawn with matplotlib's Agg canvas (no pyplot, no display), whose bundled DejaVu font makes the
text, and so the pixels, the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COLORMAP",
    "SCALE",
    "colorize",
    "figure_to_array",
    "layout_size",
    "overlay",
    "panel_origin",
    "render_layer_maps",
    "render_maps",
    "to_unit",
]

COLORMAP = "inferno"
SCALE = 8.0  # the colour axis runs from SCALE⁻¹ to SCALE times a uniform map's value
MIN_PANEL = 96

# Layout in pixels (the figure is drawn at 100 dpi, so 1 inch = 100 px).
_DPI = 100
_MARGIN, _GAP, _HEADER, _COLUMN_TITLE = 6, 4, 18, 16
_BAR_H, _BAR_BELOW = 10, 34  # the colour bar, and its tick labels and caption beneath it
_FONT = 8.0  # points


def _lut() -> Tensor:
    import matplotlib

    return torch.from_numpy(matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3]).float()


def colorize(values: Tensor) -> Tensor:
    """Values (B, H, W) in [0, 1] → RGB (B, 3, H, W) in [0, 1] with the perceptual ``inferno``
    colormap (values outside [0, 1] are clipped)."""
    idx = (values.detach().float().cpu().clamp(0, 1) * 255).round().long()
    return _lut()[idx].permute(0, 3, 1, 2).contiguous()


def overlay(display: Tensor, values: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend RGB images (B, 3, H, W) in [0, 1] with the colours of ``values`` (B, H, W) in
    [0, 1]."""
    return ((1 - alpha) * display.float().cpu() + alpha * colorize(values)).clamp(0, 1)


def to_unit(relative: Tensor, scale: float = SCALE) -> Tensor:
    """Maps relative to uniform (1 = uniform) → [0, 1] on the fixed log axis from ``1/scale``
    (0) through 1 (0.5) to ``scale`` (1); values beyond are clipped."""
    if not scale > 1:
        raise ValueError(f"scale must be > 1, got {scale!r}")
    logs = relative.float().clamp_min(1e-12).log() / math.log(scale)
    return ((logs + 1) / 2).clamp(0, 1)


def figure_to_array(fig: Any) -> np.ndarray:
    """A matplotlib ``Figure`` drawn on an Agg canvas → uint8 RGB (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    """(B, C, h, w) → (B, C, size, size)."""
    if mode == "bilinear":
        return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return F.interpolate(x.float(), size=(size, size), mode="nearest-exact")


def _headline(
    i: int,
    true: Sequence[str | None] | None,
    predicted: Sequence[str] | None,
    probs: Sequence[float] | None,
    names: Sequence[str] | None,
) -> tuple[str, str]:
    """The text above row ``i`` and its colour (green: right, red: wrong, black: unknown)."""
    parts, colour = [], "black"
    if names is not None:  # long file names shortened in the middle: the headline is one line
        # A file name that is not UTF-8 (surrogate-escaped bytes) is shown escaped: caf\xe9.png.
        name = names[i].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        parts.append(name if len(name) <= 24 else f"{name[:11]}…{name[-11:]}")
    t = true[i] if true is not None else None
    if t is not None:
        parts.append(f"true {t}")
    if predicted is not None:
        p = f"predicted {predicted[i]}"
        if probs is not None:
            p += f" ({probs[i]:.0%})"
        parts.append(p)
        if t is not None:
            colour = "#117711" if predicted[i] == t else "#bb0000"
    return "  ·  ".join(parts), colour


def _draw(
    columns: list[str],
    rows: list[list[np.ndarray]],
    peaks: list[list[float | None]],
    headlines: list[tuple[str, str]],
    panel: int,
    scale: float,
    bar_label: str,
) -> np.ndarray:
    """The figure: ``rows`` of RGB panels (panel, panel, 3) under ``columns`` titles, a headline
    per row, a peak label on each map panel, the colour bar at the bottom."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n_cols = len(columns)
    width, height = layout_size(len(rows), n_cols, panel)
    row_h = _HEADER + panel + _GAP
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")

    def box(x: float, y_top: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Pixels from the top-left → matplotlib's figure fractions from the bottom-left."""
        return (x / width, 1 - (y_top + h) / height, w / width, h / height)

    # The panels go into one pixel canvas drawn 1:1 (figimage: no resampling, and far cheaper
    # than an Axes per panel); text and the colour bar are drawn over it.
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, rgb in enumerate(row):
            x, y_top = panel_origin(len(rows), n_cols, panel, i, j)
            canvas[y_top : y_top + panel, x : x + panel] = rgb
    fig.figimage(canvas, 0, 0, origin="upper", resize=False, zorder=-1)  # under the colour bar
    left, _ = panel_origin(len(rows), n_cols, panel, 0, 0)
    for j, title in enumerate(columns):
        fig.text(
            (left + j * (panel + _GAP) + panel / 2) / width,
            1 - (_MARGIN + _COLUMN_TITLE / 2) / height,
            title,
            ha="center",
            va="center",
            fontsize=_FONT,
            fontweight="bold",
        )
    for i, (row_peaks, (headline, colour)) in enumerate(zip(peaks, headlines, strict=True)):
        y = panel_origin(len(rows), n_cols, panel, i, 0)[1] - _HEADER
        fig.text(
            left / width,
            1 - (y + _HEADER / 2) / height,
            headline,
            ha="left",
            va="center",
            # Shrunk to fit the width when long (DejaVu Sans: ~0.62 em per character).
            fontsize=max(
                6.0, min(_FONT + 1, (width - 2 * left) / (0.62 * max(len(headline), 1)) * 0.72)
            ),
            color=colour,
        )
        for j, peak in enumerate(row_peaks):
            x, y_top = panel_origin(len(rows), n_cols, panel, i, j)
            if peak is not None:
                fig.text(
                    (x + 2) / width,
                    1 - (y_top + panel - 2) / height,
                    f"peak {peak:.2f}×" if peak < 10 else f"peak {peak:.0f}×",
                    color="white",
                    fontsize=_FONT - 1,
                    ha="left",
                    va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0},
                )
    bar_w = min(width - 2 * _MARGIN - 24, 360)  # tick labels overhang the ends
    bar_y = _MARGIN + _COLUMN_TITLE + len(rows) * row_h
    cax = fig.add_axes(box((width - bar_w) / 2, bar_y, bar_w, _BAR_H))
    mappable = ScalarMappable(norm=LogNorm(1 / scale, scale), cmap=COLORMAP)
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
    ticks = [2.0**k for k in range(-int(math.log2(scale)), int(math.log2(scale)) + 1)]
    bar.set_ticks(ticks, labels=[f"1/{round(1 / t)}" if t < 1 else f"{t:g}" for t in ticks])
    bar.minorticks_off()
    bar.ax.tick_params(labelsize=_FONT - 1, length=2, pad=1)
    bar.set_label(bar_label, fontsize=_FONT - 1, labelpad=1)
    return figure_to_array(fig)


def layout_size(n_rows: int, n_cols: int, panel: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture of ``n_rows`` x ``n_cols`` panels."""
    width = max(2 * _MARGIN + n_cols * panel + (n_cols - 1) * _GAP, 300)  # room for the bar
    height = _MARGIN + _COLUMN_TITLE + n_rows * (_HEADER + panel + _GAP) + _BAR_H + _BAR_BELOW
    return width, height


def panel_origin(n_rows: int, n_cols: int, panel: int, row: int, col: int) -> tuple[int, int]:
    """(x, y) pixels of the top-left corner of panel (``row``, ``col``) in such a picture."""
    width, _ = layout_size(n_rows, n_cols, panel)
    left = (width - (n_cols * panel + (n_cols - 1) * _GAP)) // 2
    top = _MARGIN + _COLUMN_TITLE + row * (_HEADER + panel + _GAP) + _HEADER
    return left + col * (panel + _GAP), top


def _check(display: Tensor, maps: Tensor, panel: int) -> None:
    if display.ndim != 4 or display.shape[1] != 3:
        raise ValueError(f"display must be RGB images (B, 3, H, W), got {tuple(display.shape)}")
    if maps.shape[0] != display.shape[0]:
        raise ValueError(
            f"{maps.shape[0]} maps for {display.shape[0]} images; pass one map per image"
        )
    if panel < MIN_PANEL:
        raise ValueError(f"panel must be at least {MIN_PANEL} pixels to be readable, got {panel}")


def render_maps(
    display: Tensor,
    maps: Tensor,
    *,
    true: Sequence[str | None] | None = None,
    predicted: Sequence[str] | None = None,
    probs: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    title: str = "attention rollout",
    panel: int = 128,
    scale: float = SCALE,
) -> np.ndarray:
    """The labelled picture of B images and their maps: a row per image with the image, the map
    and the overlay, each ``panel`` pixels square; a headline per row (``names``, ``true`` class,
    ``predicted`` class with its probability ``probs``); the map's peak; one colour bar.

    ``display``: RGB images (B, 3, H, W) in [0, 1], any size (shown enlarged, pixels kept sharp).
    ``maps``: (B, h, w) relative to a uniform map (``explain(...).maps``, or
    ``rollout_to_maps(..., scale="uniform")``), any grid; upsampled bilinearly to the panel.
    ``title``: the map column's title (say which map: "rollout (max, discard 0.9)").
    Returns uint8 RGB (H', W', 3): ``PIL.Image.fromarray`` saves it,
    ``SummaryWriter.add_image(tag, it, step, dataformats="HWC")`` logs it.

    Raises:
        ValueError: shapes that do not match, or ``panel`` under 96 pixels.
    """
    _check(display, maps, panel)
    image = _resize(display, panel, "nearest").clamp(0, 1)  # (B, 3, P, P)
    relative = _resize(maps[:, None], panel, "bilinear")[:, 0]  # (B, P, P)
    heat = colorize(to_unit(relative, scale))
    blend = (0.5 * image + 0.5 * heat).clamp(0, 1)
    rows, peaks, headlines = [], [], []
    for i in range(display.shape[0]):
        rows.append([_hwc(image[i]), _hwc(heat[i]), _hwc(blend[i])])
        peaks.append([None, float(maps[i].max()), None])
        headlines.append(_headline(i, true, predicted, probs, names))
    return _draw(["image", title, "overlay"], rows, peaks, headlines, panel, scale, _BAR_LABEL)


def render_layer_maps(
    display: Tensor,
    layer_maps: Tensor,
    *,
    true: Sequence[str | None] | None = None,
    predicted: Sequence[str] | None = None,
    probs: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    panel: int = 96,
    scale: float = SCALE,
) -> np.ndarray:
    """Per-block maps on the same scale as :func:`render_maps`: a row per image, the image then a
    column per block (``layer_maps`` (B, depth, h, w) relative to uniform, e.g.
    ``explain(..., per_layer=True).layers``: each block's own head-mean attention)."""
    _check(display, layer_maps, panel)
    depth = layer_maps.shape[1]
    image = _resize(display, panel, "nearest").clamp(0, 1)
    relative = _resize(layer_maps, panel, "bilinear")  # (B, depth, P, P)
    rows, peaks, headlines = [], [], []
    for i in range(display.shape[0]):
        heat = colorize(to_unit(relative[i], scale))  # (depth, 3, P, P)
        rows.append([_hwc(image[i]), *(_hwc(h) for h in heat)])
        peaks.append([None, *(float(m.max()) for m in layer_maps[i])])
        headlines.append(_headline(i, true, predicted, probs, names))
    columns = ["image", *(f"block {b + 1}" for b in range(depth))]
    return _draw(columns, rows, peaks, headlines, panel, scale, _BAR_LABEL)


_BAR_LABEL = "attention ÷ uniform (1 = all patches equal; log scale)"


def _hwc(x: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → uint8 (H, W, 3)."""
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
