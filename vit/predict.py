"""``python -m vit.predict --checkpoint CKPT|EXPORT_DIR PATH [PATH ...] [--predictions FILE]``.

Classifies image files, and the images in folders (recursively; hidden files skipped), with a
training checkpoint or an export folder, preprocessing each file exactly as training did. Prints
one JSON line per image, ``{"path": ..., "classes": [top-k names], "probs": [top-k
probabilities]}``, or writes them to ``--predictions`` (``.jsonl``, or ``.csv``: path, class_1,
prob_1, ..., class_k, prob_k). A file that cannot be read is reported on stderr and skipped: exit
code 0 when any image was classified, 2 when none was or on bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import torch
from torch import nn

from vit.errors import CheckpointError, CliParser, ConfigError, DataError, run_command
from vit.fileio import atomic_write, check_output, csv_row
from vit.preprocess import Preprocess, display_path, image_paths

__all__ = ["expand_paths", "load_classifier", "main", "predict"]

_FORMATS = (".csv", ".jsonl")


def load_classifier(
    model_path: str | os.PathLike[str], weights: Literal["auto", "ema", "model"] = "auto"
) -> tuple[nn.Module, list[str], Preprocess]:
    """``(model, class_names, preprocess)`` of a training checkpoint (a file) or an export folder,
    the model in eval mode on the CPU.

    Raises:
        CheckpointError: missing or unusable; a captioner; ``weights`` the export does not hold.
    """
    from vit.engine.checkpoint import checkpoint_preprocess, load_model
    from vit.models.pretrained import read_export

    path = Path(model_path)
    preprocess: Preprocess | None
    if path.is_dir():
        model, config = read_export(path)
        if weights not in ("auto", config["weights"]):
            held = {"ema": "the EMA weights", "model": "the raw training weights"}[
                config["weights"]
            ]
            raise CheckpointError(
                f"export folder {path} holds {held} only; use --weights auto, or export the "
                f"checkpoint again with --weights {weights}"
            )
        task, classes = config["task"], config.get("class_names")
        preprocess = Preprocess.from_dict(config["preprocess"])
    elif path.exists():
        model, ckpt = load_model(path, weights)
        task, classes = ckpt["task"], ckpt["task_state"].get("classes")
        preprocess = checkpoint_preprocess(ckpt) if task == "classify" else None
    else:
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a best.pt/last.pt written by train.py or a "
            f"folder written by python -m vit.export"
        )
    if task != "classify":
        raise CheckpointError(
            f"{path} is a {task!r} model, not a classifier; to caption images use python -m "
            f"vit.caption"
        )
    assert preprocess is not None  # set for every classifier above
    return model, list(classes or []), preprocess


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files and the images in folders: :func:`vit.preprocess.image_paths`.

    Raises:
        DataError: a path that does not exist, or no image at all.
    """
    return image_paths(paths)


def predict(
    model_path: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    topk: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    weights: Literal["auto", "ema", "model"] = "auto",
    on_error: Callable[[Path, DataError], None] | None = None,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Classify image files (folders are searched, see :func:`expand_paths`) with a checkpoint or
    an export folder: an iterator of ``{"path": ..., "classes": [...], "probs": [...]}``, one per
    image read, the
    ``topk`` most probable classes first (``topk`` is clamped to the number of classes).

    Each file is read through the model's own :class:`~vit.preprocess.Preprocess`. A file that
    cannot be read is passed to ``on_error(path, error)`` and skipped; without ``on_error`` the
    error is raised. ``progress``: a tqdm bar on stderr (shown after a second).

    Raises:
        UsageError: a bad checkpoint, path or option: raised by this call, before any image is
            read (the rows are computed as they are iterated).
    """
    from vit.engine.config import resolve_device

    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    model, classes, preprocess = load_classifier(model_path, weights)
    files = expand_paths(paths)
    # Checked above, before the first row is asked for: this is not a generator function.
    return _rows(model.to(dev), classes, preprocess, files, min(topk, len(classes)), batch_size,
                 dev, on_error, progress)  # fmt: skip


def _rows(
    model: nn.Module,
    classes: list[str],
    preprocess: Preprocess,
    files: list[Path],
    k: int,
    batch_size: int,
    device: torch.device,
    on_error: Callable[[Path, DataError], None] | None,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress, delay=1.0)
    batch: list[torch.Tensor] = []
    names: list[Path] = []
    with bar:
        for i, path in enumerate(files):
            try:
                batch.append(preprocess.load(path))
                names.append(path)
            except DataError as e:
                if on_error is None:
                    raise
                on_error(path, e)
            bar.update()
            if batch and (len(batch) == batch_size or i == len(files) - 1):
                yield from _classify(model, preprocess, batch, names, classes, k, device)
                batch, names = [], []


def _classify(
    model: nn.Module,
    preprocess: Preprocess,
    images: list[torch.Tensor],
    paths: list[Path],
    classes: list[str],
    k: int,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    x = preprocess.normalize(torch.stack(images).to(device))
    with torch.inference_mode():
        probs = model(x).float().softmax(dim=-1).cpu()
    if probs.shape[-1] != len(classes):
        raise CheckpointError(
            f"the model has {probs.shape[-1]} outputs but {len(classes)} class names"
        )
    if not bool(torch.isfinite(probs).all()):  # never a NaN in the output, which is not JSON
        shown = ", ".join(display_path(p) for p in paths[:3])
        raise CheckpointError(
            f"the model's outputs are not finite numbers for {shown}: its weights or "
            f"preprocessing are broken; export the checkpoint again"
        )
    top_p, top_i = probs.topk(k, dim=-1)
    for path, p, idx in zip(paths, top_p.tolist(), top_i.tolist(), strict=True):
        yield {"path": display_path(path), "classes": [classes[j] for j in idx], "probs": p}


def _writer(stream: IO[str], fmt: str, k: int) -> Callable[[dict[str, Any]], object]:
    if fmt == ".jsonl":
        return lambda row: stream.write(json.dumps(row) + "\n")
    table = csv.writer(stream)
    table.writerow(["path", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob"))])

    def write(row: dict[str, Any]) -> None:
        pairs = zip(row["classes"], row["probs"], strict=True)
        table.writerow(csv_row([row["path"], *(v for pair in pairs for v in pair)]))

    return write


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m vit.predict", description=__doc__.split("\n\n")[1])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument(
        "--checkpoint", required=True, help="a best.pt/last.pt, or a python -m vit.export folder"
    )
    p.add_argument(
        "--topk", type=int, default=5, help="classes per image (default 5; at most all classes)"
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="write the rows to this .csv or .jsonl file instead of stdout (as python -m "
        "vit.evaluate --predictions)",
    )
    p.add_argument("--output", metavar="FILE", help=argparse.SUPPRESS)  # the former name
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_device()
    p.add_weights()
    return run_command(lambda: _run(p.parse_args(argv)))


def _run(args: Any) -> None:
    from tqdm import tqdm

    if args.output is not None:
        print("note: --output is deprecated; use --predictions FILE", file=sys.stderr)
        if args.predictions is not None:
            raise ConfigError("pass --predictions FILE alone (--output is its former name)")
        args.predictions = args.output
    out = Path(args.predictions) if args.predictions else None
    fmt = out.suffix.lower() if out else ".jsonl"
    if fmt not in _FORMATS:
        raise ConfigError(
            f"--predictions must end in .csv or .jsonl, got {display_path(args.predictions)}"
        )
    if out is not None:  # before any work; an output never replaces an input
        ckpt = Path(args.checkpoint)
        inside = list(ckpt.iterdir()) if ckpt.is_dir() else []
        check_output(out, "--predictions", inputs=[ckpt, *inside, *args.paths])
    failed: list[Path] = []

    def skip(path: Path, error: DataError) -> None:
        failed.append(path)
        tqdm.write(f"skipped: {error}", file=sys.stderr)

    rows = predict(
        args.checkpoint,
        args.paths,
        topk=args.topk,
        batch_size=args.batch_size,
        device=args.device,
        weights=args.weights,
        on_error=skip,
        progress=sys.stderr.isatty(),
    )
    first = next(rows, None)
    if first is None:
        raise DataError(f"none of the {len(failed)} images could be read")
    written = 0
    try:
        with atomic_write(out, newline="") if out else _stdout() as stream:
            write = _writer(stream, fmt, len(first["classes"]))
            for row in _chain(first, rows):
                write(row)
                written += 1
    except BrokenPipeError:  # stdout's reader stopped early (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if failed:
        total = written + len(failed)
        print(f"{len(failed)} of {total} images could not be read", file=sys.stderr)


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


@contextlib.contextmanager
def _stdout() -> Iterator[TextIO]:
    yield sys.stdout


if __name__ == "__main__":
    sys.exit(main())
