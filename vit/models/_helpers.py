"""The loading boundary for weight files: every file of weights (a ``vit`` training checkpoint or
export, a ``.safetensors`` file, timm's or anyone's ``torch.save``-d state dict) is read here, with
``torch.load(..., weights_only=True)`` (loading never runs code) and one-line errors for every way
a file can be bad."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vit.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "check_state_dict",
    "read_class_names",
    "read_state_dict",
    "strip_wrapper_prefixes",
    "torch_load",
]

CHECKPOINT_FORMAT = "vit.train/1"  # the "format" entry of a training checkpoint (vit.engine)
# torch.compile wraps a model as `_orig_mod`, DDP as `module`, in either order and nesting.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line answers for every way a file can be bad."""
    if not path.is_file():
        raise CheckpointError(f"no {what} file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {what} {path}: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(
            f"cannot read {what} {path}: it is truncated or not a PyTorch checkpoint (torch.save "
            f"writes a zip archive); pass a last.pt or best.pt written by train.py"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below is the answer
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects that would run code when "
                f"unpickled; only checkpoints of tensors and plain data load"
            ) from None
        raise CheckpointError(
            f"cannot read {what} {path}: it is corrupt, or a plain pickle (never loaded, as "
            f"unpickling can run code)"
        ) from None
    except PermissionError:
        raise CheckpointError(f"cannot read {what} {path}: permission denied") from None
    except Exception as e:  # any other failure to parse the file (zip, struct, EOF, ...)
        first = (str(e) or type(e).__name__).split(". ")[0].splitlines()[0]
        raise CheckpointError(
            f"cannot read {what} {path}: the file is truncated or corrupt ({first})"
        ) from None


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Parameter names without the prefixes that ``torch.compile`` (``_orig_mod.``) and DDP /
    ``nn.DataParallel`` (``module.``) add, in any order and nesting."""

    def strip(key: str) -> str:
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    return {strip(k): v for k, v in state.items()}


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The weights in a file: a ``.safetensors`` file, a ``vit`` checkpoint (its EMA weights when
    it has them), an export folder's ``model.safetensors``, or a ``torch.save``-d state dict
    (timm's, possibly under ``model``/``state_dict``); wrapper prefixes are stripped.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe or holds no state dict.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefixes(load_file(path, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot read weights {path}: not a valid safetensors file ({e})"
            ) from None
    source = torch_load(path, "checkpoint")
    if isinstance(source, dict) and source.get("format") == CHECKPOINT_FORMAT:
        source = source.get("ema") or source.get("model")
    # Training scripts wrap the weights: {"model": state_dict, "optimizer": ..., ...}.
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(source, dict) and isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
            break
    if not isinstance(source, Mapping) or not source:
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")
    bad = [k for k, v in source.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} of its state dict are not tensors")
    return strip_wrapper_prefixes(source)


def check_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike[str]
) -> None:
    """Refuse weights that do not fit ``model`` exactly, naming the tensors: keys missing or not
    in the model, shapes that differ, integer or boolean tensors where the model holds floats
    (``load_state_dict`` would cast them silently), and NaN or infinite values.

    Raises:
        CheckpointError: one line naming ``source``, the first few offending tensors and the fix.
    """
    target = model.state_dict()
    problems = []
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    if missing:
        problems.append(f"missing {_names(missing)}")
    if extra:
        problems.append(f"not in the model {_names(extra)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(t.shape)})"
        for k, t in target.items()
        if k in state and state[k].shape != t.shape
    ]
    if shapes:
        problems.append(f"other shapes: {_names(shapes, quote=False)}")
    kinds = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"
        for k, t in target.items()
        if k in state and state[k].is_floating_point() != t.is_floating_point()
    ]
    if kinds:
        problems.append(f"not of the model's number type: {_names(kinds, quote=False)}")
    if problems:
        raise CheckpointError(
            f"the weights in {source} do not fit the model: {'; '.join(problems)}; they belong "
            f"to another model or were edited (export or save the checkpoint again)"
        )
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            f"the weights in {source} hold NaN or infinite values in {_names(bad)}; the file is "
            f"corrupt or the run diverged: use an earlier checkpoint"
        )


def _names(keys: list[str], quote: bool = True, n: int = 5) -> str:
    shown = ", ".join(repr(k) if quote else k for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_class_names(path: str | os.PathLike[str]) -> list[str] | None:
    """The class names a weight file's head answers, row by row, when the file records them: an
    export folder's ``config.json`` ``class_names``, a ``vit`` training checkpoint's
    ``task_state["classes"]``; ``None`` for anything else (timm's weights, a plain state dict)."""
    import json

    path = Path(path)
    try:
        if path.is_dir():
            names = json.loads((path / "config.json").read_text(encoding="utf-8"))
            names = names.get("class_names") if isinstance(names, dict) else None
        elif path.suffix != ".safetensors" and zipfile.is_zipfile(path):
            ckpt = torch_load(path, "checkpoint")
            names = None
            if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
                state = ckpt.get("task_state")
                names = state.get("classes") if isinstance(state, dict) else None
        else:
            return None
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
    return list(names) if ok and len(set(names)) == len(names) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / ``nn.DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, in any order and nesting (as ``timm.utils.unwrap_model``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
