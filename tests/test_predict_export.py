"""Using a trained model: ``python -m vit.export`` (weights-only folder, model card, ONNX),
``vit.models.from_pretrained`` and ``python -m vit.predict``, on a tiny run trained on PNG files."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_preprocess,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from vit.errors import CheckpointError
from vit.export import export_checkpoint, train_command
from vit.export import main as export_main
from vit.models import from_pretrained
from vit.predict import main as predict_main
from vit.predict import predict

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 210)}


def _png(path: Path, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """A 20x30 image of one colour with noise (not square: the crop is exercised)."""
    noise = rng.integers(-30, 31, (20, 30, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 2-epoch run with EMA on an image folder of three colours, and its export folder."""
    from vit.train import main as train_main

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _png(root / split / name / f"{i}.png", colour, rng)
    out = root / "run"
    args = ["--data", "imagefolder", "--data-dir", str(root), "--img-size", "16"]
    args += ["--model-args", "{embed_dim: 16, depth: 1, num_heads: 2}", "--epochs", "2"]
    args += ["--batch-size", "8", "--threads", "1", "--rollout-every", "0", "--ema"]
    args += ["--lr", "0.01", "--device", "cpu"]
    args += ["--cache-dir", str(root / "cache"), "--out-dir", str(out)]
    assert train_main(args) == 0
    export = root / "export"
    assert export_main(["--checkpoint", str(out / "last.pt"), "--out-dir", str(export)]) == 0
    return {"root": root, "ckpt": out / "last.pt", "export": export, "val": root / "val"}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("module", ["vit.predict", "vit.export"])
def test_commands_answer_help(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m " + module)


def test_export_round_trip_gives_the_checkpoints_logits(run) -> None:
    ckpt = load_checkpoint(run["ckpt"])
    reference, _ = load_model(run["ckpt"])
    model = from_pretrained(run["export"])
    assert not model.training and next(model.parameters()).device.type == "cpu"
    # --ema was on: the export holds the EMA weights, which differ from the raw ones.
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["ema"].items())
    assert any(not torch.equal(state[k], v) for k, v in ckpt["model"].items())

    preprocess = checkpoint_preprocess(ckpt)
    files = sorted(run["val"].rglob("*.png"))
    x = preprocess.normalize(torch.stack([preprocess.load(f) for f in files]))
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() == 0.0

    config = json.loads((run["export"] / "config.json").read_text())
    assert config["format"] == "vit.export/1" and config["task"] == "classify"
    # timm's registry name: the folder is also timm's layout (see the timm tests below).
    assert config["architecture"] == "vitpkg_vit_tiny_patch4_32"
    assert ckpt["model_spec"]["name"] == "vit_tiny_patch4_32"
    assert config["model_args"] == ckpt["model_spec"]["kwargs"]
    assert config["class_names"] == ["blue", "green", "red"] and config["num_classes"] == 3
    assert config["img_size"] == 16 and config["weights"] == "ema"
    assert config["preprocess"] == preprocess.to_dict()
    assert config["metric"]["name"] == "top1"
    assert config["metric"]["value"] == ckpt["metrics"]["top1"]
    assert config["train_config"] == ckpt["config"]
    cfg = model.pretrained_cfg
    assert cfg["mean"] == preprocess.mean and cfg["std"] == preprocess.std
    assert cfg["input_size"] == (3, 16, 16) and cfg["label_names"] == config["class_names"]
    assert (cfg["num_classes"], cfg["crop_pct"], cfg["interpolation"]) == (3, 1.0, "bicubic")


def _images(run) -> torch.Tensor:
    preprocess = checkpoint_preprocess(load_checkpoint(run["ckpt"]))
    files = sorted(run["val"].rglob("*.png"))
    return preprocess.normalize(torch.stack([preprocess.load(f) for f in files]))


def test_timm_loads_the_export_with_the_same_logits(run) -> None:
    import timm

    import vit.timm_interop  # noqa: F401  (registers vitpkg_*)

    ours = from_pretrained(run["export"])
    theirs = timm.create_model(f"local-dir:{run['export']}", pretrained=True).eval()
    assert type(theirs) is type(ours)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    x = _images(run)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
    # timm's transforms and label names are the run's.
    config = json.loads((run["export"] / "config.json").read_text())
    data = timm.data.resolve_data_config(model=theirs)
    assert tuple(data["input_size"]) == (3, 16, 16) and data["crop_pct"] == 1.0
    assert tuple(data["mean"]) == tuple(config["preprocess"]["mean"])
    assert tuple(data["std"]) == tuple(config["preprocess"]["std"])
    assert theirs.pretrained_cfg["label_names"] == ["blue", "green", "red"]
    # A new head for fine-tuning, as with any timm folder: the rest of the weights load.
    tuned = timm.create_model(f"local-dir:{run['export']}", pretrained=True, num_classes=5)
    assert tuned.head.out_features == 5
    assert torch.equal(tuned.blocks[0].mlp.fc1.weight, ours.blocks[0].mlp.fc1.weight)


def test_exports_written_before_the_timm_layout_still_load(run, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((run["export"] / "model.safetensors").read_bytes())
    config = json.loads((run["export"] / "config.json").read_text())
    del config["pretrained_cfg"]
    config["architecture"] = "vit_tiny_patch4_32"  # our own name, as vit 0.1 wrote it
    (old / "config.json").write_text(json.dumps(config))
    x = _images(run)
    with torch.no_grad():
        assert torch.equal(from_pretrained(old)(x), from_pretrained(run["export"])(x))


def test_timm_checkpoint_loaders_read_our_checkpoints(run) -> None:
    import timm
    from timm.models import load_checkpoint as timm_load_checkpoint
    from timm.models import resume_checkpoint

    ckpt = load_checkpoint(run["ckpt"])
    kwargs = dict(img_size=16, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    model = timm.create_model("vitpkg_vit_tiny_patch4_32", **kwargs)
    # use_ema=True (timm's default) loads the EMA weights, use_ema=False the raw ones.
    timm_load_checkpoint(model, str(run["ckpt"]), use_ema=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    timm_load_checkpoint(model, str(run["ckpt"]), use_ema=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    # resume_checkpoint: the raw weights, the optimizer state and the next epoch to run.
    model = timm.create_model("vitpkg_vit_tiny_patch4_32", **kwargs)
    # The run's optimizer, built as the run built it (its parameter groups are timm's).
    from vit.engine.config import RunConfig
    from vit.engine.optim import build_optimizer

    optimizer = build_optimizer(model, RunConfig(**ckpt["config"]))
    epoch = resume_checkpoint(model, str(run["ckpt"]), optimizer=optimizer, log_info=False)
    assert epoch == ckpt["progress"]["epoch"] == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    assert optimizer.state_dict()["state"].keys() == ckpt["optimizer"]["state"].keys()
    # pretrained=True from the checkpoint file: timm's reader picks the EMA weights too.
    model = timm.create_model(
        "vitpkg_vit_tiny_patch4_32",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(run["ckpt"]), num_classes=3),
        **kwargs,
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    # The aliases cost no space: torch.save stores each tensor once.
    assert ckpt["state_dict_ema"] is ckpt["ema"] or all(
        ckpt["state_dict_ema"][k].data_ptr() == v.data_ptr() for k, v in ckpt["ema"].items()
    )


def test_model_card_says_what_and_how(run) -> None:
    card = (run["export"] / "README.md").read_text()
    ckpt = load_checkpoint(run["ckpt"])
    assert "EMA weights" in card and "from vit.models import from_pretrained" in card
    assert f"top1 = {ckpt['metrics']['top1']:.4f}" in card
    assert "`--data imagefolder`" in card and "blue, green, red" in card
    # The command as it was typed, then every setting.
    typed, command = (line for line in card.splitlines() if line.startswith("python train.py"))
    assert typed == ckpt["command"] and typed.startswith("python train.py --data imagefolder")
    # Outside the typed command, local absolute paths are shown by their last component.
    paths = {k: Path(v).name for k, v in ckpt["config"].items() if k.endswith("_dir") and v}
    assert command == train_command({**ckpt["config"], **paths})
    assert str(run["root"]) not in card.replace(typed, "")
    # The card's command sets exactly the run's configuration (the paths aside).
    from vit.engine.config import parse_args

    rebuilt = parse_args(shlex.split(command)[2:])
    assert {**vars(rebuilt), "resume": "", **paths} == {**ckpt["config"], "resume": "", **paths}
    assert (
        "--ema" in command and "--model-args '{embed_dim: 16, depth: 1, num_heads: 2}'" in command
    )


def test_onnx_export_matches_torch(run, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    assert export_main(["--checkpoint", str(run["ckpt"]), "--out-dir", str(out), "--onnx"]) == 0
    model = from_pretrained(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            assert np.abs(logits - model(x).numpy()).max() < 1e-4


def test_export_refuses_a_folder_of_other_files(run, tmp_path, capsys) -> None:
    args = ["--checkpoint", str(run["ckpt"]), "--out-dir", str(tmp_path)]
    (tmp_path / "notes.txt").write_text("mine")
    assert export_main(args) == 2
    assert "notes.txt" in _error_line(capsys)
    (tmp_path / "notes.txt").unlink()
    assert export_main(args) == 0 and export_main(args) == 0  # a previous export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_predict_on_checkpoint_and_export_agree_with_the_model(run) -> None:
    rows = list(predict(run["ckpt"], [run["val"]], topk=2, batch_size=4, device="cpu"))
    assert rows == list(predict(run["export"], [run["val"]], topk=2, batch_size=7, device="cpu"))
    files = sorted(run["val"].rglob("*.png"))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    model, ckpt = load_model(run["ckpt"])
    preprocess = checkpoint_preprocess(ckpt)
    classes = ckpt["task_state"]["classes"]
    with torch.no_grad():
        for f, row in zip(files, rows, strict=True):
            probs = model(preprocess.normalize(preprocess.load(f))[None]).softmax(-1)[0]
            assert row["classes"][0] == classes[probs.argmax().item()]
            assert row["probs"][0] == pytest.approx(probs.max().item(), abs=1e-6)
            assert len(row["classes"]) == 2 and row["probs"][0] >= row["probs"][1]
    # --topk above the number of classes is clamped to it.
    (row,) = predict(run["ckpt"], [files[0]], topk=10, device="cpu")
    assert sorted(row["classes"]) == classes and sum(row["probs"]) == pytest.approx(1, abs=1e-5)


def test_cli_outputs_parse_back_to_the_same_rows(run, tmp_path, capsys) -> None:
    rows = list(predict(run["ckpt"], [run["val"]], topk=3, device="cpu"))
    base = ["--checkpoint", str(run["ckpt"]), str(run["val"]), "--topk", "3", "--device", "cpu"]
    assert predict_main(base) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    assert predict_main([*base, "--predictions", str(tmp_path / "p.jsonl")]) == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert predict_main([*base, "--predictions", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    parsed = [
        {"path": r[0], "classes": r[1::2], "probs": [float(p) for p in r[2::2]]} for r in table[1:]
    ]
    assert parsed == rows
    assert capsys.readouterr().out == ""  # with --predictions nothing goes to stdout


def test_unreadable_files_are_reported_and_skipped(run, tmp_path, capsys) -> None:
    good = sorted(run["val"].rglob("*.png"))[:2]
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(good[0].read_bytes())
    # A Latin-1 file name that is not UTF-8: printed with a \xNN escape.
    latin1 = os.fsdecode(bytes(folder / "sub") + b"/caf\xe9.png")
    Path(latin1).write_bytes(good[1].read_bytes())
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:60])  # truncated
    (folder / ".hidden.png").write_text("skipped: hidden")
    out = tmp_path / "p.jsonl"
    assert (
        predict_main(["--checkpoint", str(run["ckpt"]), str(folder), "--predictions", str(out)])
        == 0
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "2 of 4 images could not be read" and "Traceback" not in "".join(err)
    assert len(err) == 3 and any("notes.png" in e for e in err) and any("cut.png" in e for e in err)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "caf\\xe9.png"]

    bad = [str(folder / "notes.png"), str(folder / "cut.png")]
    args = ["--checkpoint", str(run["ckpt"]), *bad, "--predictions", str(tmp_path / "x.csv")]
    assert predict_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: none of the 2 images could be read" and len(err) == 3
    assert not (tmp_path / "x.csv").exists()


def _caption_checkpoint(folder: Path, name: str = "caption_mini_patch8_32") -> Path:
    """A caption checkpoint made directly (no training): a captioner with random weights."""
    from vit.captions import Tokenizer, caption_preprocess
    from vit.models import create_model

    tok = Tokenizer.build(["a red square", "a blue circle", "two green squares"])
    spec = {"name": name, "kwargs": {"vocab_size": len(tok), "img_size": 16}}
    torch.manual_seed(0)
    model = create_model(spec["name"], **spec["kwargs"])
    path = folder / f"{name}.pt"
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "task": "caption",
            "task_state": {"vocab": tok.itos, "preprocess": caption_preprocess(16).to_dict()},
            "config": {"img_size": 16, "task": "caption", "data": "shapes"},
            "model_spec": spec,
            "model": model.state_dict(),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def caption_ckpt(tmp_path_factory) -> Path:
    return _caption_checkpoint(tmp_path_factory.mktemp("caption"))


@pytest.mark.parametrize("name", ["caption_mini_patch8_32", "caption_lstm_mini_patch8_32"])
def test_captioner_export_round_trip(name, tmp_path, capsys) -> None:
    caption_ckpt = _caption_checkpoint(tmp_path, name)
    reference, _ = load_model(caption_ckpt)
    export_checkpoint(caption_ckpt, tmp_path / "cap")
    model = from_pretrained(tmp_path / "cap")
    if name == "caption_mini_patch8_32":
        assert model.head.weight is model.token_embed.weight  # still tied after loading
    config = json.loads((tmp_path / "cap" / "config.json").read_text())
    assert config["vocab"] == load_checkpoint(caption_ckpt)["task_state"]["vocab"]
    assert "class_names" not in config and config["weights"] == "model"
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, len(config["vocab"]), (3, 5))
    with torch.no_grad():
        assert torch.equal(model(x, tokens), reference(x, tokens))
    for beam in (1, 3):
        assert torch.equal(model.generate(x, beam_size=beam), reference.generate(x, beam_size=beam))
    onnx = ["--checkpoint", str(caption_ckpt), "--out-dir", str(tmp_path / "o"), "--onnx"]
    assert export_main(onnx) == 2
    assert "--onnx exports classifiers only" in _error_line(capsys)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing checkpoint", "does not exist"),
        ("caption checkpoint", "not a classifier; to caption images use python -m vit.caption"),
        ("caption export", "not a classifier; to caption images use python -m vit.caption"),
        ("export without weights", "holds no weights"),
        ("topk 0", "--topk must be at least 1"),
        ("missing image", "no such file or folder"),
        ("output format", "--predictions must end in .csv or .jsonl"),
        ("ema of a raw export", "holds the raw training weights only; use --weights auto"),
    ],
)
def test_bad_predict_input_is_one_line_and_exit_2(
    case, message, run, caption_ckpt, tmp_path, capsys
) -> None:
    ckpt, image = str(run["ckpt"]), str(next(run["val"].rglob("*.png")))
    args = {
        "missing checkpoint": ["--checkpoint", str(tmp_path / "none.pt"), image],
        "caption checkpoint": ["--checkpoint", str(caption_ckpt), image],
        "topk 0": ["--checkpoint", ckpt, image, "--topk", "0"],
        "missing image": ["--checkpoint", ckpt, image, str(tmp_path / "gone.png")],
        "output format": ["--checkpoint", ckpt, image, "--predictions", str(tmp_path / "p.txt")],
    }.get(case)
    if case == "caption export":
        export_checkpoint(caption_ckpt, tmp_path / "cap")
        args = ["--checkpoint", str(tmp_path / "cap"), image]
    elif case == "export without weights":
        export_checkpoint(run["ckpt"], tmp_path / "ex")
        (tmp_path / "ex" / "model.safetensors").unlink()
        args = ["--checkpoint", str(tmp_path / "ex"), image]
    elif case == "ema of a raw export":
        export_checkpoint(run["ckpt"], tmp_path / "raw", weights="model")
        args = ["--checkpoint", str(tmp_path / "raw"), image, "--weights", "ema"]
    assert predict_main(args) == 2
    assert message in _error_line(capsys)


def _bad_config(folder: Path, kind: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if kind == "missing":
        path.unlink()
    elif kind == "not JSON":
        path.write_text("{format: nope")
    elif kind == "wrong format":
        path.write_text(json.dumps({**config, "format": "transformers"}))
    elif kind == "no class names":
        path.write_text(json.dumps({k: v for k, v in config.items() if k != "class_names"}))
    elif kind == "huge model":  # a crafted config may not make us allocate gigabytes
        big = {**config["model_args"], "embed_dim": 4096, "depth": 48, "num_heads": 16}
        path.write_text(json.dumps({**config, "model_args": big}))
    elif kind == "other architecture":
        path.write_text(
            json.dumps({**config, "model_args": {**config["model_args"], "mlp_ratio": 2.0}})
        )
    elif kind == "corrupt weights":
        (folder / "model.safetensors").write_text("not safetensors")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"holds no config\.json; write one with python -m vit\.export"),
        ("not JSON", r"config\.json is not valid JSON"),
        ("wrong format", r"is not a vit export config \(no format 'vit\.export/1'\)"),
        ("no class names", r"'class_names' is not a list of names"),
        ("huge model", r"cannot be built with the [\d,]+ weights stored beside it \(.*has [\d,]+"),
        ("other architecture", r"do not fit the model: other shapes: blocks.0.mlp.fc1.weight"),
        ("corrupt weights", r"not a valid safetensors file"),
    ],
)
def test_from_pretrained_refuses_bad_folders(run, tmp_path, kind, message) -> None:
    folder = tmp_path / "ex"
    export_checkpoint(run["ckpt"], folder)
    _bad_config(folder, kind)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_from_pretrained_refuses_missing_paths_and_files(run, tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; write one with"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"is a file, not an export folder"):
        from_pretrained(run["ckpt"])


def test_checkpoint_spec_larger_than_its_weights_is_refused(tmp_path) -> None:
    """The same bound as for export folders: a crafted model_spec cannot allocate gigabytes."""
    from vit.models import create_model

    spec = {"name": "vit_tiny_patch4_32", "kwargs": {"img_size": 16, "embed_dim": 16, "depth": 1}}
    small = create_model(spec["name"], num_classes=3, num_heads=2, **spec["kwargs"])
    huge = {"name": spec["name"], "kwargs": {"embed_dim": 4096, "depth": 48, "num_heads": 16}}
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "task": "classify",
            "task_state": {"classes": ["a", "b", "c"]},
            "config": {"img_size": 16},
            "model_spec": huge,
            "model": small.state_dict(),
        },
        tmp_path / "crafted.pt",
    )
    with pytest.raises(CheckpointError, match=r"crafted\.pt is malformed: its model_spec"):
        load_model(tmp_path / "crafted.pt")


def test_predict_output_is_a_deprecated_alias_of_predictions(run, tmp_path, capsys) -> None:
    base = ["--checkpoint", str(run["ckpt"]), str(run["val"])]
    assert predict_main([*base, "--predictions", str(tmp_path / "new.jsonl")]) == 0
    assert capsys.readouterr().err == ""
    assert predict_main([*base, "--output", str(tmp_path / "old.jsonl")]) == 0
    assert "--output is deprecated; use --predictions" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()


def test_evaluate_a_folder_with_val_but_no_train(run, tmp_path, capsys) -> None:
    """The class list is the checkpoint's: a folder of held-out images alone is enough."""
    from vit.evaluate import main as evaluate_main

    only = tmp_path / "held-out"
    shutil.copytree(run["val"], only / "val")
    args = ["--checkpoint", str(run["ckpt"]), "--split", "val", "--predictions"]
    assert evaluate_main([*args, str(tmp_path / "a.jsonl"), "--data-dir", str(only)]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluate_main([*args, str(tmp_path / "b.jsonl"), "--data-dir", str(run["root"])]) == 0
    beside_train = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone == beside_train and alone["n"] == 9
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[0]["path"].startswith(str(only / "val"))


def test_export_files_are_readable_like_their_siblings(run) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in run["export"].iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors was 0600, the others 0644
