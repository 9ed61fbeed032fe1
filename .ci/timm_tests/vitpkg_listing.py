"""pytest plugin: timm's own ``tests/test_models.py`` on our models.

timm's model tests are parametrized by ``timm.list_models(...)`` calls with filters written for
timm's own families (``vit_*`` in the non-standard list, ``module='vision_transformer'`` for the
feature tests, exclusions for huge models, ...). This plugin answers each such call with our
registered ``vitpkg_*`` names exactly where timm's answer holds its own ViT, ``CONTROL``
(``vit_tiny_patch16_224``): our models are listed as timm lists its ViTs, so they run every test
timm runs for its ViTs (the exclusion filters and ``pretrained``/``name_matches_cfg`` still
apply to our names). Tests of other models are deselected. ``VIT_TIMM_CONTROL=1`` keeps the
control itself in the lists, to check the harness against timm's own model.

Loaded with ``-p vitpkg_listing`` before timm's test module is imported (it binds
``list_models`` at import), from ``.ci/timm_tests/run.sh``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import timm
import timm.models
import timm.models._registry as registry

import vit.timm_interop  # registers the vitpkg_* names
from vit.models import VARIANTS, ViTConfig

CONTROL = "vit_tiny_patch16_224"
WITH_CONTROL = os.environ.get("VIT_TIMM_CONTROL") == "1"
_list_models = registry.list_models
_selected: set[str] = set()


def list_models(
    filter: str | list[str] = "",  # timm's argument names
    module: str | list[str] = "",
    pretrained: bool = False,
    exclude_filters: str | list[str] = "",
    name_matches_cfg: bool = False,
    include_tags: bool | None = None,
) -> list[str]:
    """timm's ``list_models``, answered with our names where timm's answer holds ``CONTROL``."""
    args = (pretrained, exclude_filters, name_matches_cfg, include_tags)
    theirs = _list_models(filter, module, *args)
    control = [n for n in theirs if registry.get_arch_name(n) == CONTROL]
    if not control:
        return []
    ours = _list_models(f"{vit.timm_interop.TIMM_PREFIX}*", "", *args)
    listed = ours + (control if WITH_CONTROL else [])
    _selected.update(listed)
    return listed


# Before timm's test module runs `from timm import list_models, list_pretrained`; list_pretrained
# calls the registry module's global, patched here too.
timm.list_models = timm.models.list_models = registry.list_models = list_models


# timm's test_model_forward_intermediates asserts "all models here should have at least 3 feature
# levels", a property of timm's zoo: our feature levels are the blocks (as timm's ViTs'), and
# CCT-2 has two (Hassani et al. 2021, Tab. 1). The rest of that test's checks run for these
# models in tests/test_timm_interop.py (intermediates equal the blocks' outputs, their shapes
# match feature_info) and in timm's test_model_forward_intermediates_features.
MIN_LEVELS = {"test_model_forward_intermediates": 3}


def _depth(name: str) -> int:
    if not name.startswith(vit.timm_interop.TIMM_PREFIX):
        return 12  # the control
    variant = name.removeprefix(vit.timm_interop.TIMM_PREFIX)
    return ViTConfig(**VARIANTS[variant].defaults).depth


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the tests parametrized by a listed model; deselect the rest (other models' tests)."""
    keep, drop = [], []
    for item in items:
        callspec: Any = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        (keep if name in _selected else drop).append(item)
        levels = MIN_LEVELS.get(getattr(item, "originalname", ""), 0)
        if name in _selected and _depth(name) < levels:
            reason = f"{name} has {_depth(name)} blocks; timm's test asserts >= {levels} levels"
            item.add_marker(pytest.mark.skip(reason=reason))
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"vitpkg_listing: timm {timm.__version__}, our models listed where timm lists {CONTROL}"
        f"{' (control kept)' if WITH_CONTROL else ''}"
    )
