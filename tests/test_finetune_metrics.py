"""Fine-tuning on the command line (--init-from, --layer-decay, --grad-accum-steps) and the metrics
people read (top-5, per-class accuracy, the confusion matrix, per-image predictions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY as ENGINE_TINY
from conftest import flags
from PIL import Image

from vit.engine.checkpoint import load_checkpoint
from vit.engine.config import make_config
from vit.engine.trainer import Trainer
from vit.train import main

# 64 validation images: more than one batch of the validation loader.
TINY = {**ENGINE_TINY, "synthetic_val": 64}


def _folder(root: Path, classes=("cat", "dog", "owl"), n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c, hue in zip(classes, (0, 1, 2), strict=False):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 60, (24, 40, 3), dtype=np.uint8)
            arr[6:18, 14:26, hue] = 230  # the class colour in the centre
            Image.fromarray(arr).save(root / "train" / c / f"{i}.png")
    return root


def test_validation_reports_top5_per_class_and_confusion(tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vit.evaluate import main as evaluate_main

    out = tmp_path / "run"
    assert main(flags({**TINY, "out_dir": str(out)})) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    confusion = torch.tensor(record["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == record["n"] == 64
    assert record["top1"] == pytest.approx(confusion.trace().item() / 64)
    recall = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    classes = load_checkpoint(out / "last.pt")["task_state"]["classes"]
    assert [record[f"top1/{c}"] for c in classes] == pytest.approx(recall.tolist())
    assert record["top1"] <= record["top5"] <= 1 and result["top5"] == record["top5"]
    acc = EventAccumulator(str(out), size_guidance={"images": 0})
    acc.Reload()
    assert (
        "val/confusion" in acc.Tags()["images"]
        and "val_per_class/top1/disk" in acc.Tags()["scalars"]
    )
    # vit.evaluate prints the same numbers, confusion matrix included.
    assert evaluate_main(["--checkpoint", str(out / "last.pt")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["confusion"] == record["confusion"] and line["top5"] == record["top5"]


def test_predict_equals_evaluate(tmp_path: Path, capsys) -> None:
    from vit.predict import main as predict_main

    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    run = {**TINY, "data": "imagefolder", "data_dir": str(data), "epochs": 2, "batch_size": 8}
    run |= {"cache_dir": str(tmp_path / "cache"), "out_dir": str(out), "val_fraction": 0.25}
    assert main(flags(run)) == 0
    from vit.evaluate import main as evaluate_main

    preds = tmp_path / "val.jsonl"
    argv = ["--checkpoint", str(out / "last.pt"), "--predictions", str(preds)]
    assert evaluate_main(argv) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 6 and all(Path(r["path"]).is_file() for r in rows)
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(out / "last.pt"), *(r["path"] for r in rows)]) == 0
    predicted = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["path"] for p in predicted] == [r["path"] for r in rows]
    assert [p["classes"][0] for p in predicted] == [r["predicted"] for r in rows]
    assert [p["probs"][0] for p in predicted] == pytest.approx([r["prob"] for r in rows], abs=1e-6)
    csv_path = tmp_path / "val.csv"
    assert evaluate_main([*argv[:2], "--predictions", str(csv_path)]) == 0
    assert csv_path.read_text().splitlines()[0] == "index,path,label,predicted,prob"


def test_init_from_fine_tunes_onto_other_classes_and_size(tmp_path: Path, capsys) -> None:
    source = tmp_path / "synthetic"
    assert main(flags({**TINY, "out_dir": str(source)})) == 0
    data = _folder(tmp_path / "data")
    run = {**TINY, "data": "imagefolder", "data_dir": str(data), "img_size": 32, "batch_size": 8}
    run |= {"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25, "layer_decay": 0.75}
    cfg = make_config({**run, "out_dir": str(tmp_path / "t"), "init_from": str(source / "last.pt")})
    capsys.readouterr()
    trainer = Trainer(cfg)
    err = capsys.readouterr().err
    assert "resampled pos_embed from a 4x4 to a 8x8 patch grid" in err
    assert "head" in err and err.count("resampled pos_embed") == 1
    src = load_checkpoint(source / "last.pt")["model"]
    ours = trainer.model.state_dict()
    assert torch.equal(ours["blocks.1.attn.to_qkv.weight"], src["blocks.1.attn.to_qkv.weight"])
    assert ours["head.weight"].shape == (3, 32)
    # Layer-wise decay: deeper groups learn faster; the head at the full lr.
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert scales == pytest.approx([0.75**3, 0.75**2, 0.75, 1.0])
    assert main([*flags({**run, "out_dir": str(tmp_path / "ft")}), "--init-from", str(source)]) == 2
    assert f"no checkpoint file at {source / 'model.safetensors'}" in capsys.readouterr().err
    assert main([*flags({**run, "out_dir": str(tmp_path / "ft2")}),
                 "--init-from", str(source / "last.pt")]) == 0  # fmt: skip


def test_gradient_accumulation_takes_the_same_step(tmp_path: Path) -> None:
    weights = []
    for n in (1, 4):
        t = Trainer(make_config({**TINY, "grad_accum_steps": n, "out_dir": str(tmp_path / str(n))}))
        t.fit()
        weights.append(t.model.state_dict())
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5
    with pytest.raises(ValueError, match="grad_accum_steps 3 must divide the batch"):
        make_config({**TINY, "grad_accum_steps": 3})
