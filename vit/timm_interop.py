"""timm interop: our classifiers as first-class timm models, for users who work through timm.

``import vit.timm_interop`` (the one line a timm-only process needs) registers every ``vit_*`` and
``cct_*`` variant in timm as ``vitpkg_<name>``, with a registered ``default_cfgs`` entry and an
entrypoint through timm's ``build_model_with_cfg``: ``timm.create_model("vitpkg_vit_tiny_patch4_32",
num_classes=10)``, ``features_only=True`` (timm's ``FeatureGetterNet`` over
``forward_intermediates``), ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``, and
``timm.create_model("local-dir:EXPORT", pretrained=True)`` on a ``python -m vit.export`` folder.
timm's own ``tests/test_models.py`` runs on every registered name (``.ci/timm_models.sh``).

The captioners (``caption_*``) are not registered: timm's factory, data config and tests are for
image classifiers and backbones (``forward(images) -> logits``, ``reset_classifier``,
``forward_head``), while a captioner maps images *and tokens* to next-token logits and generates
text; its image encoder is one of the classifiers registered here.

``import vit.models`` does not import timm and registers nothing. The conversions live with the
models and are re-exported here: :func:`from_timm` (a timm ViT as ours, same weights) and
:func:`load_pretrained` (timm's or our weights into our model, adapted at the boundary).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from vit.models import VARIANTS, VisionTransformer, ViTConfig, create_model
from vit.models._builder import (
    LoadReport,
    adapt_state_dict,
    convert_timm_state_dict,
    load_pretrained,
)
from vit.models._from_timm import config_from_timm, from_timm
from vit.models._registry import TIMM_PREFIX
from vit.models.vision_transformer import GLOBAL_POOL

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "TIMM_PREFIX",
    "LoadReport",
    "config_from_timm",
    "convert_timm_state_dict",
    "default_cfgs",
    "from_timm",
    "load_pretrained",
    "pretrained_cfg",
    "pretrained_state_dict",
    "register_timm_variants",
]

logger = logging.getLogger(__name__)

# The per-channel mean and standard deviation of CIFAR-10's 50,000 training images, over all their
# pixels on [0, 1]: (0.49140, 0.48216, 0.44653) and (0.24703, 0.24349, 0.26159), e.g. computed in
# kuangliu/pytorch-cifar#19 and MadryLab/robustness#70 from torchvision's CIFAR10 arrays. The
# often-copied std (0.2023, 0.1994, 0.2010) averages per-image stds and is not the dataset's.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# timm-style keyword → ours; values pass through unless translated below.
_TIMM_KWARGS = {"init_values": "layer_scale_init"}
_POOL = {timm_name: ours for ours, timm_name in GLOBAL_POOL.items()}  # 'token' → 'cls', ...
# The families registered in timm: the image classifiers (captioners are not; see above).
_FAMILIES = ("vit_", "cct_")


def pretrained_cfg(config: ViTConfig, **extra: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a model of ``config``: the input timm's transforms build
    (``timm.data.resolve_data_config``), the first convolution and the classifier's names.

    The 32-pixel variants are CIFAR-sized and normalise with CIFAR-10's statistics, the others
    with ImageNet's; both take the whole image (``crop_pct`` 1.0, as ``vit.preprocess``). The input
    size is fixed: the position embedding has one slot per token of ``img_size``.
    """
    cifar = config.img_size == 32
    conv = config.tokenizer == "conv"
    first_conv = "patch_embed.conv_layers.0.0" if conv else "patch_embed.proj"
    return {
        "num_classes": config.num_classes,
        "input_size": (config.in_chans, config.img_size, config.img_size),
        "fixed_input_size": True,
        "pool_size": None,  # NLC output: no spatial pool size (as timm's ViTs)
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": CIFAR10_MEAN if cifar else IMAGENET_DEFAULT_MEAN,
        "std": CIFAR10_STD if cifar else IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "mit",
        **extra,
    }


def _variant_config(name: str) -> ViTConfig:
    return ViTConfig(**VARIANTS[name].defaults)  # type: ignore[attr-defined]  # see _registry


def _timm_names() -> list[str]:
    ours = (n for n in VARIANTS if n.startswith(_FAMILIES))
    return sorted(n for n in ours if hasattr(VARIANTS[n], "defaults"))


# Read by timm's register_model: one untagged config (no weights) per registered name.
default_cfgs = generate_default_cfgs(
    {f"{TIMM_PREFIX}{n}": pretrained_cfg(_variant_config(n)) for n in _timm_names()}
)


def _build(
    variant: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """The ``model_cls`` handed to ``build_model_with_cfg``: timm's keywords → our variant's.

    ``global_pool`` ('token' | 'avg' | 'seq' | '') sets the pooling and, as in timm, keeps the
    variant's class token (so its weights still load); ``init_values`` is ``layer_scale_init``;
    ``img_size`` may be timm's (H, W) (square only); ``device``/``dtype`` place the parameters.
    """
    overrides = {_TIMM_KWARGS.get(k, k): v for k, v in kwargs.items()}
    size = overrides.get("img_size")
    if isinstance(size, tuple | list):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"img_size={tuple(size)}: vit models take square images, (S, S)")
        overrides["img_size"] = int(size[0])
    if "global_pool" in overrides:
        pool = overrides.pop("global_pool")
        if pool not in _POOL:
            raise ValueError(
                f"global_pool={pool!r} is not supported; use one of "
                f"{', '.join(map(repr, _POOL))} ('token': class token, '': no pooling)"
            )
        overrides["pool"] = _POOL[pool]
        overrides.setdefault("class_token", _variant_config(variant).class_token)
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    with place:
        model = cast(VisionTransformer, create_model(variant, **overrides))  # a vit_/cct_ variant
    return model.to(dtype=dtype) if dtype is not None else model


def _filter(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: timm ViT weights (or ours) adapted to ``model`` by
    :func:`vit.models._builder.adapt_state_dict`; timm then adapts the input channels, drops a head
    of another class count and loads strictly."""
    state, notes = adapt_state_dict(model, state_dict)
    for note in notes:
        logger.warning("pretrained weights: %s", note)
    return state


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    # features_only: the last 3 blocks, as timm's ViT (all of them for CCT-2's two).
    depth = kwargs.get("depth", _variant_config(variant).depth)
    out_indices = kwargs.pop("out_indices", min(3, depth))
    return build_model_with_cfg(
        partial(_build, variant),
        f"{TIMM_PREFIX}{variant}",
        pretrained,
        pretrained_filter_fn=_filter,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{TIMM_PREFIX}{name}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entrypoint for vit's {name} (see vit.models.create_model)."
    return entrypoint


def register_timm_variants() -> list[str]:
    """Register each ``vit_*``/``cct_*`` variant of :data:`vit.models.VARIANTS` not yet known to
    timm as ``vitpkg_<name>``; returns the names registered now. Runs when this module is
    imported."""
    import timm

    registered = []
    for name in _timm_names():
        timm_name = f"{TIMM_PREFIX}{name}"
        if timm.is_model(timm_name):
            continue
        fn = _timm_entrypoint(name)
        globals()[timm_name] = fn  # timm lists the entrypoint in this module's __all__
        register_model(fn)
        registered.append(timm_name)
    return registered


register_timm_variants()


def pretrained_state_dict(name: str) -> dict[str, Any]:
    """timm's pretrained weights of model ``name`` (``timm.create_model(name, pretrained=True)``,
    from the Hugging Face cache or downloaded into it), as a state dict on the CPU.

    Raises:
        ConfigError: timm has no such model, or no pretrained weights for it, or they are neither
            cached nor downloadable (offline): the message says how to pass a file instead.
    """
    import timm

    from vit.errors import ConfigError, did_you_mean

    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models(), n=1)
        raise ConfigError(f"--init-from timm:{name}: timm has no model {name!r}{hint}")
    if not (timm.list_pretrained(name) or timm.list_pretrained(f"{name}.*")):
        raise ConfigError(
            f"--init-from timm:{name}: timm has no pretrained weights for {name!r} "
            f"(see timm.list_pretrained())"
        )
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # huggingface_hub's and requests' errors have no common base
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"--init-from timm:{name}: timm's pretrained weights are not cached here and could "
            f"not be downloaded ({reason[:120]}); on a machine with network run python -c "
            f"\"import timm, safetensors.torch as s; s.save_file(timm.create_model('{name}', "
            f"pretrained=True).state_dict(), '{name}.safetensors')\" and pass --init-from "
            f"{name}.safetensors"
        ) from None
    return model.state_dict()
