"""timm interop: our variants in timm's registry, for users who work through timm.

``import vit.timm_interop`` registers every ``vit_*`` variant in timm as ``vitpkg_<name>``, so
``timm.create_model("vitpkg_vit_tiny_patch4_32", num_classes=10)`` works; ``import vit.models``
does not import timm and registers nothing. The conversions live with the models and are
re-exported here: :func:`from_timm` (a timm ViT as ours, same weights) and
:func:`load_pretrained` (timm's or our weights into our model, adapted at the boundary).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import timm
from torch import nn

from vit.models import VARIANTS, VisionTransformer, create_model
from vit.models._builder import LoadReport, convert_timm_state_dict, load_pretrained
from vit.models._from_timm import config_from_timm, from_timm

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "TIMM_PREFIX",
    "LoadReport",
    "config_from_timm",
    "convert_timm_state_dict",
    "from_timm",
    "load_pretrained",
    "pretrained_state_dict",
    "register_timm_variants",
]

TIMM_PREFIX = "vitpkg_"  # timm already owns vit_tiny_patch16_224 and friends


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
                f"vit.models.load_pretrained(model, state_dict_or_path)"
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
        model = cast(VisionTransformer, create_model(name, **overrides))  # a vit_* variant
        config = model.config
        # Read by timm.data.resolve_data_config (timm's transforms), which falls back to ImageNet's
        # statistics without mean/std: the 32-pixel variants are CIFAR-sized, so CIFAR-10's.
        imagenet = (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name.endswith("_32") else imagenet
        # torch types Module.__setattr__ values as Tensor | Module; any attribute can be set.
        model.pretrained_cfg = {  # type: ignore[assignment]
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
