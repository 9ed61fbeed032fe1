"""timm interop, kept out of the architecture file: conversion from timm's ``VisionTransformer``,
the loading boundary for foreign checkpoints, and registration of our variants in timm's registry.

- :func:`from_timm` maps a timm ViT to our :class:`~vit.models.VisionTransformer` with the same
  weights (same logits in eval mode); configurations we cannot express are refused by name.
- :func:`load_pretrained` loads a timm or ``vit`` state dict (or a file holding one) into our
  model, resampling the position embedding and the patch kernel to the model's grid (224 → 32 px
  fine-tuning) and dropping a classifier head of the wrong shape.
- Importing this module (``vit.models`` does) registers every ``vit_*`` variant in timm as
  ``vitpkg_<name>``, so ``timm.create_model("vitpkg_vit_tiny_patch4_32", num_classes=10)`` works.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.layers import DropPath as TimmDropPath
from timm.layers import LayerScale as TimmLayerScale
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import vision_transformer as timm_vit
from torch import Tensor, nn

from vit.checkpoint import read_state_dict, strip_wrapper_prefixes
from vit.models import VARIANTS, VisionTransformer, ViTConfig, create_model

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "TIMM_PREFIX",
    "LoadReport",
    "config_from_timm",
    "convert_timm_state_dict",
    "from_timm",
    "load_pretrained",
    "register_timm_variants",
]

logger = logging.getLogger(__name__)

TIMM_PREFIX = "vitpkg_"  # timm already owns vit_tiny_patch16_224 and friends

# timm module names → ours; everything else in a ViT state dict is named alike.
_TIMM_TO_OURS = ((".attn.qkv.", ".attn.to_qkv."), (".attn.proj.", ".attn.to_out."))


# ----------------------------------------------------------------------------------------------
# timm model → ours
# ----------------------------------------------------------------------------------------------
def config_from_timm(model: nn.Module) -> ViTConfig:
    """Read the :class:`ViTConfig` of a timm ``VisionTransformer`` from its modules.

    Raises ``TypeError`` for anything but a timm ``VisionTransformer`` and ``ValueError`` naming
    every option we do not implement (register tokens, ``no_embed_class``, ``pre_norm``,
    ``qk_norm``, attention pooling, ``dynamic_img_size``, non-GELU activations, ...).
    """
    if not isinstance(model, timm_vit.VisionTransformer):
        raise TypeError(
            f"from_timm expects a timm.models.vision_transformer.VisionTransformer, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    problems: list[str] = []

    def refuse(condition: bool, option: str) -> None:
        if condition:
            problems.append(option)

    pe = model.patch_embed
    refuse(type(pe) is not TimmPatchEmbed, f"embed_layer={type(pe).__name__}")
    refuse(model.num_reg_tokens > 0, f"register tokens (reg_tokens={model.num_reg_tokens})")
    refuse(model.no_embed_class, "no_embed_class=True")
    refuse(model.pos_embed is None, "pos_embed='none'")
    refuse(not isinstance(model.norm_pre, nn.Identity), "pre_norm=True")
    refuse(model.dynamic_img_size, "dynamic_img_size=True")
    refuse(getattr(pe, "dynamic_img_pad", False), "dynamic_img_pad=True")
    refuse(not getattr(pe, "strict_img_size", True), "strict_img_size=False")
    refuse(not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity), "embed_norm_layer")
    refuse(pe.proj.bias is None, "a patch embedding without bias")
    refuse(model.attn_pool is not None, f"attention pooling (global_pool={model.global_pool!r})")
    refuse(
        model.attn_pool is None and model.global_pool not in ("token", "avg"),
        f"global_pool={model.global_pool!r} (only 'token' and 'avg')",
    )
    refuse(
        model.global_pool == "avg" and model.pool_include_prefix and model.cls_token is not None,
        "pool_include_prefix=True",
    )
    refuse(pe.img_size is None or pe.img_size[0] != pe.img_size[1], f"img_size={pe.img_size}")
    refuse(pe.patch_size[0] != pe.patch_size[1], f"patch_size={pe.patch_size}")
    has_norm = not isinstance(model.norm, nn.Identity)
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    refuse(not has_norm and not has_fc_norm, "final_norm=False")
    refuse(
        model.pos_drop.p != model.head_drop.p,
        f"pos_drop_rate={model.pos_drop.p} != drop_rate={model.head_drop.p} (one drop_rate "
        f"serves both here)",
    )

    norms = [
        m
        for name, m in model.named_modules()
        if "norm" in name.rsplit(".", 1)[-1] and not isinstance(m, nn.Identity)
    ]
    eps = {m.eps for m in norms if isinstance(m, nn.LayerNorm)}
    refuse(
        any(not isinstance(m, nn.LayerNorm) or not m.elementwise_affine for m in norms),
        "a norm_layer other than LayerNorm",
    )
    refuse(len(eps) > 1, f"LayerNorms with different eps {sorted(eps)}")

    dim = model.embed_dim
    block_problems: set[str] = set()
    for blk in model.blocks:
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(blk) is not timm_vit.Block or type(attn) is not timm_vit.Attention:
            block_problems.add(f"block_fn={type(blk).__name__} / attn_layer={type(attn).__name__}")
            continue
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            block_problems.add("qk_norm=True")
        if not isinstance(attn.norm, nn.Identity):
            block_problems.add("scale_attn_norm=True")
        if getattr(attn, "gate", None) is not None:
            block_problems.add("gated attention")
        if attn.attn_dim != dim:
            block_problems.add(f"attn_head_dim giving width {attn.attn_dim} != embed_dim {dim}")
        if attn.proj.bias is None:
            block_problems.add("proj_bias=False")
        if type(mlp) is not TimmMlp:
            block_problems.add(f"mlp_layer={type(mlp).__name__}")
            continue
        if not isinstance(mlp.norm, nn.Identity):
            block_problems.add("scale_mlp_norm=True")
        if mlp.fc1.bias is None or mlp.fc2.bias is None:
            block_problems.add("an MLP without bias")
        if type(mlp.act) is not nn.GELU or mlp.act.approximate != "none":
            block_problems.add(f"act_layer={mlp.act!r} (only exact nn.GELU)")
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, nn.Identity | TimmLayerScale):
                block_problems.add(f"layer scale {type(ls).__name__}")
    problems.extend(sorted(block_problems))
    if problems:
        raise ValueError(
            "this timm VisionTransformer uses option(s) vit.VisionTransformer does not implement: "
            + "; ".join(problems)
            + ". Build the timm model without them, or keep using timm for it."
        )

    first = model.blocks[0]
    hidden = first.mlp.fc1.out_features
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # int() truncation in the block must give back `hidden`
        raise ValueError(f"cannot express an MLP width of {hidden} for width {dim} as mlp_ratio")
    last = model.blocks[-1]
    return ViTConfig(
        img_size=int(pe.img_size[0]),
        patch_size=int(pe.patch_size[0]),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=first.attn.qkv.bias is not None,
        pool="cls" if model.global_pool == "token" else "mean",
        pos_embed="learned",
        class_token=model.cls_token is not None,
        fc_norm=has_fc_norm,
        drop_rate=model.head_drop.p,
        proj_drop_rate=first.attn.proj_drop.p,
        attn_drop_rate=first.attn.attn_drop.p,
        drop_path_rate=(
            last.drop_path1.drop_prob if isinstance(last.drop_path1, TimmDropPath) else 0.0
        ),
        patch_drop_rate=getattr(model.patch_drop, "prob", 0.0),
        layer_scale_init=(
            float(first.ls1.init_values) if isinstance(first.ls1, TimmLayerScale) else None
        ),
        norm_eps=eps.pop() if eps else 1e-6,
    )


def convert_timm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm ViT keys to ours (``attn.qkv`` → ``attn.to_qkv``, ``attn.proj`` →
    ``attn.to_out``) and strip DDP / ``torch.compile`` prefixes. Our own keys pass unchanged."""
    out = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        for theirs, ours in _TIMM_TO_OURS:
            key = key.replace(theirs, ours)
        out[key] = value
    return out


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """Build our :class:`VisionTransformer` from a timm ``VisionTransformer``: same configuration,
    same weights, same device, dtype and train/eval mode (hence, in eval mode, the same logits)."""
    config = config_from_timm(timm_model)
    model = VisionTransformer(config)
    model.load_state_dict(convert_timm_state_dict(timm_model.state_dict()), strict=True)
    reference = next(timm_model.parameters())
    return model.to(device=reference.device, dtype=reference.dtype).train(timm_model.training)


# ----------------------------------------------------------------------------------------------
# Loading boundary
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys left at their initial value, keys ignored, and notes
    on every adaptation (resampling, a dropped head)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_pretrained(
    model: VisionTransformer,
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    strict: bool = True,
) -> LoadReport:
    """Load a timm or ``vit`` ViT state dict (or a ``.pt``/``.pth``/``.safetensors`` file) into
    ``model``, adapting it at the boundary:

    - timm key names are renamed (:func:`convert_timm_state_dict`);
    - the learned position embedding is resampled (bicubic, as timm does) to the model's patch
      grid, e.g. 14x14 (224 px / 16) → 8x8 (32 px / 4), and a class-token slot is dropped for
      models without a class token;
    - a patch kernel of another size is resampled (FlexiViT, Beyer et al. 2023);
    - a classifier head of another shape (or for a model without a head) is dropped, with a
      note: the model keeps its freshly initialised head.

    Anything else that does not fit raises ``ValueError`` naming the keys when ``strict``; with
    ``strict=False`` it is skipped and listed in the returned :class:`LoadReport`.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"load_pretrained expects a vit VisionTransformer, got {type(model)}")
    state = convert_timm_state_dict(_read_state_dict(state_dict_or_path))
    report = LoadReport()
    target = model.state_dict()

    if "reg_token" in state:
        raise ValueError("the checkpoint has register tokens (reg_token), which vit does not use")
    _adapt_position_embedding(model, state, report)
    _adapt_patch_kernel(target, state, report)
    _adapt_head(target, state, report)

    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    report.unexpected_keys = sorted(k for k in state if k not in target)
    report.missing_keys = sorted(k for k in target if k not in state and not k.startswith("head."))
    if strict and (mismatched or report.unexpected_keys or report.missing_keys):
        raise ValueError(_mismatch_message(model, report, mismatched))
    for item in mismatched:
        report.notes.append(f"skipped {item}")
        del state[item.split(":")[0]]
    for key in report.unexpected_keys:
        del state[key]
    model.load_state_dict(state, strict=False)
    for note in report.notes:
        logger.warning("load_pretrained: %s", note)
    return report


def _read_state_dict(source: Mapping[str, Tensor] | str | os.PathLike[str]) -> dict[str, Tensor]:
    if isinstance(source, str | os.PathLike):
        # The one reader of weight files: safetensors, vit checkpoints and exports, torch.save-d
        # state dicts; a bad file is a CheckpointError (a ValueError) in one line.
        return read_state_dict(source)
    if not isinstance(source, Mapping):
        raise TypeError(
            f"expected a state dict (a mapping of names to tensors) or a path to one, got "
            f"{type(source).__name__}"
        )
    # Training checkpoints wrap the weights: {"model": state_dict, "optimizer": ..., ...}.
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
            break
    bad = [k for k, v in source.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"expected tensors in the state dict, but {bad[:5]} are not tensors")
    return dict(source)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _adapt_position_embedding(
    model: VisionTransformer, state: dict[str, Tensor], report: LoadReport
) -> None:
    if "pos_embed" not in state:
        return
    if not isinstance(model.pos_embed, nn.Parameter):
        del state["pos_embed"]
        report.notes.append(
            f"dropped the checkpoint's learned pos_embed: the model uses the fixed "
            f"{model.config.pos_embed!r} encoding"
        )
        return
    pos = state["pos_embed"]  # (1, prefix + gh·gw, D)
    src_prefix = 1 if "cls_token" in state else 0
    dst_prefix = model.num_prefix_tokens
    side = _square_side(pos.shape[1] - src_prefix) if pos.ndim == 3 else None
    if not side:  # not (1, L, D), or no patch slots at all (only the class token's)
        raise ValueError(
            f"cannot read a square patch grid from the checkpoint's pos_embed of shape "
            f"{tuple(pos.shape)} with {src_prefix} class token(s) (no_embed_class checkpoints "
            f"are not supported)"
        )
    if pos.shape[-1] != model.config.embed_dim:
        return  # a width mismatch is reported with the other shape mismatches
    if src_prefix == 1 and dst_prefix == 0:
        pos = pos[:, 1:]
        del state["cls_token"]
        report.notes.append("dropped the checkpoint's class token: the model has none")
    elif src_prefix == 0 and dst_prefix == 1:
        raise ValueError(
            "the checkpoint has no class token but the model needs one; create the model with "
            "pool='mean' (and class_token=False) to load it"
        )
    grid = list(model.grid_size)
    if grid != [side, side]:
        pos = resample_abs_pos_embed(
            pos, new_size=grid, old_size=[side, side], num_prefix_tokens=dst_prefix
        )
        report.notes.append(
            f"resampled pos_embed from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid"
        )
    state["pos_embed"] = pos


def _adapt_patch_kernel(
    target: dict[str, Tensor], state: dict[str, Tensor], report: LoadReport
) -> None:
    key = "patch_embed.proj.weight"
    if key not in state or key not in target:
        return
    src, dst = state[key], target[key]  # (D, C, p, p)
    if src.shape[:2] == dst.shape[:2] and src.shape[2:] != dst.shape[2:]:
        state[key] = resample_patch_embed(src, new_size=list(dst.shape[2:]))
        report.notes.append(
            f"resampled the patch kernel from {tuple(src.shape[2:])} to {tuple(dst.shape[2:])}"
        )


def _adapt_head(target: dict[str, Tensor], state: dict[str, Tensor], report: LoadReport) -> None:
    head_keys = [k for k in state if k.startswith("head.")]
    if not head_keys:
        if "head.weight" in target:
            report.notes.append("the checkpoint has no head: the model's head stays initialised")
        return
    if all(k in target and target[k].shape == state[k].shape for k in head_keys):
        return
    shape = tuple(state["head.weight"].shape) if "head.weight" in state else None
    for k in head_keys:
        del state[k]
    wanted = tuple(target["head.weight"].shape) if "head.weight" in target else "no head"
    report.notes.append(
        f"dropped the checkpoint's head {shape} (model: {wanted}); the model's head stays "
        f"initialised, to be fine-tuned"
    )


def _mismatch_message(model: VisionTransformer, report: LoadReport, mismatched: list[str]) -> str:
    parts = []
    if mismatched:
        parts.append("shape mismatches: " + "; ".join(mismatched[:8]))
    if report.missing_keys:
        parts.append(f"missing from the checkpoint: {_clip(report.missing_keys)}")
    if report.unexpected_keys:
        parts.append(f"not in the model: {_clip(report.unexpected_keys)}")
    hints = []
    keys = set(report.missing_keys) | set(report.unexpected_keys)
    if any(k.startswith("fc_norm.") for k in keys):
        hints.append(f"fc_norm={not model.config.fc_norm}")
    if any(".ls1." in k or ".ls2." in k for k in keys):
        hints.append("layer_scale_init (on/off)")
    if any(k.startswith("blocks.") and k.endswith("norm1.weight") for k in keys):
        hints.append("depth")
    if any(k == "cls_token" for k in keys):
        hints.append("pool / class_token")
    hint = f" Check the model's {', '.join(hints)}." if hints else ""
    return (
        "checkpoint does not fit the model: "
        + "; ".join(parts)
        + f".{hint} Pass strict=False to load the matching part only."
    )


def _clip(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------
# timm registry
# ----------------------------------------------------------------------------------------------
# The per-channel mean and standard deviation of CIFAR-10's 50,000 training images, over all their
# pixels on [0, 1]: (0.49140, 0.48216, 0.44653) and (0.24703, 0.24349, 0.26159), e.g. computed in
# kuangliu/pytorch-cifar#19 and MadryLab/robustness#70 from torchvision's CIFAR10 arrays. The
# often-copied std (0.2023, 0.1994, 0.2010) averages per-image stds and is not the dataset's.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# timm-style keyword → ours; values pass through unless translated below.
_TIMM_KWARGS = {"init_values": "layer_scale_init"}
_GLOBAL_POOL = {"token": "cls", "avg": "mean"}


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"no pretrained weights ship with {TIMM_PREFIX}{name}: create it with "
                f"pretrained=False, then load a checkpoint with "
                f"vit.timm_interop.load_pretrained(model, state_dict_or_path)"
            )
        # timm's factory always passes these; we have no pretrained configs.
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        overrides = {_TIMM_KWARGS.get(k, k): v for k, v in kwargs.items()}
        if "global_pool" in overrides:
            pool = overrides.pop("global_pool")
            if pool not in _GLOBAL_POOL:
                raise ValueError(
                    f"global_pool={pool!r} is not supported; use 'token' (class token) or 'avg'"
                )
            overrides["pool"] = _GLOBAL_POOL[pool]
        model = create_model(name, **overrides)
        config = model.config
        # Read by timm.data.resolve_data_config (timm's transforms), which falls back to ImageNet's
        # statistics without mean/std: the 32-pixel variants are CIFAR-sized, so CIFAR-10's.
        imagenet = (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name.endswith("_32") else imagenet
        model.pretrained_cfg = {
            "input_size": (config.in_chans, config.img_size, config.img_size),
            "mean": mean,
            "std": std,
            "num_classes": config.num_classes,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "architecture": f"{TIMM_PREFIX}{name}",
        }
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = f"{TIMM_PREFIX}{name}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entrypoint for vit's {name} (see vit.models.create_model)."
    return entrypoint


def register_timm_variants() -> list[str]:
    """Register each ``vit_*`` variant of :data:`vit.models.VARIANTS` not yet known to timm as
    ``vitpkg_<name>``; returns the names registered now. Runs when this module is imported."""
    registered = []
    for name in sorted(VARIANTS):
        timm_name = f"{TIMM_PREFIX}{name}"
        if not name.startswith("vit_") or timm.is_model(timm_name):
            continue
        fn = _timm_entrypoint(name)
        globals()[timm_name] = fn  # timm lists the entrypoint in this module's __all__
        timm.models.register_model(fn)
        registered.append(timm_name)
    return registered


register_timm_variants()
