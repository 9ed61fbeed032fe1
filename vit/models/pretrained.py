"""Weights-only artifacts: an export folder (``model.safetensors`` + ``config.json``) and one-call
loading, from a local folder or a Hugging Face Hub repository.

The folder is the Hub's layout for PyTorch models (``huggingface_hub.upload_folder`` publishes it
as it is; ``python -m vit.export`` writes it from a training checkpoint, with a ``README.md`` model
card). ``config.json`` holds::

    {"format": "vit.export/1", "architecture": "vitpkg_vit_tiny_patch4_32", "model_args": {...},
     "task": "classify", "num_classes": 10, "class_names": [...],    # captioners: "vocab": [...]
     "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [...], "label_names": [...], ...},
     "img_size": 32, "preprocess": {...},  # vit.preprocess.Preprocess.to_dict()
     "weights": "ema" | "model", "metric": {"name": "top1", "value": 0.81, ...}, "vit_version": ...}

A classifier's folder is also timm's layout (``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg``): ``import vit.timm_interop; timm.create_model("local-dir:DIR",
pretrained=True)`` loads it. Its ``architecture`` is therefore timm's registry name:
``vitpkg_<variant>`` for ours (:func:`timm_architecture`), ``NAME`` for a ``timm:NAME`` model.
Exports written before (no ``pretrained_cfg``) name our variant or ``timm:NAME`` and still load.

We do not use ``huggingface_hub.PyTorchModelHubMixin``: it rebuilds a model by calling its class
with the ``__init__`` arguments it recorded, but ours are built from a variant name plus keyword
overrides by a task (a captioner may wrap any ViT variant as its encoder), so the caller would
have to know the class; its config would lack the preprocessing and class names inference needs;
and it builds whatever a downloaded config asks for before it looks at the weights, where
:func:`from_pretrained` refuses a model larger than the weights stored beside it. Loading also
needs no ``huggingface_hub`` import unless a repository is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from vit.errors import CheckpointError, UsageError
from vit.fileio import atomic_write
from vit.models._builder import build, check_spec_sizes, upgrade_spec
from vit.models._helpers import check_state_dict
from vit.models._registry import TIMM_PREFIX
from vit.preprocess import Preprocess

__all__ = [
    "CONFIG_NAME",
    "EXPORT_FORMAT",
    "WEIGHTS_NAME",
    "export_config_problems",
    "from_pretrained",
    "read_export",
    "read_export_config",
    "save_pretrained",
    "spec_name",
    "timm_architecture",
]

EXPORT_FORMAT = "vit.export/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# What config.json must hold, with the type of each entry (num_classes/class_names for
# classifiers and vocab for captioners are checked per task).
_REQUIRED = {"architecture": str, "model_args": dict, "task": str, "preprocess": dict}
# "owner/name" (or a bare legacy name) as the Hub spells repository ids.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FIX = "write one with python -m vit.export --checkpoint CKPT --out-dir DIR"


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike[str], *, config: dict) -> Path:
    """Write ``model``'s weights as ``out_dir/model.safetensors`` and ``config`` (the entries of
    ``config.json`` listed in the module docstring; ``format`` and ``vit_version`` are added) as
    ``out_dir/config.json``. Returns ``out_dir``.

    Tied weights (the captioner's output projection is its token embedding) are stored once.
    Each file is written to a temporary name and renamed, so a crash leaves no half file.

    Raises:
        ValueError: ``config`` lacks an entry :func:`from_pretrained` needs.
    """
    from safetensors.torch import save_model
    from timm.utils import unwrap_model

    from vit import __version__

    missing = [k for k, tp in _REQUIRED.items() if not isinstance(config.get(k), tp)]
    if missing:
        raise ValueError(f"save_pretrained: config needs {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)  # torch.compile and DDP wrappers would prefix every key
    record = {"format": EXPORT_FORMAT, **config}
    record.setdefault("vit_version", __version__)
    # Each file goes to a temporary name created exclusively (a planted link is never
    # followed), then is renamed over the old one.
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp, metadata={"format": "pt"})  # "pt": what the Hub's loaders expect
        # safetensors creates its file 0600; the folder's other files follow the umask, and so
        # must this one, or an export shared with others cannot be read.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out / WEIGHTS_NAME)
    finally:
        Path(tmp).unlink(missing_ok=True)
    with atomic_write(out / CONFIG_NAME) as f:
        f.write(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def timm_architecture(name: str, task: str) -> str:
    """``config.json``'s ``architecture`` for a model spec named ``name``: for a classifier, the
    name ``timm.create_model`` knows (``vitpkg_<name>`` for ours, ``NAME`` for ``timm:NAME``); a
    captioner keeps ours (timm builds no captioners)."""
    if task != "classify":
        return name
    if name.startswith("timm:"):
        return name.removeprefix("timm:")
    return f"{TIMM_PREFIX}{name}"


def spec_name(config: dict[str, Any]) -> str:
    """The model spec name of an export's ``config.json``: the inverse of
    :func:`timm_architecture` for timm-layout configs (those with a ``pretrained_cfg``), the
    ``architecture`` as it is for the ones written before."""
    arch = config["architecture"]
    if config.get("task") != "classify" or "pretrained_cfg" not in config:
        return arch
    if arch.startswith(TIMM_PREFIX):
        return arch.removeprefix(TIMM_PREFIX)
    return f"timm:{arch}"


def read_export_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``config.json`` of an export folder.

    Raises:
        CheckpointError: the folder or its config is missing, unreadable, not JSON, not of format
            ``vit.export/1``, or missing an entry (one line naming the file and the fix).
    """
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; {_FIX}")
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a vit export folder: it holds no {CONFIG_NAME}; {_FIX}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}); export the checkpoint again"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a vit export config") from None
    except ValueError as e:  # NaN / Infinity, which JSON does not have
        raise CheckpointError(f"{path} is malformed: {e}; export the checkpoint again") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a vit export config (no format {EXPORT_FORMAT!r}); {_FIX}"
        )
    problems = export_config_problems(config)
    if problems:
        raise CheckpointError(f"{path} is malformed: {'; '.join(problems)}; export it again")
    return config


def _no_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, not a number")


def export_config_problems(config: dict[str, Any]) -> list[str]:
    """Everything wrong with the entries of an export's ``config.json`` (the module docstring's
    schema), one phrase each; ``[]`` when it is sound. Entries this version does not know (e.g.
    the Hub's or timm's) are left alone."""
    problems = [
        f"{k!r} is missing" if k not in config else f"{k!r} is not a {tp.__name__}"
        for k, tp in _REQUIRED.items()
        if not isinstance(config.get(k), tp)
    ]
    task = config.get("task")
    if "task" in config and task not in ("classify", "caption"):
        problems.append(f"'task' is {task!r}, not 'classify' or 'caption'")
    labels = "vocab" if task == "caption" else "class_names"
    names = config.get(labels)
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        problems.append(f"{labels!r} is not a list of names")
    elif len(set(names)) != len(names):
        problems.append(f"{labels!r} repeats a name")
    elif labels == "class_names":
        counts = {config.get("num_classes"), (config.get("model_args") or {}).get("num_classes")}
        if not counts <= {len(names), None}:
            problems.append(f"num_classes does not match the {len(names)} class_names")
    if config.get("weights") not in ("ema", "model"):
        problems.append(f"'weights' is {config.get('weights')!r}, not 'ema' or 'model'")
    preprocess = None
    if isinstance(config.get("preprocess"), dict):
        try:
            preprocess = Preprocess.from_dict(config["preprocess"])
        except UsageError as e:
            problems.append(str(e))
    size = config.get("img_size")
    model_size = (config.get("model_args") or {}).get("img_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        problems.append(f"'img_size' is {size!r}, not a positive integer")
    elif preprocess is not None and size != preprocess.img_size:
        problems.append(f"'img_size' {size} differs from the preprocess img_size")
    elif model_size is not None and size != model_size:
        problems.append(f"'img_size' {size} differs from the model's img_size {model_size!r}")
    metric = config.get("metric")
    if metric is not None and not isinstance(metric, dict):
        problems.append("'metric' is not a mapping")
    if isinstance(config.get("model_args"), dict):
        try:
            check_spec_sizes({"name": config.get("architecture"), "kwargs": config["model_args"]})
        except ValueError as e:
            problems.append(str(e))
    return problems


def read_export(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, config)`` of a local export folder: as :func:`from_pretrained`, with its
    validated ``config.json`` (e.g. for the class names and :class:`~vit.preprocess.Preprocess`).

    Raises:
        CheckpointError: as :func:`read_export_config`; a folder without weights; weights that are
            corrupt, non-finite, not floating point, or do not fit the config's architecture (the
            tensors are named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config = read_export_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(
            f"export folder {folder} holds no weights ({WEIGHTS_NAME} is missing); {_FIX}"
        )
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {weights}: not a valid safetensors file ({e})"
        ) from None
    preprocess = Preprocess.from_dict(config["preprocess"])  # checked by read_export_config
    stored = sum(v.numel() for v in state.values())
    spec = upgrade_spec({"name": spec_name(config), "kwargs": config["model_args"]}, config["task"])
    try:
        model = build(spec, max_params=stored)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{folder / CONFIG_NAME} and {WEIGHTS_NAME} disagree: the config's model cannot be "
            f"built with the {stored:,} weights stored beside it ({first}); export the "
            f"checkpoint again"
        ) from None
    built = getattr(getattr(model, "config", None), "img_size", config["img_size"])
    if config["task"] == "classify" and built != config["img_size"]:
        raise CheckpointError(
            f"{folder / CONFIG_NAME} is malformed: 'img_size' {config['img_size']} differs from "
            f"its model's {built}; export it again"
        )
    _fill_tied(model, state)
    check_state_dict(model, state, weights)
    model.load_state_dict(state)
    # torch types Module.__setattr__ values as Tensor | Module; any attribute can be set.
    model.pretrained_cfg = _pretrained_cfg(config, preprocess)  # type: ignore[assignment]
    return model.eval(), config


def _fill_tied(model: nn.Module, state: dict[str, Any]) -> None:
    """Tied weights (one tensor under several names, e.g. a captioner's output projection and
    token embedding) are stored once by safetensors: give the stored tensor every name it has."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        stored = [n for n in names if n in state]
        for name in names if len(names) > 1 and stored else []:
            state.setdefault(name, state[stored[0]])


def from_pretrained(
    path_or_repo_id: str | os.PathLike[str], *, revision: str | None = None
) -> nn.Module:
    """The model of an export folder (``python -m vit.export``), in eval mode on the CPU, with a
    timm-style ``model.pretrained_cfg`` (mean, std, input_size, interpolation, crop_pct,
    num_classes, label_names). A path that is not a local folder is taken as a Hugging Face Hub
    repository id and downloaded (``revision``: a branch, tag or commit).

    Raises:
        CheckpointError: as :func:`read_export`; a Hub repository that cannot be fetched.
    """
    folder = Path(path_or_repo_id)
    if not folder.is_dir():
        folder = _download(os.fspath(path_or_repo_id), revision)
    return read_export(folder)[0]


def _download(repo_id: str, revision: str | None) -> Path:
    if Path(repo_id).exists():
        raise CheckpointError(
            f"{repo_id} is a file, not an export folder; for a training checkpoint use "
            f"vit.engine.checkpoint.load_model, or export it with python -m vit.export"
        )
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"export folder {repo_id} does not exist; {_FIX}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        files = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"no local folder {repo_id}, and fetching it as a Hugging Face Hub repository "
            f"failed ({first})"
        ) from None


def _pretrained_cfg(config: dict[str, Any], preprocess: Preprocess) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` keys, read by ``timm.data.resolve_data_config``. With crop_pct
    1.0, timm's centre crop is ours: the shorter side to the size, then the centre square."""
    classify = config["task"] != "caption"
    stored = config.get("pretrained_cfg")
    return {
        **(stored if isinstance(stored, dict) else {}),  # first_conv, classifier, ... (timm layout)
        "architecture": config["architecture"],
        **preprocess.timm_data_config(),
        "num_classes": len(config["class_names"]) if classify else 0,
        "label_names": list(config["class_names"]) if classify else None,
    }
