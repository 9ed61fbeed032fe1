"""What a run writes to TensorBoard besides the task's pictures: the HParams row a person compares
runs by, the config as text, and scalar tags grouped so per-class curves do not bury the
overall ones."""

from __future__ import annotations

import dataclasses
from typing import Any

from vit.engine.config import RunConfig

__all__ = ["augmentation", "config_text", "hparam_metrics", "hparams", "scalar_tag"]


def scalar_tag(kind: str, key: str) -> str:
    """The TensorBoard tag of metric ``key`` of ``kind`` (train|val): ``val/top1``, but a
    per-class metric (``top1/cat``) goes to its own group, ``val_per_class/top1/cat``, so a
    100-class run does not bury ``val/loss`` among its classes."""
    return f"{kind}_per_class/{key}" if "/" in key else f"{kind}/{key}"


def augmentation(cfg: RunConfig) -> str:
    """The training augmentation in one short string, e.g. ``crop4+flip+randaug2x9+mixup0.8``
    (``none`` when off)."""
    parts = []
    if cfg.crop_padding:
        parts.append(f"crop{cfg.crop_padding}")
    if cfg.hflip:
        parts.append("flip")
    if cfg.randaugment_ops:
        parts.append(f"randaug{cfg.randaugment_ops}x{cfg.randaugment_magnitude:g}")
    if cfg.cutout:
        parts.append(f"cutout{cfg.cutout}")
    if cfg.mixup:
        parts.append(f"mixup{cfg.mixup:g}")
    if cfg.cutmix:
        parts.append(f"cutmix{cfg.cutmix:g}")
    return "+".join(parts) or "none"


def hparams(cfg: RunConfig) -> dict[str, Any]:
    """The keys a person compares runs by, in the order the HParams table shows them (the whole
    config is in the run's ``config.yaml`` and the ``run/config`` text entry)."""
    return {
        "model": cfg.model,
        "data": cfg.data,
        "img_size": cfg.img_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "augmentation": augmentation(cfg),
        "label_smoothing": cfg.label_smoothing,
        "drop_path": cfg.drop_path,
        "seed": cfg.seed,
    }


def hparam_metrics(primary: str, best: float, last: dict[str, Any]) -> dict[str, float]:
    """The HParams table's metric columns: the best primary metric and the final validation's
    numbers (per-class ones left out)."""
    out = {f"hparam/best_{primary}": float(best)}
    for k, v in last.items():
        if k != "n" and "/" not in k and isinstance(v, int | float):
            out[f"hparam/final_{k}"] = float(v)
    return out


def config_text(cfg: RunConfig) -> str:
    """The resolved config as a Markdown code block (TensorBoard's Text tab)."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())
