"""Nothing lost, nothing silently wrong: the doors for using a model (predict, export,
from_pretrained, fine-tuning, evaluate's per-image output, resume, captioning) under hostile input
and faults. Cases about files, signals and disks run real processes; a full disk is a real small
tmpfs where a private mount namespace can be made (``unshare``), and otherwise, and also, a write
made to fail with ``ENOSPC`` in-process (said in each test)."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, flags
from PIL import Image

from vit.engine.checkpoint import load_checkpoint, save_checkpoint
from vit.engine.config import make_config
from vit.errors import CheckpointError, ConfigError, DataError, OutputError
from vit.export import export_checkpoint
from vit.fileio import atomic_write, check_output, csv_cell
from vit.models import from_pretrained
from vit.models.pretrained import read_export
from vit.preprocess import Preprocess
from vit.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")


def _folder(root: Path, classes=CLASSES, n: int = 4, seed: int = 0) -> Path:
    """An image folder whose images of a class depend on the class name only (so "cat" is the
    same images in every folder)."""
    for c in classes:
        rng = np.random.default_rng(sum(map(ord, c)) + seed)
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"{i}.png")
    return root


def _run_cli(module: str, *args: str, env: dict | None = None, timeout: float = 120):
    """``python -m module args`` in a fresh process from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )


def _one_line(stderr: str, fragment: str) -> None:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert lines and "Traceback" not in stderr, stderr
    assert fragment in lines[-1], stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny classifier trained on an image folder of cat, dog, fox; its checkpoint and export."""
    root = tmp_path_factory.mktemp("trained")
    data = _folder(root / "data")
    out = root / "run"
    run = {**TINY, "data": "imagefolder", "data_dir": str(data), "batch_size": 4}
    run |= {"val_fraction": 0.25, "out_dir": str(out), "cache_dir": str(root / "cache")}
    assert train_main(flags(run)) == 0
    export = root / "export"
    export_checkpoint(out / "last.pt", export)
    return {"root": root, "data": data, "ckpt": out / "last.pt", "export": export, "run": run}


# ---------------------------------------------------------------------------------------------
# Fine-tuning onto other class names maps the head by name
# ---------------------------------------------------------------------------------------------
def _finetune_trainer(trained: dict, tmp_path: Path, classes, source: Path):
    from vit.engine.trainer import Trainer

    data = _folder(tmp_path / "data", classes)
    run = {**trained["run"], "data_dir": str(data), "out_dir": str(tmp_path / "ft")}
    run |= {"cache_dir": str(tmp_path / "cache"), "init_from": str(source)}
    return Trainer(make_config(run))


@pytest.mark.parametrize("source", ["ckpt", "export"])
def test_init_from_other_class_names_maps_head_rows_by_name(
    trained: dict, tmp_path: Path, capsys, source: str
) -> None:
    from vit.engine.checkpoint import load_model

    base, _ = load_model(trained["ckpt"])
    # The case: same count, other names (bird is new, cat and dog move); and ours: fewer
    # classes (cat dropped, dog and fox move up).
    for classes in (("bird", "cat", "dog"), ("dog", "fox")):
        sub = tmp_path / "-".join(classes)
        trainer = _finetune_trainer(trained, sub, classes, trained[source])
        err = capsys.readouterr().err
        assert trainer.task.state["classes"] == list(classes)
        new = trainer.model.eval()
        x = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            old_logits, new_logits = base(x), new(x)
        for j, name in enumerate(classes):
            if name in CLASSES:  # a shared class answers exactly as it did
                i = CLASSES.index(name)
                torch.testing.assert_close(new_logits[:, j], old_logits[:, i])
                torch.testing.assert_close(new.head.weight[j], base.head.weight[i])
        assert "head rows mapped by class name" in err and "every weight loaded" not in err
        if classes[0] == "bird":
            assert "moved cat (0 -> 1), dog (1 -> 2)" in err and "initialised bird" in err
            assert "dropped fox" in err
        else:
            assert "moved dog (1 -> 0), fox (2 -> 1)" in err and "dropped cat" in err


def test_head_of_unknown_class_names_keeps_the_positional_rule(trained: dict) -> None:
    """timm's weights (and any plain state dict) record no class names: a head of the same shape
    loads by position, as before."""
    from vit.engine.checkpoint import load_model
    from vit.models import create_model, load_pretrained

    base, _ = load_model(trained["ckpt"])
    model = create_model(
        "vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )
    report = load_pretrained(model, base.state_dict(), class_names=["x", "y", "z"])
    assert report.head_rows == {}
    torch.testing.assert_close(model.head.weight, base.head.weight)


# ---------------------------------------------------------------------------------------------
# Numbers read from files are checked where they are read
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("std", [float("nan"), 0.5, 0.5], "std must be 3 non-negative finite numbers"),
        ("mean", [float("inf"), 0.5, 0.5], "mean must be 3 finite numbers"),
        ("mean", [0.5, 0.5], "mean must be 3 finite numbers"),
        ("std", [-1.0, 0.5, 0.5], "std must be 3 non-negative finite numbers"),
        ("std", ["0.5", 0.5, 0.5], "std must be 3"),
        ("img_size", 0, "img_size must be an integer in [1, 8192]"),
        ("img_size", -16, "img_size must be an integer in [1, 8192]"),
        ("img_size", 10**9, "img_size must be an integer in [1, 8192]"),
        ("img_size", True, "img_size must be an integer"),
        ("resize", "bogus", "resize must be one of center_crop, squash"),
        ("interpolation", "lanczos", "interpolation must be one of bicubic, bilinear"),
    ],
)
def test_preprocess_records_are_checked_entry_by_entry(entry, value, message) -> None:
    record = Preprocess(16).to_dict() | {entry: value}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Preprocess.from_dict(record)


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))  # NaN/Infinity written as JSON's non-standard tokens


def _copy_export(trained: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "ex"
    shutil.copytree(trained["export"], folder)
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["preprocess"].update(std=[float("nan")] * 3), "holds NaN, not a number"),
        (lambda c: c["preprocess"].update(mean=[float("inf")] * 3), "Infinity, not a number"),
        (lambda c: c["preprocess"].update(mean=[0.5, 0.5]), "mean must be 3 finite numbers"),
        (lambda c: c.pop("weights"), "'weights' is None, not 'ema' or 'model'"),
        (lambda c: c.update(weights="best"), "'weights' is 'best', not 'ema' or 'model'"),
        (lambda c: c["preprocess"].update(img_size=0), "img_size must be an integer"),
        (lambda c: c.update(img_size=-3), "'img_size' is -3, not a positive integer"),
        (lambda c: c.update(img_size=32), "'img_size' 32 differs from the preprocess img_size"),
        (lambda c: c["preprocess"].update(interpolation="lanczos"), "interpolation must be"),
        (lambda c: c["preprocess"].update(resize="bogus"), "resize must be one of"),
        (lambda c: c["preprocess"].update(extra=1), "unknown entries ['extra']"),
        (lambda c: c.update(task="detect"), "'task' is 'detect'"),
        (lambda c: c.update(class_names=["a", "a", "b"]), "'class_names' repeats a name"),
        (lambda c: c["model_args"].update(depth=3_000_000), "depth is 3,000,000, more than"),
        (lambda c: c["model_args"].update(img_size=10**6), "img_size is 1,000,000, more than"),
    ],
)
def test_export_config_is_validated_against_one_schema(trained, tmp_path, edit, message) -> None:
    folder = _copy_export(trained, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match="malformed") as info:
        read_export(folder)
    assert message in str(info.value)


def test_img_size_unlike_the_model_and_deep_nesting(trained, tmp_path) -> None:
    folder = _copy_export(trained, tmp_path)

    def both(c):  # consistent between config and preprocess, but not the model's 16
        c["img_size"] = 32
        c["preprocess"]["img_size"] = 32
        c["model_args"].pop("img_size", None)

    _edit_config(folder, both)
    with pytest.raises(CheckpointError, match="img_size"):
        read_export(folder)
    deep = _copy_export(trained, tmp_path / "deep")
    text = (deep / "config.json").read_text()
    (deep / "config.json").write_text(text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_export(deep)


def test_nan_and_non_float_weights_are_refused_naming_the_tensor(trained, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    for what, change, message in (
        ("nan", lambda t: t.fill_(float("nan")), "NaN or infinite values in 'head.bias'"),
        ("int8", lambda t: t.to(torch.int8), "not of the model's number type: head.bias (int8)"),
        ("bool", lambda t: t.bool(), "head.bias (bool)"),
        ("extra", None, "not in the model 'extra.weight'"),
    ):
        folder = _copy_export(trained, tmp_path / what)
        state = load_file(folder / "model.safetensors")
        if change is None:
            state["extra.weight"] = torch.zeros(2)
        else:
            state["head.bias"] = change(state["head.bias"].clone())
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as info:
            from_pretrained(folder)
        assert message in str(info.value), str(info.value)
        # The command says so in one line, exit 2, and prints no NaN.
        img = trained["data"] / "train" / "cat" / "0.png"
        result = _run_cli("vit.predict", "--checkpoint", str(folder), str(img))
        assert result.returncode == 2 and not result.stdout
        _one_line(result.stderr, message)


def test_nan_weights_in_a_training_checkpoint_are_refused(trained, tmp_path, capsys) -> None:
    from vit.predict import main as predict_main

    ckpt = load_checkpoint(trained["ckpt"])
    for key in ("model", "ema"):
        if ckpt.get(key):
            ckpt[key]["head.weight"] = torch.full_like(ckpt[key]["head.weight"], float("inf"))
    bad = tmp_path / "bad.pt"
    save_checkpoint(ckpt, bad)
    img = trained["data"] / "train" / "cat" / "0.png"
    assert predict_main(["--checkpoint", str(bad), str(img)]) == 2
    captured = capsys.readouterr()
    assert not captured.out and "NaN or infinite values in 'head.weight'" in captured.err


def test_build_bounds_buffers_depth_and_image_size() -> None:
    from vit.models import build

    spec = {"name": "vit_tiny_patch4_32", "kwargs": {"embed_dim": 32, "num_heads": 2}}
    cases = [
        ({"pos_embed": "sincos2d", "img_size": 8000, "patch_size": 2, "depth": 1}, "buffer"),
        ({"tokenizer": "conv", "pos_embed": "sincos2d", "img_size": 8192, "depth": 1}, "buffer"),
        ({"depth": 3_000_000}, "depth is 3,000,000, more than 1,000"),
        ({"img_size": 100_000}, "img_size is 100,000, more than 8,192"),
    ]
    for extra, message in cases:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=message):
            build({**spec, "kwargs": spec["kwargs"] | extra}, max_params=10**6)
        assert time.monotonic() - t0 < 20  # refused before the work (was a minute and a GB)


# ---------------------------------------------------------------------------------------------
# Outputs: atomic, never through links, never over inputs, checked before the work
# ---------------------------------------------------------------------------------------------
def test_predict_output_may_not_name_an_input_or_the_checkpoint(trained, tmp_path) -> None:
    ckpt = tmp_path / "model.jsonl"  # a checkpoint under an output's name
    shutil.copy(trained["ckpt"], ckpt)
    before = ckpt.read_bytes()
    img = tmp_path / "img.csv"  # an image named explicitly, under an output's name
    shutil.copy(trained["data"] / "train" / "cat" / "0.png", img)
    for out, inputs in ((ckpt, [str(img)]), (img, [str(img)])):
        argv = ["--checkpoint", str(ckpt), *inputs, "--predictions", str(out)]
        result = _run_cli("vit.predict", *argv)
        assert result.returncode == 2, result.stderr
        _one_line(result.stderr, "is one of the inputs")
    assert ckpt.read_bytes() == before
    # A file inside an export folder given as the checkpoint is an input too.
    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    (export / "notes.csv").write_text("kept\n")
    with pytest.raises(ConfigError, match="is one of the inputs"):
        check_output(export / "notes.csv", "--output", inputs=[export, *export.iterdir()])


def test_predict_output_paths_are_checked_before_the_work(trained, tmp_path) -> None:
    img = str(trained["data"] / "train" / "cat" / "0.png")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    cases = [
        (folder, "is a folder"),
        (tmp_path / "missing" / "p.csv", "does not exist"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((readonly / "p.csv", "is not writable"))
    for out, message in cases:
        result = _run_cli("vit.predict", "--checkpoint", str(trained["ckpt"]), img, "--predictions",
                          str(out))  # fmt: skip
        assert result.returncode == 2
        _one_line(result.stderr, message)
    readonly.chmod(0o755)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_evaluate_predictions_path_is_checked_before_evaluating(trained, tmp_path, capsys) -> None:
    from vit.evaluate import main as evaluate_main

    calls = []
    import vit.evaluate as ev

    real = ev.evaluate_checkpoint
    ev.evaluate_checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for out, message in ((tmp_path / "nope" / "p.csv", "does not exist"),
                             (_mkdir(tmp_path / "d.csv"), "is a folder"),
                             (trained["ckpt"].with_suffix(".csv"), None)):  # fmt: skip
            if message is None:  # the checkpoint under an output's name
                shutil.copy(trained["ckpt"], out)
                argv = ["--checkpoint", str(out), "--predictions", str(out)]
                message = "is one of the inputs"
            else:
                argv = ["--checkpoint", str(trained["ckpt"]), "--predictions", str(out)]
            assert evaluate_main(argv) == 2
            assert message in capsys.readouterr().err
        assert not calls  # refused before any evaluation ran
    finally:
        ev.evaluate_checkpoint = real


def test_writes_never_follow_planted_links(trained, tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    # predict's old temporary name, and every name a writer might pick, point at the victim.
    for name in (".preds.csv.tmp", "README.md", "config.json", "model.safetensors"):
        (out / name).symlink_to(victim)
    img = str(trained["data"] / "train" / "cat" / "0.png")
    result = _run_cli("vit.predict", "--checkpoint", str(trained["ckpt"]), img, "--predictions",
                      str(out / "preds.csv"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious\n"
    # An export folder of links (a Hub snapshot): replaced by a real folder, links untouched.
    snap = tmp_path / "snap"
    shutil.copytree(trained["export"], snap)
    for name in ("README.md", "config.json", "model.safetensors"):
        target = tmp_path / f"blob-{name}"
        shutil.move(snap / name, target)
        (snap / name).symlink_to(target)
    blob = (tmp_path / "blob-README.md").read_text()
    result = _run_cli("vit.export", "--checkpoint", str(trained["ckpt"]), "--out-dir", str(snap))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "blob-README.md").read_text() == blob and victim.read_text() == "precious\n"
    assert not any(p.is_symlink() for p in snap.iterdir())
    # Checkpoints too: a link planted at the old temporary name is never written through.
    (tmp_path / ".x.pt.tmp").symlink_to(victim)
    save_checkpoint({"a": torch.zeros(1)}, tmp_path / "x.pt")
    assert victim.read_text() == "precious\n"


def test_atomic_write_leaves_the_old_file_on_a_full_disk(tmp_path, monkeypatch) -> None:
    """In-process: the write raises OSError(ENOSPC)."""
    path = tmp_path / "f.csv"
    path.write_text("old\n")

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="the disk is full"), atomic_write(path) as f:
        Full(f).write("new")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]  # no temporary file left


_ENOSPC_PREDICT = """
import errno, os, sys
real = os.fsync
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full   # every atomic write fails at its sync, as a full disk does
from vit.predict import main
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_mid_write_exits_1_and_writes_nothing(trained, tmp_path) -> None:
    """A real process whose writes fail with ENOSPC (os.fsync patched in the subprocess)."""
    out = tmp_path / "p.csv"
    out.write_text("previous\n")
    img = str(trained["data"] / "train" / "cat" / "0.png")
    argv = ["--checkpoint", str(trained["ckpt"]), img, "--predictions", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", _ENOSPC_PREDICT, *argv], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    _one_line(result.stderr, "the disk is full")
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "p.csv"
    ]


def _unshare_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare -rm (user mount namespaces)")
def test_export_onto_a_full_tmpfs(trained, tmp_path) -> None:
    """A real full disk: a 64 KiB tmpfs, mounted in a private mount namespace for one process."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && "
        f"mkdir {disk}/ex && echo '{{}}' > {disk}/ex/marker.json; "
        f"{sys.executable} -m vit.export --checkpoint {trained['ckpt']} --out-dir {disk}/new; "
        f"echo rc=$?; ls -A {disk}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "rc=1" in result.stdout, result.stdout + result.stderr
    _one_line(result.stderr, "the disk is full")
    assert result.stdout.split("rc=1")[1].split() == ["ex"]  # no new folder, no leftovers


def test_export_full_disk_in_process_leaves_the_previous_export(trained, tmp_path, monkeypatch):
    """In-process: safetensors' write fails as on a full disk (SafetensorError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    out = _copy_export(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match="the disk is full"):
        export_checkpoint(trained["ckpt"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


_KILL_DURING_ONNX = """
import os, signal, sys, time
import vit.export as ex
def stuck(model, path, img_size):
    path.write_bytes(b"partial")
    print("onnx", flush=True)
    time.sleep(60)
ex.export_onnx = stuck
ex.main(sys.argv[1:])
"""


def test_a_kill_during_reexport_leaves_the_previous_export_whole(trained, tmp_path) -> None:
    """A real process is killed (SIGKILL) while writing --onnx over a previous export: the folder
    still holds the previous export, complete and of one checkpoint."""
    out = _copy_export(trained, tmp_path)
    (out / "model.onnx").write_bytes(b"previous graph")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other.pt"  # another checkpoint: new weights
    ckpt = load_checkpoint(trained["ckpt"])
    for key in ("model", "ema"):
        if ckpt.get(key):
            ckpt[key] = {k: v + 1 for k, v in ckpt[key].items()}
    save_checkpoint(ckpt, other)
    with subprocess.Popen(
        [sys.executable, "-c", _KILL_DURING_ONNX, "--checkpoint", str(other), "--out-dir",
         str(out), "--onnx"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:  # fmt: skip
        assert proc.stdout.readline().strip() == "onnx"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    read_export(out)  # loads: the previous export, whole


def test_csv_writers_neutralise_formulas(trained, tmp_path) -> None:
    assert csv_cell("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert [csv_cell(v) for v in ("+1", "-x", "@SUM(A1)", "\tx", "cat", -0.5)] == [
        "'+1", "'-x", "'@SUM(A1)", "'\tx", "cat", -0.5
    ]  # fmt: skip
    # Class names and file names that start like formulas, in predict's and evaluate's CSV.
    data = _folder(tmp_path / "data", ("=HYPERLINK(1)", "@cls"), n=4)
    bad_img = data / "train" / "@cls" / "-1.png"
    shutil.copy(data / "train" / "@cls" / "0.png", bad_img)
    run = {**trained["run"], "data_dir": str(data), "out_dir": str(tmp_path / "run")}
    run["cache_dir"] = str(tmp_path / "cache")
    assert train_main(flags(run)) == 0
    preds = tmp_path / "p.csv"
    result = _run_cli("vit.predict", "--checkpoint", str(tmp_path / "run" / "last.pt"),
                      str(bad_img), "--predictions", str(preds))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(preds.read_text().splitlines()))
    cells = [c for row in rows[1:] for c in row]
    assert all(not c.startswith(("=", "+", "@")) for c in cells)
    assert {"'=HYPERLINK(1)", "'@cls"} <= set(cells)
    evaluated = tmp_path / "e.csv"
    result = _run_cli("vit.evaluate", "--checkpoint", str(tmp_path / "run" / "last.pt"),
                      "--predictions", str(evaluated))  # fmt: skip
    assert result.returncode == 0, result.stderr
    cells = [c for row in list(csv.reader(evaluated.read_text().splitlines()))[1:] for c in row]
    assert cells and all(not c.startswith(("=", "+", "@")) for c in cells)


# ---------------------------------------------------------------------------------------------
# Only regular files are images
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_png_never_hangs_a_command(trained, tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(trained["data"] / "train" / "cat" / "0.png", folder / "a.png")
    os.mkfifo(folder / "b.png")
    ckpt = str(trained["ckpt"])
    # In a folder: listed as not an image; named directly: skipped with a line.
    result = _run_cli("vit.predict", "--checkpoint", ckpt, str(folder), timeout=60)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1, result.stderr
    result = _run_cli("vit.predict", "--checkpoint", ckpt, str(folder / "b.png"), timeout=60)
    assert result.returncode == 2 and "not a regular file" in result.stderr
    # Every command reads images through vit.preprocess (rollout, caption, training folders).
    with pytest.raises(DataError, match="not a regular file"):
        Preprocess(16).load(folder / "b.png")
    # An image folder for training with a FIFO among the images.
    data = _folder(tmp_path / "data", ("a", "b"))
    os.mkfifo(data / "train" / "a" / "fifo.png")
    run = {**trained["run"], "data_dir": str(data), "out_dir": str(tmp_path / "run")}
    run["cache_dir"] = str(tmp_path / "cache")
    result = _run_cli("vit.train", *flags(run), timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Captioning: options checked in one line; beam search's length penalty; no silent blank caption
# ---------------------------------------------------------------------------------------------
def _caption_checkpoint(path: Path, name: str, **kw) -> Path:
    """A hand-made captioner checkpoint (untrained; what vit.caption reads)."""
    from vit.engine.checkpoint import CHECKPOINT_FORMAT
    from vit.models import create_model

    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", *(f"w{i}" for i in range(8))]
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, img_size=16, patch_size=4, max_len=12, **kw)
    kwargs["vocab_size"] = len(vocab)
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    state = {"vocab": vocab, "preprocess": Preprocess(16, resize="squash").to_dict()}
    ckpt = {"format": CHECKPOINT_FORMAT, "task": "caption", "task_state": state, "config": {}}
    ckpt |= {"model_spec": {"name": name, "kwargs": kwargs}, "model": model.state_dict()}
    save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("name", "kw"),
    [("caption_mini_patch8_32", {"decoder_depth": 1}), ("caption_lstm_mini_patch8_32", {})],
)
def test_caption_options_above_the_model_limits_are_one_line(tmp_path, capsys, name, kw) -> None:
    from vit.caption import main as caption_main

    ckpt = str(_caption_checkpoint(tmp_path / "c.pt", name, **kw))
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    for option, value, message in (
        ("--beam-size", "13", "--beam-size is at most the vocabulary's 12 words, got 13"),
        ("--max-len", "12", "--max-len is at most this model's 11 words, got 12"),
        ("--length-penalty", "nan", "--length-penalty must be in [0, 10]"),
    ):
        argv = ["--checkpoint", ckpt, "--images", str(img), option, value]
        assert caption_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_length_penalty_keeps_beam_search_from_ending_at_once() -> None:
    """A model that puts 0.4 on <eos> first but is sure of <eos> after any word: by the summed
    log-probability the empty caption wins (log 0.4 > log 0.3 + log 0.9); by the mean per token
    (the default) "a <eos>" does."""
    from types import SimpleNamespace

    from vit.models.decoding import beam_search

    cfg = SimpleNamespace(vocab_size=6, pad_id=0, bos_id=1, eos_id=2)
    first = torch.tensor([1e-9, 1e-9, 0.4, 0.3, 0.2, 0.1]).log()
    after = torch.tensor([1e-9, 1e-9, 0.9, 0.05, 0.03, 0.02]).log()

    def step(seq, state):
        return (first if seq.shape[1] == 1 else after).expand(seq.shape[0], -1), state

    def run(alpha: float) -> list[int]:
        ids = beam_search(step, None, lambda s, src: s, cfg, batch_size=1, beam_size=3,
                          max_len=5, device=torch.device("cpu"), length_penalty=alpha)  # fmt: skip
        return ids[0].tolist()

    assert run(0.0)[0] == 2  # the empty caption
    assert run(1.0)[:2] == [3, 2]  # "a <eos>"


def test_an_empty_caption_is_never_printed_without_a_note(tmp_path, capsys) -> None:
    from vit.caption import main as caption_main

    ckpt = _caption_checkpoint(tmp_path / "c.pt", "caption_lstm_mini_patch8_32")
    saved = load_checkpoint(ckpt)
    # The output bias makes <eos> certain first: the caption is empty.
    saved["model"]["head.bias"] = torch.full_like(saved["model"]["head.bias"], -50.0)
    saved["model"]["head.bias"][2] = 50.0
    save_checkpoint(saved, ckpt)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    assert caption_main(["--checkpoint", str(ckpt), "--images", str(img)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith(":")  # the blank caption itself
    assert "note: the model ended the caption at once" in captured.err


# ---------------------------------------------------------------------------------------------
# Run records: nothing lost on resume
# ---------------------------------------------------------------------------------------------
RUN4 = {**TINY, "batch_size": 32}  # four steps an epoch, a train point every two


TWO_EPOCHS = [("train", 2), ("train", 4), ("val", 4), ("train", 6), ("train", 8), ("val", 8)]


def _rows(out: Path) -> list[tuple[str, int]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"]) for r in map(json.loads, lines)]


def _scalars(out: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_keeps_the_checkpoint_step_after_an_extension(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train_main(flags({**RUN4, "out_dir": str(out)})) == 0
    assert train_main(flags({**RUN4, "out_dir": str(out), "epochs": 2, "resume": "auto"})) == 0
    # The first epoch's validation (step 4) was logged before its checkpoint: it stays.
    assert _scalars(out, "val/top1") == [4, 8]
    assert _scalars(out, "train/loss") == [2, 4, 6, 8]


def test_tensorboard_keeps_the_train_point_of_a_mid_epoch_resume(tmp_path, sigterm_at_step):
    from vit.engine.classification import ClassificationTask

    out = tmp_path / "run"
    run = flags({**RUN4, "out_dir": str(out), "epochs": 2})
    disarm = sigterm_at_step(ClassificationTask, 5)  # stops after step 6, logged at 6
    assert train_main(run) == 128 + signal.SIGTERM
    disarm()
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 6
    assert train_main([*run, "--resume", "auto"]) == 0
    assert _scalars(out, "train/loss") == [2, 4, 6, 8]
    assert _rows(out) == [
        ("train", 2),
        ("train", 4),
        ("val", 4),
        ("train", 6),
        ("train", 8),
        ("val", 8),
    ]


def _run_ahead_of_its_checkpoint(tmp_path: Path) -> tuple[Path, list]:
    """A run whose metrics.jsonl holds rows after its last.pt (as a crash after logging leaves
    it): 1 epoch, then the checkpoint of step 4 put back after training to step 8."""
    out = tmp_path / "run"
    assert train_main(flags({**RUN4, "out_dir": str(out)})) == 0
    early = (out / "last.pt").read_bytes()
    assert train_main(flags({**RUN4, "out_dir": str(out), "epochs": 2, "resume": "auto"})) == 0
    (out / "last.pt").write_bytes(early)
    return out, (out / "metrics.jsonl").read_text().splitlines()


_FAIL_SYNC = """
import errno, os, sys
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full  # the atomic rewrite of metrics.jsonl fails, as on a full disk
from vit.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_write_fault_during_resume_never_cuts_metrics(tmp_path) -> None:
    """A real process whose metrics.jsonl rewrite fails with ENOSPC (os.fsync patched)."""
    out, before = _run_ahead_of_its_checkpoint(tmp_path)
    assert len(before) == 6
    argv = flags({**RUN4, "out_dir": str(out), "epochs": 2, "resume": "auto"})
    result = subprocess.run(
        [sys.executable, "-c", _FAIL_SYNC, *argv], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    _one_line(result.stderr, "the disk is full")
    assert (out / "metrics.jsonl").read_text().splitlines() == before  # every row kept
    assert not list(out.glob(".*.tmp"))
    # Resumed without the fault: the rows after the checkpoint are redone once.
    assert train_main(argv) == 0
    assert _rows(out) == [
        ("train", 2),
        ("train", 4),
        ("val", 4),
        ("train", 6),
        ("train", 8),
        ("val", 8),
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_metrics_file_is_refused_before_config_changes(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train_main(flags({**RUN4, "out_dir": str(out)})) == 0
    config = (out / "config.yaml").read_text()
    (out / "metrics.jsonl").chmod(0o444)
    argv = flags({**RUN4, "out_dir": str(out), "epochs": 2, "resume": "auto"})
    assert train_main(argv) == 2
    assert "metrics.jsonl is not writable" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config and not list(out.glob("config.*.yaml"))


def test_read_only_records_are_checked_before_config_changes(tmp_path, capsys, monkeypatch):
    """As above, in-process for any user (root included): os.access says metrics.jsonl is not
    writable."""
    out = tmp_path / "run"
    assert train_main(flags({**RUN4, "out_dir": str(out)})) == 0
    config = (out / "config.yaml").read_text()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m, **k: False if str(p).endswith(".jsonl") else real(p, m, **k)
    )
    argv = flags({**RUN4, "out_dir": str(out), "epochs": 2, "resume": "auto"})
    assert train_main(argv) == 2
    assert "metrics.jsonl is not writable" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config and not list(out.glob("config.*.yaml"))


def test_resume_with_another_init_from_is_refused(trained, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    base = {**trained["run"], "out_dir": str(out), "init_from": str(trained["ckpt"])}
    assert train_main(flags(base)) == 0
    capsys.readouterr()
    for other in (str(trained["export"]), str(trained["ckpt"].with_name("best.pt"))):
        argv = flags({**base, "init_from": other, "epochs": 2, "resume": "auto"})
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert f"--init-from {other} with a resumed run" in err and str(trained["ckpt"]) in err
    # Resumed without --init-from: config.yaml still names the run's real source.
    argv = flags({**base, "epochs": 2, "resume": "auto", "init_from": ""})
    assert train_main(argv) == 0
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["init_from"] == str(trained["ckpt"])


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------
def test_mixup_checks_the_micro_batch(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="micro-batches of 3 with grad_accum_steps 2"):
        make_config({"mixup": 0.8, "batch_size": 6, "grad_accum_steps": 2})
    monkeypatch.setenv("WORLD_SIZE", "2")  # ours: two processes, two micro-batches of 3
    with pytest.raises(ConfigError, match="use a multiple of 8"):
        make_config({"cutmix": 1.0, "batch_size": 12, "grad_accum_steps": 2})
    make_config({"mixup": 0.8, "batch_size": 16, "grad_accum_steps": 2})


def test_yaml_keys_that_are_not_names(tmp_path: Path) -> None:
    for text, shown in (("1: 2\n", "1 (int)"), ("null: 3\n", "None (NoneType)"),
                        ("model_args: {1: 2}\n", "1 (int)")):  # fmt: skip
        path = tmp_path / "c.yaml"
        path.write_text(text)
        result = _run_cli("vit.train", "--config", str(path), timeout=60)
        assert result.returncode == 2
        _one_line(result.stderr, f"must be names, got {shown}")


def test_grad_accum_with_batchnorm_prints_a_note(tmp_path, capsys) -> None:
    from vit.engine.trainer import Trainer

    run = {**TINY, "out_dir": str(tmp_path / "bn"), "grad_accum_steps": 2}
    run["model_args"] = {**TINY["model_args"], "tokenizer": "conv", "conv_attention": "bam"}
    Trainer(make_config(run))
    assert "BatchNorm layers (BatchNorm1d, BatchNorm2d)" in capsys.readouterr().err
    Trainer(make_config({**TINY, "out_dir": str(tmp_path / "plain"), "grad_accum_steps": 2}))
    assert "BatchNorm" not in capsys.readouterr().err


def test_rollout_maps_of_a_model_left_in_train_mode(capsys) -> None:
    from vit.models import create_model
    from vit.rollout import rollout_maps

    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3,
        patch_drop_rate=0.5, drop_rate=0.3,
    )  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    model.train()
    maps = rollout_maps(model, x)
    assert model.training  # restored
    torch.testing.assert_close(maps, rollout_maps(model.eval(), x))


def test_a_failed_rename_into_place_puts_the_previous_export_back(trained, tmp_path, monkeypatch):
    """In-process: the rename of the new folder into place fails (after the previous export was
    renamed aside): the previous export is back, whole, and nothing is left beside it."""
    out = _copy_export(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the staged folder into place
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputError, match="Input/output error; nothing was written there"):
        export_checkpoint(trained["ckpt"], out)
    monkeypatch.setattr(os, "rename", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def test_an_output_in_a_read_only_folder_is_refused(tmp_path, monkeypatch) -> None:
    """In-process for any user (root included): os.access says the folder is not writable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m, **k: False if Path(p) == folder else real(p, m, **k)
    )
    with pytest.raises(ConfigError, match=r"its folder .* is not writable"):
        check_output(folder / "p.csv", "--output")
    with pytest.raises(ConfigError, match="is not writable"):
        export_checkpoint(tmp_path / "missing.pt", folder / "export")
