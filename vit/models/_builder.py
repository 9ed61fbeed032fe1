"""Building models from stored specs, and the loading boundary for foreign weights.

- :func:`build`: a model from ``{"name": ..., "kwargs": {...}}`` (what checkpoints and exports
  store), laid out on the meta device first so a spec never asks for more parameters than allowed.
- :func:`load_pretrained`: timm's or our ViT weights into a :class:`VisionTransformer`, adapted at
  the boundary (key names, position-embedding and patch-kernel resampling, a head of another shape).

timm is imported only when weights must be resampled (its ``resample_*`` functions) or a
``timm:NAME`` spec is built.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vit.models._helpers import read_class_names, read_state_dict, strip_wrapper_prefixes
from vit.models._registry import create_model
from vit.models.vision_transformer import VisionTransformer
from vit.preprocess import MAX_IMG_SIZE

__all__ = [
    "MAX_PARAMS",
    "LoadReport",
    "adapt_state_dict",
    "build",
    "check_spec_sizes",
    "convert_timm_state_dict",
    "load_pretrained",
    "upgrade_spec",
]

logger = logging.getLogger(__name__)

# The largest model built from a config or a checkpoint (ViT-g has ~1B parameters).
MAX_PARAMS = 2_000_000_000
# Deepest stack of blocks or layers (ViT-g has 48; building even on the meta device costs time).
MAX_DEPTH = 1000
# Longest caption sequence (positions) of a captioner.
MAX_SEQ_LEN = 4096
# Buffer values (fixed encodings) a model may hold beyond its parameter count: 64 MB of float32.
MAX_EXTRA_BUFFER = 2**24
_SIZE_BOUNDS = {"img_size": MAX_IMG_SIZE, "max_len": MAX_SEQ_LEN}

# timm module names → ours; everything else in a ViT state dict is named alike.
_TIMM_TO_OURS = ((".attn.qkv.", ".attn.to_qkv."), (".attn.proj.", ".attn.to_out."))


def _instantiate(spec: dict[str, Any]) -> nn.Module:
    name = spec["name"]
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name.removeprefix("timm:")):
            raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())")
        return timm.create_model(name.removeprefix("timm:"), **spec["kwargs"])
    return create_model(name, **spec["kwargs"])


def build(spec: dict[str, Any], *, max_params: int = MAX_PARAMS) -> nn.Module:
    """The (untrained) model ``{"name": ..., "kwargs": {...}}`` describes: a
    :func:`~vit.models.create_model` variant, or ``timm:NAME`` for any timm model (e.g. the
    reference ViT of benchmarks/time_to_accuracy.py, trained by the same engine).

    The model is first laid out on the meta device (which allocates nothing) to refuse one of more
    than ``max_params`` parameters: a typo in ``model_args`` or a crafted checkpoint never asks for
    absurd memory.

    Raises:
        ValueError: too many parameters, an unknown name; TypeError: an unknown keyword.
    """
    check_spec_sizes(spec)
    with torch.device("meta"):
        model = _instantiate(spec)
        needed = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for b in model.buffers())
    if needed > max_params:
        raise ValueError(
            f"{spec['name']!r} with {spec['kwargs']} has {needed:,} parameters, more than "
            f"{max_params:,}"
        )
    # Fixed encodings are buffers outside the stored weights (sincos2d with a huge img_size
    # asks for gigabytes): a model's buffers may not outgrow its parameters by much.
    if buffers > max(needed, MAX_EXTRA_BUFFER):
        raise ValueError(
            f"{spec['name']!r} with {spec['kwargs']} needs {buffers:,} buffer values for "
            f"{needed:,} parameters (more than {max(needed, MAX_EXTRA_BUFFER):,}); check its "
            f"img_size"
        )
    del model
    return _instantiate(spec)


def check_spec_sizes(spec: dict[str, Any]) -> None:
    """Refuse, before anything is built, sizes that cost time or memory even on the meta device:
    a depth (``depth``, ``decoder_depth``, ``conv_layers``, ...) above :data:`MAX_DEPTH`, an
    ``img_size`` above :data:`~vit.preprocess.MAX_IMG_SIZE`, a ``max_len`` above
    :data:`MAX_SEQ_LEN`, or ``kwargs`` nested deeper than 4 levels.

    Raises:
        ValueError: naming the entry and its bound.
    """
    stack: list[tuple[str, Any, int]] = [("kwargs", spec.get("kwargs"), 0)]
    while stack:
        where, value, level = stack.pop()
        if level > 4:
            raise ValueError(f"{spec.get('name')!r}: model arguments nested too deeply ({where})")
        if isinstance(value, dict):
            stack += [(f"{where}.{k}", v, level + 1) for k, v in value.items()]
            continue
        if isinstance(value, list | tuple):
            stack += [(f"{where}[{i}]", v, level + 1) for i, v in enumerate(value)]
            continue
        key = where.rsplit(".", 1)[-1].split("[")[0]
        bound = _SIZE_BOUNDS.get(key) or (MAX_DEPTH if key.endswith(("depth", "layers")) else 0)
        if bound and isinstance(value, int | float) and value > bound:
            raise ValueError(f"{spec.get('name')!r}: {where} is {value:,}, more than {bound:,}")


def upgrade_spec(spec: dict[str, Any], task: str) -> dict[str, Any]:
    """The current form of a stored spec. Before vit 0.2 a captioner with a default Transformer
    decoder was stored under its encoder's name (``vit_*``); it is ``caption_transformer`` now."""
    if task == "caption" and not spec["name"].startswith(("caption_", "timm:")):
        return {
            "name": "caption_transformer",
            "kwargs": {"encoder": spec["name"], **spec["kwargs"]},
        }
    return spec


def convert_timm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm ViT keys to ours (``attn.qkv`` → ``attn.to_qkv``, ``attn.proj`` →
    ``attn.to_out``) and strip DDP / ``torch.compile`` prefixes. Our own keys pass unchanged."""
    out = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        for theirs, ours in _TIMM_TO_OURS:
            key = key.replace(theirs, ours)
        out[key] = value
    return out


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys left at their initial value, keys ignored, and notes
    on every adaptation (resampling, a dropped head)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Head rows mapped by class name: "kept" (same row), "moved" (another row), "initialised"
    # (classes new to the head), "dropped" (the checkpoint's classes the model lacks).
    head_rows: dict[str, list[str]] = field(default_factory=dict)


def load_pretrained(
    model: VisionTransformer,
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    strict: bool = True,
    class_names: Sequence[str] | None = None,
    source_class_names: Sequence[str] | None = None,
) -> LoadReport:
    """Load a timm or ``vit`` ViT state dict (or a ``.pt``/``.pth``/``.safetensors`` file) into
    ``model``, adapting it at the boundary:

    - timm key names are renamed (:func:`convert_timm_state_dict`);
    - the learned position embedding is resampled (bicubic, as timm does) to the model's patch
      grid, e.g. 14x14 (224 px / 16) → 8x8 (32 px / 4), and a class-token slot is dropped for
      models without a class token;
    - a patch kernel of another size is resampled (FlexiViT, Beyer et al. 2023);
    - with ``class_names`` (the model's head rows) and the checkpoint's class names
      (``source_class_names``, or read from a ``vit`` checkpoint or export folder), the head is
      mapped by name: rows of shared classes are copied to their new rows, new classes keep their
      initialised rows, and :attr:`LoadReport.head_rows` says which rows were kept, moved,
      initialised or dropped (a head of other classes in the same count is never kept by
      position);
    - otherwise (names unknown, e.g. timm's weights) a head of another shape (or for a model
      without a head) is dropped, with a note: the model keeps its freshly initialised head.

    Anything else that does not fit raises ``ValueError`` naming the keys when ``strict``; with
    ``strict=False`` it is skipped and listed in the returned :class:`LoadReport`.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"load_pretrained expects a vit VisionTransformer, got {type(model)}")
    state, notes = adapt_state_dict(model, _read_state_dict(state_dict_or_path))
    if source_class_names is None and isinstance(state_dict_or_path, str | os.PathLike):
        source_class_names = read_class_names(state_dict_or_path)
    report = LoadReport(notes=notes)
    target = model.state_dict()
    if (
        class_names is None
        or source_class_names is None
        or not _map_head_by_name(target, state, report, list(class_names), source_class_names)
    ):
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


def adapt_state_dict(
    model: VisionTransformer, state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """The geometric part of :func:`load_pretrained`, as a state dict for ``model``: timm key
    names renamed, the position embedding resampled to the model's grid (its class-token slot
    dropped for a model without one), a patch kernel of another size resampled. Returns the
    adapted state dict and a note per adaptation; the head, the input channels and any other
    mismatch are left for the caller to check (timm's ``load_pretrained`` adapts the channels and
    drops a head of another class count, ``vit.timm_interop`` passes this as its filter).

    Raises:
        ValueError: register tokens, or a position embedding that is not a square grid.
    """
    state = convert_timm_state_dict(state)
    report = LoadReport()
    if "reg_token" in state:
        raise ValueError("the checkpoint has register tokens (reg_token), which vit does not use")
    _adapt_position_embedding(model, state, report)
    _adapt_patch_kernel(model.state_dict(), state, report)
    return state, report.notes


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
    state: Mapping[str, Any] = source
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"expected tensors in the state dict, but {bad[:5]} are not tensors")
    return dict(state)


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
        from timm.layers import resample_abs_pos_embed

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
        from timm.layers import resample_patch_embed

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


def _map_head_by_name(
    target: dict[str, Tensor],
    state: dict[str, Tensor],
    report: LoadReport,
    names: list[str],
    source_names: Sequence[str],
) -> bool:
    """Build the model's head from the checkpoint's rows by class name (see
    :func:`load_pretrained`); ``False`` when the heads cannot be matched so (no head, a row count
    unlike the names, another width), for :func:`_adapt_head` to decide."""
    if "head.weight" not in state or "head.weight" not in target:
        return False
    w, tw = state["head.weight"], target["head.weight"]  # (classes, D)
    bias, tbias = state.get("head.bias"), target.get("head.bias")
    if w.shape[0] != len(source_names) or tw.shape[0] != len(names) or w.shape[1:] != tw.shape[1:]:
        return False
    if (bias is None) != (tbias is None) or list(source_names) == names:
        return list(source_names) == names  # the same classes in the same order: as it is
    row_of = {n: i for i, n in enumerate(source_names)}
    new_w = tw.detach().clone()
    new_b = tbias.detach().clone() if tbias is not None else None
    rows: dict[str, list[str]] = {"kept": [], "moved": [], "initialised": [], "dropped": []}
    for j, name in enumerate(names):
        i = row_of.get(name)
        if i is None:
            rows["initialised"].append(name)
            continue
        new_w[j] = w[i]
        if new_b is not None and bias is not None:
            new_b[j] = bias[i]
        rows["kept" if i == j else "moved"].append(name if i == j else f"{name} ({i} -> {j})")
    rows["dropped"] = [n for n in source_names if n not in set(names)]
    state["head.weight"] = new_w
    if new_b is not None:
        state["head.bias"] = new_b
    report.head_rows = rows
    said = [f"{k} {_clip(v, 10)}" for k, v in rows.items() if v]
    report.notes.append("head rows mapped by class name: " + "; ".join(said))
    return True


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
