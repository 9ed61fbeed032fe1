"""The model table behind :func:`create_model`: named variants as tiny constructor functions."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from vit.errors import did_you_mean

__all__ = [
    "TIMM_PREFIX",
    "VARIANTS",
    "check_options",
    "create_model",
    "list_models",
    "num_params",
    "register_config_variant",
    "register_variant",
]

VARIANTS: dict[str, Callable[..., nn.Module]] = {}
# Our names in timm's registry (vit.timm_interop): timm already owns vit_tiny_patch16_224 and
# friends. Export folders name their architecture this way, so timm loads them.
TIMM_PREFIX = "vitpkg_"


def register_variant(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model constructor ``fn(**overrides) -> nn.Module`` to :func:`create_model`'s table.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in VARIANTS:
            raise ValueError(f"model variant {name!r} is already registered")
        VARIANTS[name] = fn
        return fn

    return deco


def register_config_variant(
    name: str,
    build: Callable[[dict[str, Any], dict[str, Any]], nn.Module],
    defaults: dict[str, Any],
) -> None:
    """Register ``name`` as ``build(defaults, overrides)``: the model family's own rule for
    putting keyword overrides on top of the variant's config defaults (documented by them)."""

    def variant(**overrides: Any) -> nn.Module:
        return build(defaults, overrides)

    variant.__doc__ = f"{name}: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}"
    variant.defaults = dict(defaults)  # type: ignore[attr-defined]  # read by vit.timm_interop
    register_variant(name)(variant)


def check_options(overrides: Iterable[str], *configs: type, what: str = "model") -> None:
    """Refuse keywords that are fields of none of the dataclasses ``configs``, suggesting the
    closest names.

    Raises:
        TypeError: naming each unknown keyword and the valid ones.
    """
    fields = [f.name for cfg in configs for f in dataclasses.fields(cfg)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        hints = ", ".join(f"{k!r}{did_you_mean(k, fields)}" for k in unknown)
        raise TypeError(f"unknown {what} option(s): {hints}. Valid options: {', '.join(fields)}")


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_model`, sorted; ``pattern`` is a shell-style wildcard."""
    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the named variant; keyword overrides (``num_classes=10``, ``drop_path_rate=0.1``, ...)
    win over the variant's defaults.

    >>> create_model("vit_tiny_patch4_32", num_classes=10)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])

    Raises:
        ValueError: an unknown name (with the closest names and the available ones).
        TypeError: an unknown keyword.
    """
    if name not in VARIANTS:
        raise ValueError(
            f"unknown model {name!r}{did_you_mean(name, VARIANTS, cutoff=0.5)} Available: "
            f"{', '.join(list_models())} (see vit.models.list_models())"
        )
    return VARIANTS[name](**overrides)


def num_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
