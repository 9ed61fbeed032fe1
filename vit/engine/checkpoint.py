"""Checkpoints: atomic save, safe load, structure validation, rebuilding the model, RNG state.

A training checkpoint (``last.pt``, ``best.pt``) is a ``torch.save`` archive of plain data and
tensors, read with ``torch.load(..., weights_only=True)``: loading one never runs code. It holds
``format``, ``task``, ``task_state`` (class names, preprocessing, vocabulary), ``config`` (the
run's :class:`~vit.engine.config.RunConfig` as a mapping), ``model_spec`` (the model's name and
keyword arguments), ``model`` and optionally ``ema`` (state dicts), plus what resuming needs
(optimizer, scaler, progress, RNG states). Every file from elsewhere is validated before it is
used, and a ``model_spec`` is built only when the weights stored beside it can fill it.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from vit.errors import CheckpointError, OutputError
from vit.fileio import atomic_write
from vit.models._builder import build, upgrade_spec
from vit.models._helpers import (
    CHECKPOINT_FORMAT,
    check_state_dict,
    read_state_dict,
    strip_wrapper_prefixes,
    torch_load,
)
from vit.preprocess import Preprocess

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointSaveError",
    "checkpoint_preprocess",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "read_state_dict",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "strip_wrapper_prefixes",
]

# What a training checkpoint must hold, with the type of each entry.
_REQUIRED = {
    "task": str,
    "task_state": dict,
    "config": dict,
    "model_spec": dict,
    "model": dict,
}


class CheckpointSaveError(OutputError):
    """A checkpoint could not be written (e.g. a full disk); the previous file is intact."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write atomically (:func:`vit.fileio.atomic_write`: a temporary file created exclusively,
    then a rename), so a crash never leaves half a file and a planted link is never followed.

    Raises:
        CheckpointSaveError: the write failed (disk full, no permission); the temporary file is
            removed and any earlier file at ``path`` is left as it was.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch.save reports a failed write as RuntimeError
                raise OSError(errno.ENOSPC if _is_enospc(e) else errno.EIO, str(e)) from None
    except OutputError as e:
        kept = f"; {path} from the previous save is intact" if path.exists() else ""
        raise CheckpointSaveError(f"cannot save {path}: {e.reason}{kept}") from None


def _is_enospc(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a training checkpoint (``weights_only=True``: no code runs).

    Raises:
        CheckpointError: missing, empty, truncated, corrupt, unsafe, not a ``vit`` training
            checkpoint, or missing an entry (or holding one of the wrong type).
    """
    path = Path(path)
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a vit training checkpoint (no format {CHECKPOINT_FORMAT!r}); for timm "
            f"or plain state dicts use --init-from or vit.models.load_pretrained"
        )
    problems = [
        f"{key!r} is missing" if key not in ckpt else f"{key!r} is not a {tp.__name__}"
        for key, tp in _REQUIRED.items()
        if not isinstance(ckpt.get(key), tp)
    ]
    spec = ckpt.get("model_spec")
    if isinstance(spec, dict) and not (
        isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs"), dict)
    ):
        problems.append("'model_spec' needs a name (str) and kwargs (dict)")
    for key in ("model", "ema"):
        state = ckpt.get(key)
        if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
            problems.append(f"{key!r} holds entries that are not tensors")
    if problems:
        no_model = "holds no model, " if not isinstance(ckpt.get("model"), dict) else ""
        raise CheckpointError(
            f"checkpoint {path} {no_model}is malformed: {'; '.join(problems)}; pass a last.pt or "
            f"best.pt written by train.py"
        )
    return ckpt


def _build_bounded(spec: dict[str, Any], task: str, state: dict[str, Tensor], path: Path) -> Any:
    """Build ``spec``'s model, refusing one larger than the weights stored beside it (a crafted
    ``model_spec`` could otherwise ask for any amount of memory; see :func:`vit.models.build`)."""
    stored = sum(v.numel() for v in state.values())
    try:
        return build(upgrade_spec(spec, task), max_params=stored)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is malformed: its model_spec cannot be built with its "
            f"{stored:,} stored weights ({first})"
        ) from None


def load_model(
    path: str | Path, weights: Literal["auto", "ema", "model"] = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, in eval mode on the CPU. Returns ``(model, checkpoint)``;
    :func:`checkpoint_preprocess` gives its input preprocessing, ``checkpoint["task_state"]`` e.g.
    its class names.

    ``weights``: ``auto`` the EMA weights when the run kept them (what training validated), else
    the raw ones; ``ema`` the EMA weights (an error without them); ``model`` the raw weights.

    Raises:
        CheckpointError: as :func:`load_checkpoint`; ``weights="ema"`` without EMA weights; a
            model that does not match its stored weights.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    if weights == "ema" and ckpt.get("ema") is None:
        raise CheckpointError(
            f"{path} has no EMA weights (the run was trained without --ema); use --weights model "
            f"or --weights auto"
        )
    use_ema = weights != "model" and ckpt.get("ema") is not None
    state = ckpt["ema"] if use_ema else ckpt["model"]
    model = _build_bounded(ckpt["model_spec"], ckpt["task"], state, path)
    load_weights(model, state, path, ckpt["model_spec"])
    return model.eval(), ckpt


def load_weights(model: nn.Module, state: dict[str, Tensor], path: Path, spec: Any) -> None:
    """``model.load_state_dict(state)`` (wrapper prefixes stripped), or a one-line error.

    Raises:
        CheckpointError: the weights belong to another architecture.
    """
    state = strip_wrapper_prefixes(state)
    try:
        check_state_dict(model, state, path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (checkpoint model_spec: {spec}; a resumed run needs the same --model and "
            f"model_args)"
        ) from None
    model.load_state_dict(state)


def checkpoint_preprocess(ckpt: dict[str, Any]) -> Preprocess:
    """The :class:`~vit.preprocess.Preprocess` a checkpoint's model was trained with.

    Raises:
        CheckpointError: the checkpoint records none (a task without image preprocessing).
    """
    state = ckpt["task_state"]
    if isinstance(state.get("preprocess"), dict):
        try:
            return Preprocess.from_dict(state["preprocess"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's preprocessing record is malformed: {e}") from e
    # Checkpoints from before the record: classifiers kept their statistics, captioners squashed.
    img_size = ckpt["config"].get("img_size")
    if isinstance(img_size, int) and "mean" in state:
        return Preprocess(img_size, tuple(state["mean"]), tuple(state["std"]))
    if isinstance(img_size, int) and ckpt["task"] == "caption":
        return Preprocess(img_size, resize="squash")
    raise CheckpointError("the checkpoint records no input preprocessing")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch, CUDA, numpy, Python), as checkpoint data."""
    # The legacy tuple: numpy's global RandomState is always MT19937.
    state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    _, keys, pos, has_gauss, gauss = state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def timm_checkpoint_keys(
    model: dict[str, Any], ema: dict[str, Any] | None, scaler: dict[str, Any], epoch: int
) -> dict[str, Any]:
    """The entries of a timm training checkpoint (timm/models/_helpers.py) that alias ours."""
    keys = {"state_dict": model, "state_dict_ema": ema, "epoch": epoch}
    if scaler:  # timm's NativeScaler wraps a torch.amp.GradScaler under this key
        keys["amp_scaler"] = scaler
    return keys
