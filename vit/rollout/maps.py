"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted rollout (Chefer et al. 2021), and
the maps on the image that they give."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vit.models._helpers import unwrap_model
from vit.rollout.capture import (
    capture_attention,
    capture_tokenizer_attention,
    encoder_attentions,
    tokenizer_attention_modules,
)

__all__ = [
    "Explanation",
    "attention_rollout",
    "explain",
    "gradient_rollout",
    "normalize_maps",
    "relative_to_uniform",
    "rollout_maps",
    "rollout_to_maps",
    "tokenizer_attention_maps",
]

HeadFusion = Literal["mean", "max", "min"]
Pool = Literal["cls", "mean", "seq"]
Scale = Literal["minmax", "uniform"]
HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("rollout", "gradient")


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
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
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
    depth = len(encoder_attentions(inner))
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


def relative_to_uniform(maps: Tensor) -> Tensor:
    """Non-negative maps (B, h, w) divided by their own mean: the attention each patch gets
    relative to a uniform map, which is 1 everywhere (2 = twice its share, 0.5 = half). Unlike
    :func:`normalize_maps` this keeps how peaked a map is: a nearly flat map stays near 1, and
    maps of different images, epochs and models share one scale (what the renderer shows). A map
    that is zero everywhere (no relevance at all) comes back flat."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    return torch.where(mean > 0, maps / mean.clamp_min(1e-30), torch.ones_like(maps))


def rollout_to_maps(
    joint: Tensor,
    grid_size: tuple[int, int] | int,
    image_size: tuple[int, int] | int | None = None,
    *,
    class_token: bool = True,
    pool: Pool | None = None,
    pool_weights: Tensor | None = None,
    scale: Scale = "minmax",
) -> Tensor:
    """Joint attention (B, L, L) → per-image maps: with ``scale="minmax"`` each stretched to
    [0, 1] (:func:`normalize_maps`), with ``scale="uniform"`` relative to a uniform map
    (:func:`relative_to_uniform`; 1 = every patch equal), the scale the pictures use.

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
    if scale == "uniform":  # on the token grid, where "a uniform map" means equal tokens
        maps = relative_to_uniform(maps)
    elif scale != "minmax":
        raise ValueError(f"scale must be 'minmax' or 'uniform', got {scale!r}")
    if image_size is not None:
        maps = upsample(maps, image_size)
    return normalize_maps(maps) if scale == "minmax" else maps


def upsample(maps: Tensor, image_size: tuple[int, int] | int) -> Tensor:
    """Maps (B, h, w) → (B, H, W), bilinear."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def model_geometry(model: nn.Module) -> tuple[tuple[int, int], dict[str, Any]]:
    """The token grid, and the keywords telling :func:`rollout_to_maps` how the model pools."""
    inner = unwrap_model(model)
    grid = getattr(inner, "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(inner).__name__} has no grid_size; pass a VisionTransformer")
    class_token = getattr(inner, "num_prefix_tokens", 1) > 0
    pool = getattr(getattr(inner, "config", None), "pool", None)
    return tuple(grid), {"class_token": class_token, "pool": pool}


def last_or_none(weights: list[Tensor]) -> Tensor | None:
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

    Runs one forward pass without gradients, in eval mode for the duration of the call (a model
    left in train mode would drop patches and tokens, and apply dropout: the maps would not be of
    the model's prediction), and upsamples the maps to ``image_size`` (default: the input's size).
    The rows read follow the model's pooling (see :func:`rollout_to_maps`; sequence pooling folds
    in its weights).
    """
    grid, layout = model_geometry(model)
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), capture_attention(model) as attentions:
            inner(images)
    finally:
        inner.train(was_training)
    joint = attention_rollout(
        attentions, head_fusion, discard_ratio, start_layer, class_token=layout["class_token"]
    )
    size = image_size or (images.shape[-2], images.shape[-1])
    return rollout_to_maps(
        joint, grid, size, pool_weights=last_or_none(attentions.pool_weights), **layout
    )


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
    modules = tokenizer_attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s tokenizer has no spatial attention to show; "
            f"build the model with tokenizer='conv', conv_attention='cbam'"
        )
    if not -len(modules) <= stage < len(modules):
        raise ValueError(f"stage must be in [-{len(modules)}, {len(modules)}), got {stage!r}")
    with torch.no_grad(), capture_tokenizer_attention(model) as maps:
        unwrap_model(model)(images)
    return maps[stage][:, 0]  # (B, 1, h, w) -> (B, h, w)


@dataclass
class Explanation:
    """What :func:`explain` found for a batch of B images, on the token grid (gh, gw); every map
    is relative to a uniform map (:func:`relative_to_uniform`: 1 = every patch equal)."""

    maps: Tensor  # (B, gh, gw): the method's map (rollout, or the class-specific gradient map)
    probs: Tensor  # (B, classes): the softmax of the same forward pass
    layers: Tensor | None  # (B, depth, gh, gw): each block's own head-mean attention (per_layer)
    tokenizer: Tensor | None  # (B, h, w): a CBAM tokenizer's last spatial map, else None

    @property
    def predicted(self) -> Tensor:
        """(B,) the predicted class of each image."""
        return self.probs.argmax(dim=-1)


def explain(
    model: nn.Module,
    images: Tensor,
    *,
    method: Literal["rollout", "gradient"] = "rollout",
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    target: Tensor | int | None = None,
    per_layer: bool = False,
) -> Explanation:
    """The maps a picture shows, for normalised ``images`` (B, 3, H, W): rollout
    (:func:`attention_rollout` with ``head_fusion``, ``discard_ratio``, ``start_layer``) or the
    class-specific ``"gradient"`` map (:func:`gradient_rollout` for ``target``, default: the
    predicted class), the class probabilities, and optionally each block's own attention.

    Runs in eval mode (the model's mode is restored): one forward pass without gradients, plus a
    forward and backward pass for ``method="gradient"``. Everything returned is on the CPU.

    Raises:
        ValueError: an unknown ``method``, or a rollout argument out of range.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inner = unwrap_model(model)
    grid, layout = model_geometry(inner)
    was_training = inner.training
    inner.eval()
    try:
        with (
            torch.no_grad(),
            capture_attention(inner) as attentions,
            capture_tokenizer_attention(inner) as tokenizer_maps,
        ):
            probs = inner(images).float().softmax(dim=-1).cpu()
    finally:
        inner.train(was_training)
    pool_weights = last_or_none([w.float().cpu() for w in attentions.pool_weights])
    weights = [a.float().cpu() for a in attentions]
    if method == "rollout":
        joint = attention_rollout(
            weights, head_fusion, discard_ratio, start_layer, class_token=layout["class_token"]
        )
    else:
        if target is None:
            target = probs.argmax(dim=-1).to(images.device)
        joint = gradient_rollout(inner, images, target, start_layer=start_layer).float().cpu()
    kw = {"pool_weights": pool_weights, "scale": "uniform", **layout}
    maps = rollout_to_maps(joint, grid, **kw)
    layers = None
    if per_layer:
        # A block's own head-mean weights as the "joint" (no rollout), read as the rollout is.
        layers = torch.stack([rollout_to_maps(a.mean(dim=1), grid, **kw) for a in weights], 1)
    gated = None
    if tokenizer_maps:
        gated = relative_to_uniform(tokenizer_maps[-1].float().cpu()[:, 0])
    return Explanation(maps=maps, probs=probs, layers=layers, tokenizer=gated)
