"""``python -m vit.evaluate --checkpoint PATH [--data NAME] [--data-dir DIR] [--split val|test]``.

Rebuilds the task and model stored in a training checkpoint, evaluates a split and prints one JSON
object as the last line, e.g. ``{"top1": 0.81, "loss": 0.55, "n": 10000}``. Exit code 2 with a
one-line message on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Literal

import torch

from vit.engine.checkpoint import load_model
from vit.engine.config import make_config, resolve_device
from vit.engine.tasks import get_task
from vit.errors import CliParser, ConfigError, run_command
from vit.fileio import atomic_write, check_output, csv_row
from vit.preprocess import display_path

__all__ = ["evaluate_checkpoint", "main"]


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    split: Literal["val", "test"] = "val",
    batch_size: int = 256,
    device: str = "auto",
    weights: Literal["auto", "ema", "model"] = "auto",
    amp: Literal["bf16", "fp16", "off"] = "off",
    tta_hflip: bool | None = None,
    predictions: list[dict[str, Any]] | None = None,
    records: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a split; ``data``/``data_dir`` default to the training run's.

    ``weights``: ``auto`` the EMA weights when the run kept them (what training validated), ``ema``
    (an error without them) or ``model`` (the raw weights). ``tta_hflip``: average each image's
    softmax with its mirror image's (default: as the run validated). ``predictions``: a list
    that receives one record per image (index, file path for image folders, label, predicted
    class and its probability); ``records``: a dict that receives the task's non-scalar results
    (e.g. the confusion matrix). The metrics are those training's validation reports.

    Raises:
        UsageError: a bad checkpoint, dataset or option (one line naming the fix).
    """
    from vit.data import make_loader

    model, ckpt = load_model(checkpoint, weights)
    values = dict(ckpt["config"])
    if data is not None:
        values["data"] = data
    if data_dir is not None:
        values["data_dir"] = data_dir
    if tta_hflip is not None:
        values["tta_hflip"] = tta_hflip
    values.update(resume="", device=device)
    cfg = make_config(values)
    task = get_task(cfg.task)(cfg, ckpt["task_state"])
    dataset = task.build_dataset(split)
    dev = resolve_device(device)
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(
        dataset, batch_size, shuffle=False, drop_last=False, collate_fn=task.collate_fn()
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
    kw = {} if predictions is None else {"predictions": predictions}
    with autocast:
        metrics = task.evaluate(model, loader, dev, **kw)
    if predictions is not None:
        paths = getattr(task, "paths", {}).get(split)
        for i, row in enumerate(predictions):
            row.update({"index": i, **({"path": display_path(paths[i])} if paths else {})})
    if records is not None:
        records.update(task.records())
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m vit.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train.py")
    p.add_argument("--data", help="dataset name (default: the one it was trained on)")
    p.add_argument("--data-dir", help="dataset directory (default: the training run's)")
    p.add_argument(
        "--split", choices=("val", "test"), default="val", help="which held-out images to score"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_device()
    p.add_weights()
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off", help="autocast dtype")
    p.add_argument(
        "--tta-hflip",
        action=argparse.BooleanOptionalAction,
        help="average each image's softmax with its mirror image's (default: as the run did)",
    )

    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="also write one row per image (.csv or .jsonl): index, path, label, prediction, "
        "prob (as python -m vit.predict --predictions)",
    )

    def run() -> None:
        args = vars(p.parse_args(argv))
        if args["batch_size"] <= 0:
            raise ConfigError(f"--batch-size must be positive, got {args['batch_size']}")
        out = args.pop("predictions")
        if out is not None and Path(out).suffix.lower() not in (".csv", ".jsonl"):
            raise ConfigError(f"--predictions must end in .csv or .jsonl, got {out}")
        if out is not None:  # before the evaluation runs; never over the checkpoint
            check_output(out, "--predictions", inputs=[args["checkpoint"]])
        rows: list[dict[str, Any]] | None = [] if out is not None else None
        records: dict[str, Any] = {}
        metrics = evaluate_checkpoint(**args, predictions=rows, records=records)
        if out is not None:
            _write_rows(Path(out), rows or [])
        print(json.dumps(metrics | records))

    return run_command(run)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON lines, or CSV with a header, chosen by ``path``'s extension."""
    columns = ["index", "path", "label", "predicted", "prob"]
    columns = [c for c in columns if rows and c in rows[0]]
    with atomic_write(path, newline="") as f:
        if path.suffix.lower() == ".jsonl":
            f.writelines(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows)
        else:
            table = csv.writer(f)
            table.writerow(columns)
            table.writerows(csv_row(r.get(c) for c in columns) for r in rows)


if __name__ == "__main__":
    raise SystemExit(main())
