"""One image preprocessing for every path: training data, vit.evaluate, the rollout CLI and the
caption CLI decode and crop a file the same way, as the checkpoint records."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_preprocess,
    load_model,
    save_checkpoint,
)
from vit.preprocess import Preprocess, decode_image

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def _banner(path: Path, centre: str, sides: str, rng: np.random.Generator) -> None:
    """A 96x32 image: the class colour in the centre square, the other class's at the sides —
    what a squashed image mostly shows is the wrong class."""
    arr = np.empty((32, 96, 3), dtype=np.uint8)
    arr[:] = COLOURS[sides]
    arr[:, 32:64] = COLOURS[centre]
    noise = rng.integers(-20, 21, arr.shape)
    Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def banner_run(tmp_path_factory):
    from vit.train import main as train_main

    root = tmp_path_factory.mktemp("banners")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        for centre, sides in (("red", "blue"), ("blue", "red")):
            (root / split / centre).mkdir(parents=True)
            for i in range(n):
                _banner(root / split / centre / f"{i}.png", centre, sides, rng)
    out = root / "run"
    args = ["--data", "imagefolder", "--data-dir", str(root), "--img-size", "16"]
    args += ["--model-args", "{embed_dim: 16, depth: 1, num_heads: 2, patch_size: 8}"]
    args += ["--epochs", "4", "--batch-size", "8", "--lr", "0.01", "--rollout-every", "0"]
    args += ["--cache-dir", str(root / "cache"), "--out-dir", str(out), "--threads", "1"]
    assert train_main(args) == 0
    return root, out / "last.pt"


def test_rollout_cli_predicts_what_evaluate_scores(banner_run, tmp_path, capsys) -> None:
    from vit.evaluate import evaluate_checkpoint
    from vit.rollout.__main__ import main as rollout_main

    root, ckpt = banner_run
    assert evaluate_checkpoint(str(ckpt), split="val", device="cpu")["top1"] == 1.0
    files = sorted((root / "val").rglob("*.png"))
    capsys.readouterr()
    assert rollout_main(["--checkpoint", str(ckpt), "--images", *map(str, files),
                         "--out-dir", str(tmp_path), "--device", "cpu"]) == 0  # fmt: skip
    predicted = re.findall(r"\(predicted (\w+), p=", capsys.readouterr().out)
    assert predicted == [f.parent.name for f in files]


def test_inference_pixels_equal_the_training_pixels(banner_run) -> None:
    """The checkpoint's Preprocess turns each file into exactly the pixels training used."""
    from vit.engine.classification import ClassificationTask
    from vit.engine.config import make_config

    root, ckpt_path = banner_run
    model, ckpt = load_model(ckpt_path)
    preprocess = checkpoint_preprocess(ckpt)
    assert preprocess.resize == "center_crop" and preprocess.img_size == 16
    task = ClassificationTask(make_config(ckpt["config"]), ckpt["task_state"])
    val = task.build_dataset("val")
    files = sorted((root / "val").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    for i, f in enumerate(files):
        assert torch.equal(val[i][0], preprocess.load(f)), f
    # A squashed image would show mostly the other class: the crop is what makes it right.
    squash = Preprocess(16, preprocess.mean, preprocess.std, resize="squash")
    x = squash.normalize(torch.stack([squash.load(f) for f in files]))
    with torch.no_grad():
        wrong = model(x).argmax(-1).tolist()
    labels = [val.classes.index(f.parent.name) for f in files]
    assert sum(w != y for w, y in zip(wrong, labels, strict=True)) > len(files) // 2


def test_caption_cli_and_dataset_share_the_decoder(tmp_path, monkeypatch) -> None:
    from vit.caption import caption_images
    from vit.captions import CaptionData, CaptionDataset, Tokenizer, caption_preprocess
    from vit.models import create_model

    tok = Tokenizer.build(["a red square", "a blue circle"])
    spec = {"name": "caption_mini_patch8_32", "kwargs": {"vocab_size": len(tok), "img_size": 16}}
    model = create_model(spec["name"], **spec["kwargs"])
    preprocess = caption_preprocess(16)
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "task": "caption",
            "task_state": {"vocab": tok.itos, "preprocess": preprocess.to_dict()},
            "config": {"img_size": 16},
            "model_spec": spec,
            "model": model.state_dict(),
        },
        tmp_path / "cap.pt",
    )
    path = tmp_path / "wide.png"
    _banner(path, "red", "blue", np.random.default_rng(1))

    decoded: list[str] = []
    real = decode_image
    monkeypatch.setattr("vit.preprocess.decode_image", lambda p, **kw: decoded.append(p) or real(p))
    seen: list[torch.Tensor] = []
    generate = type(model).generate
    monkeypatch.setattr(
        type(model),
        "generate",
        lambda self, x, *a, **k: seen.append(x) or generate(self, x, *a, **k),
    )
    assert len(caption_images(tmp_path / "cap.pt", [path], device="cpu")) == 1
    assert decoded == [path]
    dataset = CaptionDataset(CaptionData([path], [["a red square"]]), tok, max_len=8, img_size=16)
    assert torch.equal(dataset.image(0), preprocess.load(path))
    assert torch.equal(seen[0], preprocess.normalize(dataset.image(0))[None])
