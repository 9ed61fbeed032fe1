"""``python -m vit.export --checkpoint CKPT --out-dir DIR [--onnx] [--weights auto|ema|model]``.

Turns a training checkpoint into a weights-only folder: ``model.safetensors``, ``config.json``
(architecture, class names or vocabulary, preprocessing, metric; see
:mod:`vit.models.pretrained`), a ``README.md`` model card and, with ``--onnx``, ``model.onnx``
(classifiers). Load it with ``vit.models.from_pretrained(DIR)`` or predict with ``python -m
vit.predict --checkpoint DIR``. Exit code 2 with a one-line message on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vit.engine.checkpoint import checkpoint_preprocess, load_model
from vit.errors import CliParser, ConfigError, OutputError, UsageError, run_command
from vit.fileio import atomic_write, write_failure
from vit.models import num_params, save_pretrained
from vit.models.pretrained import CONFIG_NAME, EXPORT_FORMAT, WEIGHTS_NAME, timm_architecture
from vit.preprocess import Preprocess

__all__ = ["export_checkpoint", "export_onnx", "main", "train_command"]

ONNX_NAME = "model.onnx"
CARD_NAME = "README.md"
_EXPORT_FILES = {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, ONNX_NAME}
# Config keys that say how a run was continued or where it ran, not what was trained.
_NOT_IN_COMMAND = {"resume", "overwrite"}
_PATH_KEYS = {"data_dir", "cache_dir", "out_dir", "init_from"}


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    onnx: bool = False,
    weights: Literal["auto", "ema", "model"] = "auto",
) -> Path:
    """Write the export folder of a training checkpoint (see the module docstring); returns it.

    ``weights``: ``auto`` the EMA weights when the run kept them (what training validated), else
    the raw ones. An existing ``out_dir`` must be empty or a previous export (it is overwritten).

    Raises:
        UsageError: a bad checkpoint; an ``out_dir`` holding other files; ``onnx`` for a
            captioner or without the ``onnx``/``onnxscript`` packages.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    model, ckpt = load_model(checkpoint, weights)
    task = ckpt["task"]
    if onnx and task != "classify":
        raise UsageError(
            f"--onnx exports classifiers only; {checkpoint} is a {task!r} checkpoint (its "
            f"generate() loop is not one graph): export it without --onnx"
        )
    preprocess = checkpoint_preprocess(ckpt)
    used_ema = weights != "model" and bool(ckpt.get("ema"))
    config = export_config(ckpt, preprocess, used_ema=used_ema, model=model)
    # The whole folder is written beside its destination and renamed into place: an export
    # interrupted at any point (a kill during --onnx, a full disk) leaves the previous folder
    # as it was, never new weights beside an old graph or config, and nothing is written
    # through a link the folder holds (a Hub snapshot is all links).
    final = out.resolve() if out.is_symlink() else out
    staging = _staging_dir(final)
    try:
        try:
            save_pretrained(model, staging, config=config)
            with atomic_write(staging / CARD_NAME) as f:
                f.write(model_card(config, ckpt, num_params(model), out))
        except OSError as e:
            raise write_failure(e, out) from None
        except Exception as e:  # safetensors reports a failed write as SafetensorError
            if type(e).__name__ != "SafetensorError":
                raise
            reason = "the disk is full" if "No space left" in str(e) else str(e).splitlines()[0]
            raise OutputError(
                f"cannot write {out}: {reason}; nothing was written there", reason
            ) from None
        if onnx:
            export_onnx(model, staging / ONNX_NAME, preprocess.img_size)
        try:
            _replace_dir(staging, final)
        except OSError as e:
            raise write_failure(e, out) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _staging_dir(final: Path) -> Path:
    """A fresh, exclusively created folder beside ``final`` (same file system, so the final
    rename is atomic), readable as a normal folder."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {final}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _replace_dir(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` (empty, or a previous export) is
    first renamed aside and removed after. Between the two renames ``final`` is absent (refused
    by loaders), never mixed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(staging, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_config(
    ckpt: dict[str, Any],
    preprocess: Preprocess,
    *,
    used_ema: bool,
    model: nn.Module | None = None,
) -> dict:
    """The entries of ``config.json`` for a training checkpoint (``model``: its rebuilt model, for
    a classifier's timm ``pretrained_cfg``)."""
    from vit.engine.tasks import get_task

    spec, state, task = ckpt["model_spec"], ckpt["task_state"], ckpt["task"]
    metrics = ckpt.get("metrics") or {}
    primary = get_task(task).primary_metric
    progress = ckpt.get("progress") or {}
    config: dict[str, Any] = {
        "architecture": timm_architecture(spec["name"], task),
        "model_args": spec["kwargs"],
        "task": task,
    }
    if task == "caption":
        config["vocab"] = list(state["vocab"])
    else:
        config["num_classes"] = len(state["classes"])
        config["class_names"] = list(state["classes"])
        config["pretrained_cfg"] = timm_pretrained_cfg(model, preprocess, list(state["classes"]))
    config |= {
        "img_size": preprocess.img_size,
        "preprocess": preprocess.to_dict(),
        "weights": "ema" if used_ema else "model",
        "metric": {
            "name": primary,
            "value": _finite(metrics.get(primary)),
            "split": "val",
            "epoch": progress.get("epoch"),
            "step": progress.get("step"),
            "all": {k: _finite(v) for k, v in metrics.items() if isinstance(v, int | float | str)},
        },
        "train_config": ckpt["config"],
    }
    return json.loads(json.dumps(config, default=str))  # plain JSON data, tuples as lists


def timm_pretrained_cfg(
    model: nn.Module | None, preprocess: Preprocess, class_names: list[str]
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of an exported classifier: the preprocessing it was trained
    with (what ``timm.data.resolve_data_config`` builds transforms from), its class names, and
    the names of its first convolution and classifier (timm adapts ``in_chans`` and drops a head
    of another class count by them)."""
    from vit.models import VisionTransformer

    if isinstance(model, VisionTransformer):
        from vit.timm_interop import pretrained_cfg

        base = pretrained_cfg(model.config)
    else:  # a timm model (`--model timm:NAME`): its own registered configuration
        from timm.models import filter_pretrained_cfg

        base = filter_pretrained_cfg(dict(getattr(model, "pretrained_cfg", {})), remove_source=True)
        base.pop("state_dict", None)
    return (
        base
        | preprocess.timm_data_config()
        | {
            "num_classes": len(class_names),
            "label_names": class_names,
        }
    )


def _finite(value: Any) -> Any:
    """A metric for JSON, which has no NaN: a non-finite number becomes ``None``."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def train_command(run_config: dict[str, Any]) -> str:
    """The ``python train.py --config none ...`` line that sets a run's configuration whatever the
    recipes: every key whose value differs from :class:`~vit.engine.config.RunConfig`'s default,
    as its ``--option``."""
    import yaml

    from vit.engine.config import RunConfig

    defaults = dataclasses.asdict(RunConfig())
    parts = ["python train.py", "--config", "none"]
    for key, value in run_config.items():
        if key in _NOT_IN_COMMAND or key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            flow = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
            parts += [flag, shlex.quote(flow)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def model_card(config: dict[str, Any], ckpt: dict[str, Any], n_params: int, out: Path) -> str:
    """A short ``README.md``: what the model is, its data and metric, how it was trained, how to
    load it, and its preprocessing."""
    run = ckpt["config"]
    arch, task, size = config["architecture"], config["task"], config["img_size"]
    if task == "caption":
        what = f"an image captioner (vocabulary of {len(config['vocab'])} words)"
    else:
        names = config["class_names"]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        what = f"an image classifier over {len(names)} classes ({shown})"
    data = f"`--data {run.get('data')}`"
    if run.get("data") not in ("synthetic", "shapes"):
        data += f" from `{_local(run.get('data_dir', ''))}`"
    # The card travels with the folder: no absolute local paths.
    out = Path(_local(out))
    shown = {k: _local(v) if k in _PATH_KEYS and v else v for k, v in run.items()}
    m = config["metric"]
    if isinstance(m.get("value"), int | float):
        result = (
            f"{m['name']} = {m['value']:.4f} on the validation split, at the last validation "
            f"(epoch {m.get('epoch')}, step {m.get('step')}), as recorded in the checkpoint."
        )
    else:
        result = "The checkpoint records no validation metric."
    others = {k: v for k, v in m.get("all", {}).items() if k not in (m["name"], "n")}
    if others:
        result += " Also: " + ", ".join(f"{k} {_num(v)}" for k, v in others.items()) + "."
    weights = (
        "the EMA weights (exponential moving average of the training weights; what validation "
        "scored)"
        if config["weights"] == "ema"
        else "the raw training weights"
    )
    p = Preprocess.from_dict(config["preprocess"])
    resize = (
        f"the whole image resized to {size}x{size}"
        if p.resize == "squash"
        else f"the shorter side resized to {size}, then the centre {size}x{size} square"
    )
    mean, std = (", ".join(f"{v:.4f}" for v in t) for t in (p.mean, p.std))
    use = (
        "ids = model.generate(x)  # token ids; config.json's vocab maps them to words"
        if task == "caption"
        else "probs = model(x).softmax(-1)  # model.pretrained_cfg['label_names'] names them"
    )
    predict = (
        ""
        if task == "caption"
        else f"\nOr from the command line: `python -m vit.predict --checkpoint {out} IMAGES...`\n"
    )
    typed = f"The command:\n\n```\n{ckpt['command']}\n```\n\n" if ckpt.get("command") else ""
    return f"""# {arch}

{what[0].upper() + what[1:]}, a Vision Transformer (`{arch}`, {n_params:,} parameters, \
{size}x{size} input) trained with the `vit` package. `model.safetensors` holds {weights}.

## Data

{data}, task `{task}`.

## Result

{result}

## How it was trained

{typed}Every setting (it reproduces the run whatever the defaults and recipes of the version):

```
{train_command(shown)}
```

## Use

```python
from vit.models import from_pretrained
from vit.preprocess import Preprocess
import json

model = from_pretrained("{out}")
preprocess = Preprocess.from_dict(json.load(open("{out}/config.json"))["preprocess"])
x = preprocess.normalize(preprocess.load("image.png"))[None]
{use}
```
{predict}
## Preprocessing

Decoded to 8-bit RGB (EXIF orientation applied), {resize} ({p.interpolation}), scaled to [0, 1]
and normalised per channel with mean ({mean}) and std ({std}): `config.json`'s `preprocess`,
which `vit.preprocess.Preprocess.from_dict` turns back into the exact pipeline.
"""


def _local(path: str | os.PathLike[str]) -> str:
    """``path`` for a card that leaves this machine: relative to the working directory when it
    lies below it, else its last component (a local absolute path says nothing elsewhere)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def export_onnx(model: nn.Module, path: Path, img_size: int) -> None:
    """Write ``model`` (a classifier: images (B, 3, S, S) → logits (B, C)) as ONNX with a dynamic
    batch axis, through ``torch.onnx.export``'s ``torch.export``-based exporter (the default since
    torch 2.9; it takes ``dynamic_shapes``, the legacy TorchScript one ``dynamic_axes``).

    Raises:
        UsageError: the ``onnx``/``onnxscript`` packages are missing, or the export failed.
    """
    try:
        import onnx  # noqa: F401  the exporter's dependencies
        import onnxscript  # noqa: F401
    except ImportError:
        raise UsageError(
            "--onnx needs the onnx and onnxscript packages: pip install onnx onnxscript"
        ) from None
    # torch.export specialises sizes 0 and 1, so the example batch has 2 images.
    example = torch.zeros(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            verbose=False,  # no progress lines on stdout
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,  # one file: our models are far below ONNX's 2 GB limit
        )
        program.save(str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # the exporter raises many types; each is one line for the user
        tmp.unlink(missing_ok=True)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(
            f"could not export the model to ONNX ({type(e).__name__}: {first})"
        ) from None


def _check_out_dir(out: Path) -> None:
    """Refuse an ``out`` that is a file, whose parent folder cannot be written, or a non-empty
    folder that is not a previous export."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file; pass a folder")
    parent = (out.resolve() if out.is_symlink() else out).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write --out-dir {out}: {parent} is not writable")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    others = [n for n in names if n not in _EXPORT_FILES and not n.endswith(".tmp")]
    if others or _format(out / CONFIG_NAME) != EXPORT_FORMAT:
        shown = ", ".join((others or names)[:5]) + (" ..." if len(others or names) > 5 else "")
        raise ConfigError(
            f"--out-dir {out} is not empty and not a previous export (it holds {shown}); choose "
            f"a new or empty folder"
        )


def _format(path: Path) -> Any:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("format") if isinstance(record, dict) else None


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m vit.export", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train.py")
    p.add_argument("--out-dir", required=True, help="the export folder (new, empty or an export)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (classifiers)")
    p.add_argument(
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="auto: the EMA weights when the run kept them (default); ema; model: the raw weights",
    )

    def run() -> None:
        args = p.parse_args(argv)
        out = export_checkpoint(args.checkpoint, args.out_dir, onnx=args.onnx, weights=args.weights)
        print(f"exported {args.checkpoint} to {out}: {', '.join(sorted(_files(out)))}")

    return run_command(run)


def _files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name in _EXPORT_FILES]


if __name__ == "__main__":
    sys.exit(main())
