"""Attention rollout: where a Vision Transformer looks, from its own attention weights.

Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers": fuse each block's heads, add
the identity for the residual connection, renormalise the rows and multiply the blocks' matrices
from the first to the last; the class token's row over the patch columns is the map (for models
without a class token: the mean of the patch rows, or, with CCT's sequence pooling, the rows
weighted by the pooling's softmax weights, the last mixing step). Chefer et al.
2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", weight the attention by its gradient for a class-specific map
(:func:`gradient_rollout`).

The weights come from :func:`capture_attention`, which switches the encoder's attention modules to
their explicit path only while it is active, so training never pays for visualisation. A
convolutional tokenizer with CBAM (``tokenizer="conv", conv_attention="cbam"``) has its own
spatial attention, shown beside the rollout by :func:`tokenizer_attention_maps`.

Command line::

    python -m vit.rollout --checkpoint PATH --images a.jpg b.png --out-dir maps/
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.utils import unwrap_model
from torch import Tensor, nn

from vit.conv_stem import SequencePool
from vit.layers import Attention, EncoderBlock

__all__ = [
    "AttentionRecord",
    "attention_rollout",
    "capture_attention",
    "colorize",
    "gradient_rollout",
    "log_rollout",
    "normalize_maps",
    "overlay",
    "rollout_grid",
    "rollout_maps",
    "rollout_to_maps",
    "tokenizer_attention_maps",
]

HeadFusion = Literal["mean", "max", "min"]
Pool = Literal["cls", "mean", "seq"]
_FUSIONS = ("mean", "max", "min")


# ----------------------------------------------------------------------------------------------
# Capturing the weights
# ----------------------------------------------------------------------------------------------
def _encoder_attentions(model: nn.Module) -> list[Attention]:
    inner = unwrap_model(model)
    found = [m.attn for m in inner.modules() if isinstance(m, EncoderBlock)]
    if not found:
        raise ValueError(
            f"{type(inner).__name__} has no vit.layers.EncoderBlock to record attention from; "
            f"pass a vit VisionTransformer (timm models: convert them with vit.models.from_timm)"
        )
    return found


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
    modules = _encoder_attentions(model)
    pools = [m for m in unwrap_model(model).modules() if isinstance(m, SequencePool)]
    if any(m.recorder is not None for m in [*modules, *pools]):
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
        for m in [*modules, *pools]:
            m.recorder = None


def _tokenizer_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The tokenizer's modules that expose a spatial attention map (CBAM), stage by stage."""
    tokenizer = getattr(unwrap_model(model), "patch_embed", None)
    if tokenizer is None:
        return []
    return [m for m in tokenizer.modules() if callable(getattr(m, "spatial_attention", None))]


@contextlib.contextmanager
def _capture_tokenizer_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Record the tokenizer's spatial maps, (B, 1, h, w) per stage per forward, while active."""
    modules = _tokenizer_attention_modules(model)
    maps: list[Tensor] = []
    try:
        for m in modules:
            m.recorder = maps.append
        yield maps
    finally:
        for m in modules:
            m.recorder = None


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def _check_attentions(attentions: Sequence[Tensor]) -> None:
    if isinstance(attentions, Tensor) or not isinstance(attentions, Sequence):
        raise TypeError(
            "attentions must be a list of (B, heads, L, L) tensors, one per block (what "
            f"capture_attention yields), got {type(attentions).__name__}"
        )
    if len(attentions) == 0:
        raise ValueError(
            "no attention weights to roll out: run the model's forward pass inside "
            "`with capture_attention(model) as attentions:`"
        )
    first = attentions[0]
    for i, a in enumerate(attentions):
        if not isinstance(a, Tensor) or a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"attentions[{i}] must be a (B, heads, L, L) tensor of self-attention weights, "
                f"got {shape}"
            )
        if a.shape != first.shape:
            raise ValueError(
                f"attentions[{i}] has shape {tuple(a.shape)} but attentions[0] has "
                f"{tuple(first.shape)}; pass the weights of one forward pass of one model"
            )


def _fuse_heads(a: Tensor, head_fusion: str) -> Tensor:
    """(B, heads, L, L) → (B, L, L)."""
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    return a.amin(dim=1)


def _discard_lowest(a: Tensor, ratio: float, class_token: bool) -> Tensor:
    """Zero the lowest ``ratio`` share of each image's weights, never the class-token column:
    attention to the class token is the path by which patch information reaches the output."""
    if ratio == 0.0:
        return a
    n = a.shape[1]
    keep_cols = 1 if class_token else 0
    candidates = rearrange(a[:, :, keep_cols:], "b l s -> b (l s)")  # (B, L·(L-1)) or (B, L·L)
    k = int(candidates.shape[1] * ratio)
    if k == 0:
        return a
    idx = candidates.topk(k, dim=1, largest=False).indices
    candidates = candidates.scatter(1, idx, 0.0)
    rest = rearrange(candidates, "b (l s) -> b l s", l=n)
    return torch.cat([a[:, :, :keep_cols], rest], dim=2)


def attention_rollout(
    attentions: Sequence[Tensor],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    *,
    class_token: bool = True,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): the joint attention (B, L, L) of the output tokens
    to the input tokens, through all blocks from ``start_layer`` on.

    Per block: fuse the heads (``"mean"`` as in the paper; ``"max"``/``"min"`` as in Gildenblat's
    vit-explain), zero the lowest ``discard_ratio`` share of the weights (never the class-token
    column, which ``class_token=False`` disables for mean-pooled models), add the identity for the
    residual connection, renormalise the rows; then multiply from the first block to the last,
    ``Ã_l = A_l · Ã_{l-1}``. Rows of the result sum to 1.
    """
    _check_attentions(attentions)
    if head_fusion not in _FUSIONS:
        raise ValueError(f"head_fusion must be one of {_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    if not isinstance(start_layer, int) or not 0 <= start_layer < len(attentions):
        raise ValueError(
            f"start_layer must be an integer in [0, {len(attentions)}) for {len(attentions)} "
            f"blocks, got {start_layer!r}"
        )
    n = attentions[0].shape[-1]
    eye = torch.eye(n, device=attentions[0].device)
    joint: Tensor | None = None
    for a in attentions[start_layer:]:
        fused = _fuse_heads(a.detach().float(), head_fusion)  # (B, L, L)
        fused = _discard_lowest(fused, discard_ratio, class_token) + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        joint = fused if joint is None else torch.bmm(fused, joint)
    assert joint is not None  # start_layer < len(attentions)
    return joint


def gradient_rollout(
    model: nn.Module,
    images: Tensor,
    target: Tensor | int | None = None,
    *,
    start_layer: int = 0,
) -> Tensor:
    """Class-specific relevance (Chefer et al. 2021, "Generic Attention-model Explainability",
    eq. 5-6): per block ``Ā = mean_heads((∇A ⊙ A)⁺)``, then ``R ← R + Ā·R`` from ``R = I``.

    ``target``: the class to explain per image (B,), one class for all, or ``None`` for the
    predicted class. Returns the relevance (B, L, L); :func:`rollout_to_maps` turns it into maps.
    Runs in eval mode (restored afterwards) and leaves the parameters' ``.grad`` untouched.
    """
    inner = unwrap_model(model)
    depth = len(_encoder_attentions(inner))
    if not 0 <= start_layer < depth:
        raise ValueError(
            f"start_layer must be in [0, {depth}) for {depth} blocks, got {start_layer!r}"
        )
    was_training = inner.training
    inner.eval()
    try:
        with torch.enable_grad(), capture_attention(inner) as attentions:
            logits = inner(images)
        if logits.ndim != 2:
            raise ValueError(
                f"gradient_rollout needs a classifier returning (B, classes) logits, got "
                f"{tuple(logits.shape)}"
            )
        if target is None:
            target = logits.argmax(dim=1)
        target = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, attentions)
    finally:
        inner.train(was_training)
    n = attentions[0].shape[-1]
    relevance = torch.eye(n, device=images.device).expand(images.shape[0], n, n)
    for a, g in list(zip(attentions, grads, strict=True))[start_layer:]:
        cam = (g * a).detach().float().clamp(min=0).mean(dim=1)  # (B, L, L)
        relevance = relevance + torch.bmm(cam, relevance)
    return relevance


# ----------------------------------------------------------------------------------------------
# Maps and rendering
# ----------------------------------------------------------------------------------------------
def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise maps (B, H, W) per image to [0, 1]; a constant map becomes all zeros
    (there is nothing to highlight)."""
    flat = rearrange(maps, "b h w -> b (h w)")
    lo = flat.amin(dim=1)[:, None, None]
    hi = flat.amax(dim=1)[:, None, None]
    span = hi - lo
    # Differences at float32 rounding level are not structure: do not stretch them to [0, 1].
    flat_map = span <= 1e-5 * hi.abs().clamp_min(1e-12)
    return torch.where(flat_map, torch.zeros_like(maps), (maps - lo) / span.clamp_min(1e-12))


def rollout_to_maps(
    joint: Tensor,
    grid_size: tuple[int, int] | int,
    image_size: tuple[int, int] | int | None = None,
    *,
    class_token: bool = True,
    pool: Pool | None = None,
    pool_weights: Tensor | None = None,
) -> Tensor:
    """Joint attention (B, L, L) → per-image maps normalised to [0, 1].

    ``pool`` is how the model reads its output (default: ``"cls"`` with a class token, else
    ``"mean"``), and so which rows of ``joint`` the map reads, over the patch columns:

    - ``"cls"``: the class token's row.
    - ``"mean"``: the mean of the patch rows, since every patch output contributes equally to the
      pooled vector.
    - ``"seq"`` (CCT's sequence pooling): the patch rows weighted by ``pool_weights`` (B, N), the
      pooling's softmax weights over the patch outputs (``capture_attention``'s
      ``.pool_weights``), i.e. ``pool_weights @ joint``: the pooling is the last mixing step.

    Returned on the token grid ``grid_size`` (B, gh, gw), or bilinearly upsampled to
    ``image_size`` (B, H, W).
    """
    pool = pool or ("cls" if class_token else "mean")
    if pool not in ("cls", "mean", "seq") or (pool == "cls" and not class_token):
        raise ValueError(f"pool must be 'mean', 'seq', or 'cls' with a class token; got {pool!r}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    prefix = 1 if class_token else 0
    if joint.ndim != 3 or joint.shape[1] != joint.shape[2] or joint.shape[2] != prefix + gh * gw:
        raise ValueError(
            f"joint attention of shape {tuple(joint.shape)} does not fit a {gh}x{gw} patch grid "
            f"{'with' if class_token else 'without'} a class token (expected (B, {prefix + gh * gw}"
            f", {prefix + gh * gw})); pass the model's grid_size and class_token"
        )
    if pool == "seq":
        if pool_weights is None or tuple(pool_weights.shape) != (joint.shape[0], gh * gw):
            got = None if pool_weights is None else tuple(pool_weights.shape)
            raise ValueError(
                f"pool='seq' needs the sequence pooling's weights of shape "
                f"({joint.shape[0]}, {gh * gw}) (capture_attention's .pool_weights), got {got}"
            )
        w = pool_weights.detach().to(joint)[:, None]  # (B, 1, N)
        weights = torch.bmm(w, joint[:, prefix:, prefix:])[:, 0]  # (B, N)
    elif pool == "cls":
        weights = joint[:, 0, prefix:]
    else:
        weights = joint[:, prefix:, prefix:].mean(dim=1)
    maps = rearrange(weights, "b (gh gw) -> b gh gw", gh=gh, gw=gw)
    if image_size is not None:
        maps = _upsample(maps, image_size)
    return normalize_maps(maps)


def _upsample(maps: Tensor, image_size: tuple[int, int] | int) -> Tensor:
    """Maps (B, h, w) → (B, H, W), bilinear."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _model_geometry(model: nn.Module) -> tuple[tuple[int, int], dict[str, Any]]:
    """The token grid, and the keywords telling :func:`rollout_to_maps` how the model pools."""
    inner = unwrap_model(model)
    grid = getattr(inner, "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(inner).__name__} has no grid_size; pass a VisionTransformer")
    class_token = getattr(inner, "num_prefix_tokens", 1) > 0
    pool = getattr(getattr(inner, "config", None), "pool", None)
    return tuple(grid), {"class_token": class_token, "pool": pool}


def _last(weights: list[Tensor]) -> Tensor | None:
    return weights[-1] if weights else None


def rollout_maps(
    model: nn.Module,
    images: Tensor,
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    image_size: tuple[int, int] | int | None = None,
) -> Tensor:
    """One call: the rollout maps (B, H, W) in [0, 1] of ``model`` for normalised ``images``.

    Runs one forward pass without gradients (in the model's current mode) and upsamples the maps
    to ``image_size`` (default: the input's size). The rows read follow the model's pooling (see
    :func:`rollout_to_maps`; sequence pooling folds in its weights).
    """
    grid, layout = _model_geometry(model)
    with torch.no_grad(), capture_attention(model) as attentions:
        unwrap_model(model)(images)
    joint = attention_rollout(
        attentions, head_fusion, discard_ratio, start_layer, class_token=layout["class_token"]
    )
    size = image_size or tuple(images.shape[-2:])
    return rollout_to_maps(joint, grid, size, pool_weights=_last(attentions.pool_weights), **layout)


def tokenizer_attention_maps(model: nn.Module, images: Tensor, *, stage: int = -1) -> Tensor:
    """The convolutional tokenizer's own spatial attention for normalised ``images``: CBAM's map
    ``M_s`` (Woo et al. 2018, eq. 3) of tokenizer stage ``stage`` (default: the last, whose map
    lies on the token grid, ``model.grid_size``), as (B, h, w) sigmoid values in [0, 1].

    Shown beside the rollout map: where the convolutions gate features before any token mixing.
    Runs one forward pass without gradients, in the model's current mode.

    Raises:
        ValueError: the model's tokenizer has no module with a spatial map (build it with
            ``tokenizer="conv", conv_attention="cbam"``), or ``stage`` is out of range.
    """
    modules = _tokenizer_attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s tokenizer has no spatial attention to show; "
            f"build the model with tokenizer='conv', conv_attention='cbam'"
        )
    if not -len(modules) <= stage < len(modules):
        raise ValueError(f"stage must be in [-{len(modules)}, {len(modules)}), got {stage!r}")
    with torch.no_grad(), _capture_tokenizer_attention(model) as maps:
        unwrap_model(model)(images)
    return maps[stage][:, 0]  # (B, 1, h, w) -> (B, h, w)


def colorize(maps: Tensor) -> Tensor:
    """Maps (B, H, W) in [0, 1] → RGB heatmaps (B, 3, H, W) with the jet colormap.

    The piecewise-linear jet ramp is written out so rendering needs no matplotlib.
    """
    x = maps.clamp(0, 1)[:, None]
    centres = torch.tensor([0.75, 0.5, 0.25], device=maps.device)[None, :, None, None]  # r, g, b
    return (1.5 - (4 * x - 4 * centres).abs()).clamp(0, 1)


def overlay(display: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend RGB images (B, 3, H, W) in [0, 1] with the heatmaps of ``maps`` (B, H, W)."""
    return ((1 - alpha) * display + alpha * colorize(maps)).clamp(0, 1)


def rollout_grid(display: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """One (3, H', W') image: a row per image with image | heatmap | overlay."""
    from torchvision.utils import make_grid

    heat = colorize(maps)
    rows = torch.stack([display, heat, overlay(display, maps, alpha)], dim=1)  # (B, 3, C, H, W)
    return make_grid(rearrange(rows, "b k c h w -> (b k) c h w"), nrow=3, padding=2, pad_value=1.0)


# ----------------------------------------------------------------------------------------------
# TensorBoard hook for the training engine
# ----------------------------------------------------------------------------------------------
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
    grid, layout = _model_geometry(inner)
    size = tuple(display.shape[-2:])
    was_training = inner.training
    inner.eval()
    try:
        with (
            torch.no_grad(),
            capture_attention(inner) as attentions,
            _capture_tokenizer_attention(inner) as tokenizer_maps,
        ):
            inner(images)
    finally:
        inner.train(was_training)
    pool_weights = _last([w.float().cpu() for w in attentions.pool_weights])
    attentions = [a.float().cpu() for a in attentions]
    joint = attention_rollout(
        attentions, head_fusion, discard_ratio, class_token=layout["class_token"]
    )
    maps = rollout_to_maps(joint, grid, size, pool_weights=pool_weights, **layout)
    display = display.float().cpu()
    writer.add_image("rollout/maps", rollout_grid(display, maps), step)
    if tokenizer_maps:
        gated = _upsample(tokenizer_maps[-1].float().cpu()[:, 0], size)
        writer.add_image("rollout/tokenizer", rollout_grid(display, normalize_maps(gated)), step)
    if per_layer:
        from torchvision.utils import make_grid

        # Raw per-block attention (no rollout): a block's own head-mean weights as the "joint",
        # read with the last forward's pooling weights where the model pools by sequence.
        layers = [
            rollout_to_maps(a.mean(dim=1), grid, size, pool_weights=pool_weights, **layout)
            for a in attentions
        ]
        heat = colorize(rearrange(torch.stack(layers, dim=1), "b l h w -> (b l) h w"))
        writer.add_image(
            "rollout/per_layer", make_grid(heat, nrow=len(layers), padding=2, pad_value=1.0), step
        )


# ----------------------------------------------------------------------------------------------
# Command line: python -m vit.rollout --checkpoint PATH --images a.jpg b.png --out-dir maps/
# ----------------------------------------------------------------------------------------------
# Overlays are drawn at the model's input crop, enlarged to at least this many pixels (CIFAR's 32
# px is unreadable) and at most the larger bound, whatever the file's resolution.
_DISPLAY_MIN, _DISPLAY_MAX = 128, 512


def _output_paths(paths: list[str], out_dir: Path) -> list[Path]:
    seen: dict[str, int] = {}
    outs = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        suffix = f"_{seen[stem]}" if seen[stem] > 1 else ""  # a/x.png and b/x.png both survive
        outs.append(out_dir / f"{stem}{suffix}_rollout.png")
    return outs


def main(argv: list[str] | None = None) -> int:
    """``python -m vit.rollout``: rollout overlays (image | heatmap | overlay PNGs) for images,
    and each image's predicted class (the same prediction as ``vit.evaluate`` and
    ``vit.predict``: the checkpoint's own preprocessing)."""
    from vit.errors import CliParser, run_command

    parser = CliParser(
        prog="python -m vit.rollout",
        description="Attention-rollout maps (Abnar & Zuidema 2020) of a trained checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--images", nargs="+", required=True, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--out-dir", default="maps", help="where the PNGs go (default: maps)")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write the maps as an event file")
    parser.add_argument("--head-fusion", choices=_FUSIONS, default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="in [0, 1)")
    parser.add_argument("--start-layer", type=int, default=0, help="first block of the rollout")
    parser.add_device()
    return run_command(lambda: _run_cli(parser.parse_args(argv)))


def _run_cli(args: Any) -> None:
    from torchvision.utils import save_image

    from vit.checkpoint import checkpoint_preprocess, load_model
    from vit.config import resolve_device
    from vit.errors import ConfigError, UsageError
    from vit.preprocess import decode_image, display_path

    if not 0.0 <= args.discard_ratio < 1.0:  # also refuses NaN
        raise ConfigError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    out_dir = Path(args.out_dir)
    for flag, folder in (("--out-dir", out_dir), ("--tensorboard", args.tensorboard)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder} is a file; pass a folder")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint)
    if ckpt["task"] != "classify":
        raise UsageError(
            f"{args.checkpoint} is a {ckpt['task']!r} checkpoint; rollout maps need an image "
            f"classifier trained with --task classify"
        )
    preprocess = checkpoint_preprocess(ckpt)
    classes = list(ckpt["task_state"].get("classes") or [])
    model.to(device)
    depth = len(_encoder_attentions(model))
    if not 0 <= args.start_layer < depth:
        raise ConfigError(f"--start-layer must be in [0, {depth}) for this {depth}-block model")
    size = preprocess.img_size
    shown = min(_DISPLAY_MAX, max(_DISPLAY_MIN, size))
    inputs, display = [], []
    for path in args.images:
        im = decode_image(path)
        if im.size != (size, size):
            how = "whole image" if preprocess.resize == "squash" else "shorter side, centre crop"
            print(
                f"note: {display_path(path)} is {im.width}x{im.height}; resized to "
                f"{size}x{size} ({how}, as in training)",
                file=sys.stderr,
            )
        inputs.append(preprocess.resize_image(im))  # uint8 (3, S, S)
        # The same crop at display resolution: the maps line up with what the model saw.
        display.append(preprocess.resize_image(im, shown).float() / 255)
    inputs, display = torch.stack(inputs), torch.stack(display)

    grid, layout = _model_geometry(model)
    with (
        torch.no_grad(),
        capture_attention(model) as attentions,
        _capture_tokenizer_attention(model) as tokenizer_maps,
    ):
        probs = model(preprocess.normalize(inputs).to(device)).float().softmax(dim=-1).cpu()
    joint = attention_rollout(
        [a.float().cpu() for a in attentions],
        args.head_fusion,
        args.discard_ratio,
        args.start_layer,
        class_token=layout["class_token"],
    )
    pool_weights = _last([w.float().cpu() for w in attentions.pool_weights])
    maps = rollout_to_maps(joint, grid, shown, pool_weights=pool_weights, **layout)  # (B, S, S)
    gated = None
    if tokenizer_maps:  # CBAM in the tokenizer: its last stage's spatial map beside the rollout
        gated = normalize_maps(_upsample(tokenizer_maps[-1].float().cpu()[:, 0], shown))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {out_dir}: {e.strerror}") from None
    for i, out in enumerate(_output_paths(args.images, out_dir)):
        save_image(rollout_grid(display[i : i + 1], maps[i : i + 1]), out)
        if gated is not None:
            tokenizer_out = out.with_name(out.name.replace("_rollout.png", "_tokenizer.png"))
            save_image(rollout_grid(display[i : i + 1], gated[i : i + 1]), tokenizer_out)
        conf, cls = probs[i].max(dim=0)
        name = classes[cls.item()] if cls.item() < len(classes) else str(cls.item())
        shown = f"{display_path(args.images[i])} -> {display_path(out)}"
        print(f"{shown} (predicted {name}, p={conf.item():.2f})")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            writer.add_image("rollout/maps", rollout_grid(display, maps), 0)
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")


if __name__ == "__main__":
    raise SystemExit(main())
