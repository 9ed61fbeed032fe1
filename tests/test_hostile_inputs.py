"""Hostile and odd inputs: every file, option and checkpoint gets one line naming the problem and
the fix (exit code 2, no traceback), or the correct value."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import typing
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.engine.config import RunConfig, make_config
from vit.errors import ConfigError, DataError
from vit.preprocess import MAX_IMAGE_PIXELS, Preprocess, decode_image
from vit.train import main as train_main

TINY = [
    "--img-size", "16", "--model-args", "{embed_dim: 16, depth: 1, num_heads: 2}",
    "--batch-size", "8", "--epochs", "1", "--rollout-every", "0", "--threads", "1",
]  # fmt: skip


def one_line_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, err
    return last


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _folder(root: Path, classes=("a", "b"), n: int = 6, size=(16, 16)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / c / f"{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return root


def _bomb(path: Path, width: int, height: int) -> Path:
    """A PNG that declares a ``width`` x ``height`` canvas in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


# ----------------------------------------------------------------------------------------------
# 1. Images: the one decoder every path uses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.15, 0.76])
def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path, fraction: float) -> None:
    value = round(fraction * 65535)
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 5), value, dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL's convert("RGB") would give 255 here
    pixels = np.asarray(decode_image(path))
    assert pixels.shape == (4, 5, 3) and (pixels == round(value / 257)).all()


def test_exif_orientation_palette_and_alpha_decode_to_upright_rgb(tmp_path: Path) -> None:
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255  # white left half
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    upright = np.asarray(decode_image(tmp_path / "rot.jpg"))
    assert upright.shape == (8, 4, 3) and upright[0].mean() > 200 and upright[-1].mean() < 50
    Image.fromarray(arr).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.dstack([arr, np.full((4, 8), 7, np.uint8)])).save(tmp_path / "a.png")
    for name in ("p.png", "a.png"):
        assert np.array_equal(np.asarray(decode_image(tmp_path / name)), arr)


def test_constant_channel_images_train_without_nan(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for c, colour in (("red", (200, 30, 0)), ("green", (30, 200, 0))):  # blue always 0
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(8):
            arr = np.zeros((16, 16, 3), np.uint8)
            arr[:, :, :2] = np.clip(np.array(colour[:2]) + rng.integers(-9, 9, (16, 16, 2)), 0, 255)
            _png(tmp_path / "train" / c / f"{i}.png", arr)
    out = tmp_path / "run"
    args = ["--data", "imagefolder", "--data-dir", str(tmp_path), *TINY, "--val-fraction", "0.25"]
    assert train_main([*args, "--out-dir", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(result["loss"])
    std = torch.load(out / "last.pt", weights_only=True)["task_state"]["preprocess"]["std"]
    assert std[2] == pytest.approx(1 / 255)  # clamped, not 0


def test_divergence_before_any_checkpoint_claims_none(tmp_path: Path, capsys, monkeypatch) -> None:
    from vit.engine.classification import ClassificationTask

    monkeypatch.setattr(ClassificationTask, "loss", lambda self, m, b, s: m(b[0]).sum() * np.nan)
    argv = ["--data", "synthetic", "--synthetic-train", "32", "--synthetic-val", "8", *TINY]
    assert train_main([*argv, "--out-dir", str(tmp_path / "run")]) == 1
    line = one_line_error(capsys, "the loss became nan at step")
    assert "no checkpoint was written yet" in line and "last good" not in line


@pytest.mark.parametrize("size", [(9000, 9000), (100_000, 100_000)])
def test_oversized_images_are_refused_from_their_header(tmp_path: Path, size) -> None:
    path = _bomb(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 200
    with pytest.raises(DataError, match=r"bomb\.png .*(over the limit|declares a canvas over)"):
        decode_image(path)
    assert size[0] * size[1] > MAX_IMAGE_PIXELS


def test_a_bomb_in_training_rollout_and_caption_is_one_line(tmp_path: Path, capsys) -> None:
    from vit.caption import main as caption_main
    from vit.rollout.__main__ import main as rollout_main

    data = _folder(tmp_path / "data" / "train")
    _bomb(data / "a" / "bomb.png", 100_000, 100_000)
    args = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), *TINY]
    assert train_main([*args, "--out-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "declares a canvas over")
    (data / "a" / "bomb.png").unlink()
    args += ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run")]
    assert train_main(args) == 0
    bomb = str(_bomb(tmp_path / "bomb.png", 100_000, 100_000))
    ckpt = str(tmp_path / "run" / "last.pt")
    capsys.readouterr()
    assert rollout_main(["--checkpoint", ckpt, "--images", bomb, "--out-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "declares a canvas over")
    assert caption_main(["--checkpoint", ckpt, "--images", bomb]) == 2
    one_line_error(capsys, "not a captioner")


def test_rollout_overlays_are_drawn_at_a_bounded_size(tmp_path: Path, capsys) -> None:
    from vit.rollout.__main__ import main as rollout_main
    from vit.rollout.render import layout_size

    _folder(tmp_path / "data" / "train")
    args = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), *TINY]
    assert (
        train_main([*args, "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path)]) == 0
    )
    big = _png(tmp_path / "big.png", np.zeros((3000, 2000, 3), np.uint8))
    argv = ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--images", str(big)]
    assert rollout_main([*argv, "--out-dir", str(tmp_path / "maps")]) == 0
    with Image.open(tmp_path / "maps" / "big_rollout-mean-discard0.png") as im:
        # The model's 16-pixel crop enlarged to 128-pixel panels, whatever the file's size.
        assert im.size == layout_size(1, 3, 128)


def test_file_names_that_are_not_utf8(tmp_path: Path, capsys) -> None:
    from vit.rollout.__main__ import main as rollout_main

    data = _folder(tmp_path / "data" / "train")
    latin1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from an old archive
    _png(data / "a" / latin1, np.full((16, 16, 3), 90, np.uint8))
    args = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), *TINY]
    assert (
        train_main([*args, "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path)]) == 0
    )
    capsys.readouterr()
    argv = ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--images", str(data / "a" / latin1)]
    assert rollout_main([*argv, "--out-dir", str(tmp_path / "maps")]) == 0
    assert "caf\\xe9.png -> " in capsys.readouterr().out
    with pytest.raises(DataError, match=r"caf\\xe9\.png"):
        decode_image(tmp_path / latin1)  # missing: the message escapes the name


def test_unreadable_class_folder_and_single_class(tmp_path: Path, capsys, monkeypatch) -> None:
    data = _folder(tmp_path / "data" / "train")
    args = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), *TINY]
    real = Path.iterdir

    def iterdir(self):
        if self.name == "b":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert train_main([*args, "--out-dir", str(tmp_path / "r1")]) == 2
    one_line_error(capsys, f"cannot read class folder {data / 'b'}: Permission denied")
    monkeypatch.setattr(Path, "iterdir", real)
    for f in (data / "b").iterdir():
        f.unlink()
    (data / "b").rmdir()
    assert train_main([*args, "--out-dir", str(tmp_path / "r2")]) == 2
    one_line_error(capsys, "has one class folder ('a')")


def test_a_corrupt_decoded_image_cache_is_rebuilt(tmp_path: Path) -> None:
    from vit.data import image_folder

    data = _folder(tmp_path / "train", n=3)
    x, y, _ = image_folder(data, img_size=8, cache_dir=tmp_path / "cache")
    x = np.array(x)  # the map's content, before the cache file is damaged below
    (cache,) = (tmp_path / "cache").glob("imagefolder-*.npy")
    meta = cache.with_suffix(".json")
    damage = [
        lambda: cache.write_bytes(b"not an array"),
        lambda: cache.write_bytes(cache.read_bytes()[:-5]),  # truncated
        lambda: np.save(cache, np.zeros((2, 4, 4, 3), np.uint8)),  # another shape
        lambda: np.save(cache, np.zeros(x.shape, np.float32)),  # another type
        lambda: meta.write_text("{torn"),
        lambda: meta.unlink(),  # never completed
    ]
    for spoil in damage:
        spoil()
        x2, y2, _ = image_folder(data, img_size=8, cache_dir=tmp_path / "cache")
        assert np.array_equal(x, x2) and torch.equal(y, y2)
        assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [
            ".json",
            ".lock",
            ".npy",
        ]


# ----------------------------------------------------------------------------------------------
# Captions: images and annotation files from elsewhere
# ----------------------------------------------------------------------------------------------
def _flickr(root: Path, lines: list[str], bom: bool = False) -> Path:
    (root / "Images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        _png(root / "Images" / f"{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    text = "image,caption\n" + "".join(f"{line}\n" for line in lines)
    (root / "captions.txt").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return root


def test_flickr_names_outside_the_images_folder_are_refused(tmp_path: Path, caplog) -> None:
    from vit.captions import load_flickr8k

    secret = _png(tmp_path / "secret.png", np.zeros((8, 8, 3), np.uint8))
    lines = [f"{i}.png,a caption" for i in range(4)]
    lines += [f"{secret},absolute", "../../secret.png,climbing out"]
    root = _flickr(tmp_path / "flickr", lines, bom=True)
    with caplog.at_level(logging.WARNING):
        data = load_flickr8k(root, "train", val_fraction=0.01)
    assert all(p.parent == root / "Images" for p in data.images)
    assert "refused 2 image names that point outside" in caplog.text


def test_corrupt_caption_images_are_skipped_up_front(tmp_path: Path, caplog) -> None:
    from vit.captions import CaptionData, CaptionDataset, Tokenizer

    root = _flickr(tmp_path / "flickr", [f"{i}.png,a caption" for i in range(4)])
    good = (root / "Images" / "0.png").read_bytes()
    (root / "Images" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    paths = [root / "Images" / f"{i}.png" for i in range(4)]
    tok = Tokenizer.build(["a caption"])
    with caplog.at_level(logging.WARNING):
        ds = CaptionDataset(CaptionData(paths, [["a caption"]] * 4), tok, max_len=6, img_size=16)
    assert len(ds) == 3 and "1 of 4 images cannot be read" in caplog.text
    assert all(ds[(0, i)][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_captions_file_encoding(tmp_path: Path, capsys) -> None:
    from vit.captions import read_flickr8k_captions

    root = _flickr(tmp_path / "bom", ["0.png,a red square"], bom=True)
    assert read_flickr8k_captions(root / "captions.txt") == {"0.png": ["a red square"]}
    (tmp_path / "latin1.txt").write_bytes("image,caption\n0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        read_flickr8k_captions(tmp_path / "latin1.txt")


# ----------------------------------------------------------------------------------------------
# 2. Options and config files
# ----------------------------------------------------------------------------------------------
FLOATS = [
    f.name
    for f in dataclasses.fields(RunConfig)
    if typing.get_type_hints(RunConfig)[f.name] is float
]


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_must_be_finite(key: str, value: str, capsys) -> None:
    assert train_main([f"--{key.replace('_', '-')}={value}"]) == 2
    one_line_error(capsys, f"{key} must be a finite number")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--cutout", "40"], "cutout 40 exceeds the image size 32"),
        (["--crop-padding", "100000"], "crop_padding 100000 exceeds the image size 32"),
        (["--img-size", "100000"], "img_size is at most 4,096"),
        (["--seed", str(2**70)], "seed is at most 4,294,967,295"),
        (["--model-args", "{embed_dim: 100000, num_heads: 4}"], "more than 2,000,000,000"),
    ],
)
def test_absurd_sizes_are_refused_before_allocation(argv, fragment, tmp_path, capsys) -> None:
    base = ["--data", "synthetic", "--synthetic-train", "16", "--synthetic-val", "8"]
    base += ["--batch-size", "8"]
    assert train_main([*base, *argv, "--out-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, fragment)


def test_config_files_and_output_paths(tmp_path: Path, capsys, monkeypatch) -> None:
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(256)))
    assert train_main(["--config", str(junk)]) == 2
    one_line_error(capsys, "is not UTF-8 text")
    locked = tmp_path / "locked.yaml"
    locked.write_text("lr: 0.1\n")
    real = Path.read_text

    def read_text(self, *a, **k):
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert train_main(["--config", str(locked)]) == 2
    one_line_error(capsys, f"cannot read config file {locked}: Permission denied")
    monkeypatch.setattr(Path, "read_text", real)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert train_main(["--out-dir", str(a_file)]) == 2
    one_line_error(capsys, f"--out-dir {a_file} is a file")
    monkeypatch.setattr(os, "access", lambda *a: False)
    assert train_main(["--out-dir", str(tmp_path / "ro")]) == 2
    one_line_error(capsys, "is not writable")


def test_rollout_usage_and_output_paths_are_one_line(tmp_path: Path, capsys) -> None:
    from vit.rollout.__main__ import main as rollout_main

    assert rollout_main(["--checkpoint", "x.pt"]) == 2
    one_line_error(capsys, "name the images: python -m vit.rollout --checkpoint CKPT PATH")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flag in ("--out-dir", "--tensorboard"):
        assert rollout_main(["--checkpoint", "x.pt", "--images", "a.png", flag, str(a_file)]) == 2
        one_line_error(capsys, f"{flag} {a_file} is a file")


def test_mixup_needs_an_even_batch_on_every_rank(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"got batch_size 6 \(3 per process on 2\)"):
        make_config({"mixup": 0.8, "batch_size": 6})
    make_config({"mixup": 0.8, "batch_size": 8})


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints and weights from elsewhere
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    argv = ["--data", "synthetic", "--synthetic-train", "32", "--synthetic-val", "8", *TINY]
    assert train_main([*argv, "--out-dir", str(out)]) == 0
    return out / "last.pt"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: c.pop("model"), "holds no model"),
        (lambda c: c.pop("task_state"), "'task_state' is missing"),
        (lambda c: c.pop("config"), "'config' is missing"),
        (lambda c: c.update(model_spec=[1, 2]), "'model_spec' is not a dict"),
        (lambda c: c.update(model_spec={"name": 3, "kwargs": {}}), "needs a name (str)"),
        (
            lambda c: c["model_spec"]["kwargs"].update(embed_dim=100_000),
            "cannot be built with its",
        ),
        (lambda c: c.pop("optimizer"), "holds no training state"),
    ],
)
def test_malformed_checkpoints_in_evaluate_and_resume(
    checkpoint: Path, tmp_path: Path, capsys, edit, fragment: str
) -> None:
    from vit.evaluate import main as evaluate_main

    ckpt = torch.load(checkpoint, weights_only=True)
    edit(ckpt)
    bad = tmp_path / "run" / "last.pt"
    bad.parent.mkdir()
    torch.save(ckpt, bad)
    code = evaluate_main(["--checkpoint", str(bad)])
    if fragment == "holds no training state":  # evaluation needs no optimizer state
        assert code == 0
        capsys.readouterr()
    else:
        assert code == 2
        one_line_error(capsys, fragment)
    argv = ["--data", "synthetic", "--synthetic-train", "32", "--synthetic-val", "8", *TINY]
    code = train_main([*argv, "--out-dir", str(bad.parent), "--resume", "auto"])
    if fragment == "cannot be built with its":  # resuming builds the model from the config
        assert code == 0
        assert "Traceback" not in capsys.readouterr().err
    else:
        assert code == 2
        one_line_error(capsys, fragment)


def test_truncated_and_empty_checkpoints_say_so(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from vit.evaluate import main as evaluate_main

    data = checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    assert evaluate_main(["--checkpoint", str(tmp_path / "cut.pt")]) == 2
    one_line_error(capsys, "truncated")
    assert evaluate_main(["--checkpoint", str(tmp_path / "empty.pt")]) == 2
    one_line_error(capsys, "the file is empty")


@pytest.mark.parametrize("kind", ["pickle", "empty", "junk_safetensors"])
def test_encoder_checkpoint_files_get_the_same_answers(tmp_path: Path, capsys, kind) -> None:
    import pickle

    path = tmp_path / ("enc.safetensors" if kind == "junk_safetensors" else "enc.pt")
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"model": os.system}))
    else:
        path.write_bytes(b"" if kind == "empty" else b"\x10\x00\x00\x00junk")
    argv = ["--task", "caption", "--data", "shapes", "--img-size", "16", "--epochs", "1"]
    argv += ["--batch-size", "8"]
    argv += ["--task-args", json.dumps({"train_scenes": 16, "val_scenes": 8,
                                         "encoder_checkpoint": str(path)})]  # fmt: skip
    assert train_main([*argv, "--out-dir", str(tmp_path / "run")]) == 2
    fragment = {"pickle": "not a PyTorch checkpoint", "empty": "the file is empty"}
    one_line_error(capsys, fragment.get(kind, "not a valid safetensors file"))


def test_load_pretrained_strips_wrappers_in_any_order() -> None:
    from vit.models import create_model, load_pretrained

    source = create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    target = create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    for prefix in ("_orig_mod.module.", "module._orig_mod.", "module.module."):
        state = {prefix + k: v for k, v in source.state_dict().items()}
        load_pretrained(target, state)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    for bad in (torch.zeros(32), torch.zeros(1, 1, 32)):  # 1-D; the class slot alone
        state = {**source.state_dict(), "pos_embed": bad}
        with pytest.raises(ValueError, match="cannot read a square patch grid"):
            load_pretrained(target, state)


def test_preprocess_refuses_a_malformed_record() -> None:
    with pytest.raises(ConfigError, match=r"missing entries \['img_size', 'std'\]"):
        Preprocess.from_dict({"mean": [0, 0, 0]})


def test_time_limit_with_epochs_shorter_than_the_timing_window(tmp_path: Path) -> None:
    """Two steps an epoch: the time fit runs at epoch ends before 12 steps were timed."""
    argv = ["--data", "synthetic", "--synthetic-train", "32", "--synthetic-val", "8", *TINY]
    argv += ["--batch-size", "16", "--epochs", "30", "--time-limit", "0.1"]
    assert train_main([*argv, "--out-dir", str(tmp_path / "run")]) == 0
