"""What a person sees: the one map renderer (fixed scale, labels, panel size), the TensorBoard
output of a short training run read back from its event files, and ``python -m vit.rollout``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vit.models import create_model
from vit.rollout import (
    explain,
    relative_to_uniform,
    render_layer_maps,
    render_maps,
    rollout_to_maps,
)
from vit.rollout.render import colorize, layout_size, panel_origin, to_unit
from vit.rollout.tensorboard import log_rollout

TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=16)  # 4x4 patch grid


def tiny_model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch4_32", **{**TINY, **overrides}).eval()


def _panel(picture: np.ndarray, rows: int, row: int, col: int, panel: int = 128) -> np.ndarray:
    x, y = panel_origin(rows, 3, panel, row, col)
    return picture[y : y + panel, x : x + panel]


# ----------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------
def test_colorize_is_inferno():
    import matplotlib

    values = torch.tensor([[[0.0, 0.5, 1.0]]])
    expected = matplotlib.colormaps["inferno"]([0.0, 128 / 255, 1.0])[:, :3]
    torch.testing.assert_close(
        colorize(values)[0, :, 0].T, torch.tensor(expected, dtype=torch.float32)
    )


def test_relative_to_uniform_keeps_how_peaked_a_map_is():
    flat = torch.full((1, 4, 4), 0.3)
    torch.testing.assert_close(relative_to_uniform(flat), torch.ones(1, 4, 4))
    peaked = torch.ones(1, 4, 4)
    peaked[0, 1, 2] = 17.0  # 17 / mean(32 / 16) = 8.5x a uniform patch
    assert relative_to_uniform(peaked).max().item() == pytest.approx(8.5)
    torch.testing.assert_close(relative_to_uniform(torch.zeros(1, 2, 2)), torch.ones(1, 2, 2))
    # A uniform attention matrix gives the uniform map 1 everywhere through rollout_to_maps.
    joint = torch.full((2, 17, 17), 1 / 17)
    torch.testing.assert_close(rollout_to_maps(joint, 4, scale="uniform"), torch.ones(2, 4, 4))


def test_flat_and_peaked_maps_render_differently_on_one_fixed_scale():
    display = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shape = torch.ones(4, 4)
    shape[1, 2] = 3.0
    flat = torch.ones(4, 4)
    nearly_flat = relative_to_uniform(1 + 0.03 * (shape - 1)[None])[0]  # peak 1.05x
    mild, strong = relative_to_uniform(shape[None])[0], relative_to_uniform((shape**4)[None])[0]
    picture = render_maps(display, torch.stack([flat, nearly_flat, mild, strong]))
    maps = [_panel(picture, 4, i, 1).astype(int) for i in range(4)]
    # A flat map is one colour: the scale's middle (1 = uniform), whatever its absolute values.
    body = maps[0][:100]  # above the "peak" label in the panel's lower-left corner
    assert (body == body[0, 0]).all()
    middle = (colorize(torch.tensor([[[0.5]]]))[0, :, 0, 0] * 255).round().int().tolist()
    assert body[0, 0].tolist() == middle
    # Per-map min-max would draw these three alike (same shape); the fixed scale does not:
    # the nearly flat map stays close to the flat colour, the peaked ones reach further.
    spread = [int(np.abs(m[:100] - body[0, 0]).max()) for m in maps[1:]]
    assert spread[0] < 15 < spread[1] < spread[2]
    assert to_unit(torch.tensor(8.0)) == 1.0 and to_unit(torch.tensor(1 / 8)) == 0.0


def test_labels_are_drawn_and_only_the_headline_changes():
    display = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = relative_to_uniform(torch.rand(1, 4, 4) + 0.5)
    cat = render_maps(display, maps, true=["cat"], predicted=["cat"], probs=[0.9])
    dog = render_maps(display, maps, true=["cat"], predicted=["dog"], probs=[0.9])
    unsure = render_maps(display, maps, true=["cat"], predicted=["cat"], probs=[0.4])
    bare = render_maps(display, maps)
    assert cat.shape == dog.shape == bare.shape
    for other in (dog, unsure, bare):
        assert not np.array_equal(cat, other)
        different_rows = np.nonzero((cat != other).any(axis=(1, 2)))[0]
        _, top = panel_origin(1, 3, 128, 0, 0)
        assert different_rows.max() < top  # the headline above the panels, nothing else
    # Right in green, wrong in red.
    head = slice(0, panel_origin(1, 3, 128, 0, 0)[1])
    assert (cat[head, :, 1].astype(int) - cat[head, :, 0]).max() > 60
    assert (dog[head, :, 0].astype(int) - dog[head, :, 1]).max() > 60


def test_panels_are_at_least_96_pixels_and_checked():
    display, maps = torch.rand(2, 3, 8, 8), torch.ones(2, 2, 2)
    picture = render_maps(display, maps, panel=96)
    assert picture.shape[:2] == layout_size(2, 3, 96)[::-1]
    # The image panel: the 8-pixel image enlarged to 96 pixels, sharp (each source pixel a block).
    image = _panel(picture, 2, 0, 0, 96)
    expected = (display[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(image[::12, ::12], expected)
    with pytest.raises(ValueError, match="at least 96"):
        render_maps(display, maps, panel=64)
    with pytest.raises(ValueError, match="one map per image"):
        render_maps(display, maps[:1])
    layers = render_layer_maps(display, torch.ones(2, 3, 2, 2))
    assert layers.shape[:2] == layout_size(2, 4, 96)[::-1]


# ----------------------------------------------------------------------------------------------
# The TensorBoard hook
# ----------------------------------------------------------------------------------------------
class _Writer:
    def __init__(self) -> None:
        self.images: dict[str, tuple[np.ndarray, int]] = {}

    def add_image(self, tag, img, step, dataformats="CHW"):
        assert dataformats == "HWC"
        self.images[tag] = (img, step)


def test_log_rollout_draws_the_labelled_pictures_and_restores_mode():
    model = tiny_model().train()
    images, display = torch.randn(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    writer = _Writer()
    compiled = torch.compile(model, backend="eager")
    log_rollout(
        writer, compiled, images, display, 7, labels=[0, 1, 2], classes=list("abcdefghij"),
        per_layer=True, gradient=True,
    )  # fmt: skip
    assert model.training
    assert all(block.attn.recorder is None for block in model.blocks)
    assert set(writer.images) == {"rollout/maps", "rollout/per_layer", "rollout/gradient"}
    picture, step = writer.images["rollout/maps"]
    assert step == 7 and picture.dtype == np.uint8
    assert picture.shape[:2] == layout_size(3, 3, 128)[::-1]
    found = explain(model, images)
    expected = render_maps(
        display,
        found.maps,
        true=["a", "b", "c"],
        predicted=["abcdefghij"[int(c)] for c in found.predicted],
        probs=found.probs.max(-1).values.tolist(),
        title="rollout (mean)",
    )
    np.testing.assert_array_equal(picture, expected)  # the renderer, nothing else
    layers, _ = writer.images["rollout/per_layer"]
    assert layers.shape[:2] == layout_size(3, 3, 96)[::-1]  # image + a column per block


# ----------------------------------------------------------------------------------------------
# A short training run, read back from its event files
# ----------------------------------------------------------------------------------------------
def _events(run_dir: Path) -> dict[str, dict]:
    """Tag → {step: value} of images (decoded RGB arrays), scalars and text, over every event
    file under ``run_dir``; and the HParams keys under "hparams"."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    out: dict[str, dict] = {"images": {}, "scalars": {}, "text": {}, "hparams": {}}
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            for e in acc.Images(tag):
                image = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
                out["images"].setdefault(tag, {})[e.step] = image
        for tag in acc.Tags()["scalars"]:
            out["scalars"][tag] = {e.step: e.value for e in acc.Scalars(tag)}
        for tag in acc.Tags()["tensors"]:
            for e in acc.Tensors(tag):
                text = e.tensor_proto.string_val[0].decode()
                out["text"].setdefault(tag.removesuffix("/text_summary"), {})[e.step] = text
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    if data.HasField("session_start_info"):
                        out["hparams"] = dict(data.session_start_info.hparams)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 6-step run (2 epochs of 3 steps) on the 10 synthetic classes, maps for 4 of them."""
    from vit.train import main as train_main

    out = tmp_path_factory.mktemp("run")
    args = ["--data", "synthetic", "--img-size", "16", "--synthetic-train", "96"]
    args += ["--synthetic-val", "40", "--epochs", "2", "--batch-size", "32", "--out-dir", str(out)]
    args += ["--model-args", "{depth: 2, embed_dim: 32, num_heads: 2}", "--rollout-per-layer"]
    args += ["--rollout-images", "4", "--device", "cpu", "--threads", "1"]
    assert train_main(args) == 0
    return out


def test_training_run_event_file_holds_readable_pictures_curves_and_hparams(run_dir):
    events = _events(run_dir)
    maps = events["images"]["rollout/maps"]
    # Before training (step 0) and at each validation (steps 3 and 6).
    assert sorted(maps) == [0, 3, 6]
    assert sorted(events["images"]["rollout/per_layer"]) == [0, 3, 6]
    record = json.loads((run_dir / "rollout_images.json").read_text())
    assert len(record["labels"]) == 4 and record["labels"] == sorted(set(record["labels"]))
    # One row per class up to the limit; panels of 128 pixels (>= 96).
    assert maps[0].shape[:2] == layout_size(4, 3, 128)[::-1]
    x, y = panel_origin(4, 3, 128, 0, 0)
    line = maps[0][y + 64, :, :]  # through the first image panel
    inked = np.nonzero((line < 250).any(axis=1))[0]
    assert inked.min() == x and inked.max() - x + 1 >= 96
    # The same images at every step: the image column is identical, the maps may move.
    for step in (3, 6):
        for row in range(4):
            np.testing.assert_array_equal(_panel(maps[step], 4, row, 0), _panel(maps[0], 4, row, 0))
    # Each row shows its true class: the sample is one image of each of the first classes.
    classes = record["classes"]
    assert [classes[i] for i in record["labels"]] == classes[:4]

    # Train scalars of a 6-step run (log_every 50): at each epoch's last step.
    scalars = events["scalars"]
    for key in ("loss", "lr", "images_per_s", "data_wait"):
        assert sorted(scalars[f"train/{key}"]) == [3, 6], key
    assert "val/top1" in scalars and "val_per_class/top1/disk" in scalars
    assert not any(tag.startswith("val/top1/") for tag in scalars)
    # The confusion figure at each validation; the top confusions and config as text.
    assert sorted(events["images"]["val/confusion"]) == [3, 6]
    assert sorted(events["text"]["val/top_confusions"]) == [3, 6]
    assert "batch_size: 32" in events["text"]["run/config"][0]
    assert "`disk`" in events["text"]["run/classes"][0]
    # HParams: the keys a person compares runs by, and the final metrics.
    keys = {"model", "data", "img_size", "epochs", "batch_size", "optimizer", "lr"}
    assert keys | {"weight_decay", "augmentation"} <= set(events["hparams"])
    assert "hparam/best_top1" in scalars and "hparam/final_loss" in scalars


def test_confusion_figure_names_classes_and_falls_back_to_text_beyond_20():
    from vit.engine.classification import confusion_figure, top_confusions

    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 4]])
    picture = confusion_figure(confusion, ["cat", "dog", "frog"])
    other = confusion_figure(confusion, ["cat", "dog", "toad"])
    assert picture.dtype == np.uint8 and not np.array_equal(picture, other)  # names drawn
    text = top_confusions(confusion, ["cat", "dog", "frog"])
    assert text.splitlines()[2:] == ["| dog | cat | 2 | 40.0% |", "| cat | dog | 1 | 16.7% |"]
    big = torch.eye(40, dtype=torch.long) * 3
    big[0, 1] = 7
    assert confusion_figure(big, [f"c{i}" for i in range(40)]).shape[0] <= 800
    assert "| c0 | c1 | 7 | 70.0% |" in top_confusions(big, [f"c{i}" for i in range(40)])
    assert "no confusions" in top_confusions(torch.eye(3, dtype=torch.long), ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------
# python -m vit.rollout
# ----------------------------------------------------------------------------------------------
def _png(path, w, h, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_folders_options_in_names_and_event_file(run_dir, tmp_path, capsys):
    from PIL import Image

    from vit.rollout.__main__ import main

    a = _png(tmp_path / "in" / "a.png", 16, 16)
    _png(tmp_path / "in" / "sub" / "b.jpg", 40, 24, seed=1)
    out, tb = tmp_path / "maps", tmp_path / "tb"
    ckpt = str(run_dir / "last.pt")
    assert main(["--checkpoint", ckpt, str(tmp_path / "in"), "--out-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "b.jpg is 40x24; resized to 16x16" in captured.err and "a.png" not in captured.err
    assert "(predicted " in captured.out and "x uniform)" in captured.out
    argv = ["--checkpoint", ckpt, a, "--out-dir", str(out), "--tensorboard", str(tb)]
    assert main([*argv, "--head-fusion", "max", "--discard-ratio", "0.9"]) == 0
    assert main([*argv, "--method", "gradient", "--class", "ring"]) == 0
    assert main([*argv, "--method", "gradient", "--class", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "a_gradient-ring.png",
        "a_gradient-square.png",
        "a_rollout-max-discard0.9.png",
        "a_rollout-mean-discard0.png",
        "b_rollout-mean-discard0.png",
    ]
    with Image.open(out / "a_rollout-mean-discard0.png") as img:  # enlarged to 128
        assert img.size == layout_size(1, 3, 128)
    events = _events(tb)["images"]
    assert set(events) == {
        "rollout/rollout-max-discard0.9",
        "rollout/gradient-ring",
        "rollout/gradient-square",
    }
    # The class-specific map depends on the class asked for.
    ring = np.asarray(Image.open(out / "a_gradient-ring.png"))
    square = np.asarray(Image.open(out / "a_gradient-square.png"))
    assert not np.array_equal(_panel(ring, 1, 0, 1), _panel(square, 1, 0, 1))


def test_cli_reads_export_folders(run_dir, tmp_path, capsys):
    from vit.export import main as export_main
    from vit.rollout.__main__ import main

    export = tmp_path / "export"
    assert export_main(["--checkpoint", str(run_dir / "last.pt"), "--out-dir", str(export)]) == 0
    image = _png(tmp_path / "a.png", 16, 16)
    assert (
        main(["--checkpoint", str(run_dir / "last.pt"), image, "--out-dir", str(tmp_path / "x")])
        == 0
    )
    from_ckpt = capsys.readouterr().out.split("(")[1]
    out = tmp_path / "maps"
    assert main(["--checkpoint", str(export), image, "--out-dir", str(out)]) == 0
    assert capsys.readouterr().out.split("(")[1] == from_ckpt  # same prediction, same peak
    assert (out / "a_rollout-mean-discard0.png").is_file()


@pytest.mark.parametrize(
    "case",
    [
        "not_an_image",
        "no_model",
        "not_a_checkpoint",
        "bad_ratio",
        "cuda_without_gpu",
        "class_without_gradient",
        "unknown_class",
        "no_images",
    ],
)
def test_cli_bad_input_exits_2_with_a_message(run_dir, tmp_path, capsys, case):
    from vit.rollout.__main__ import main

    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")

    image = _png(tmp_path / "a.png", 16, 16)
    ckpt = str(run_dir / "last.pt")
    extra = []
    if case == "not_an_image":
        (tmp_path / "notes.png").write_text("not pixels")
        image, expected = str(tmp_path / "notes.png"), "notes.png is not a readable image"
    elif case == "no_model":
        state = torch.load(ckpt, weights_only=True)
        del state["model"], state["model_spec"]
        torch.save(state, tmp_path / "empty.pt")
        ckpt, expected = str(tmp_path / "empty.pt"), "holds no model"
    elif case == "not_a_checkpoint":
        ckpt, expected = image, "a.png"
    elif case == "bad_ratio":
        extra, expected = ["--discard-ratio", "1.5"], "--discard-ratio must be in [0, 1)"
    elif case == "class_without_gradient":
        extra, expected = ["--class", "ring"], "--class needs --method gradient"
    elif case == "unknown_class":
        extra, expected = ["--method", "gradient", "--class", "rinq"], "did you mean 'ring'"
    elif case == "no_images":
        image, expected = None, "name the images"
    else:
        extra, expected = ["--device", "cuda"], "no CUDA device is available"
    paths = [image] if image else []
    code = main(["--checkpoint", ckpt, *paths, "--out-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_docs_figure_script_draws_one_row_per_class(run_dir, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "figure.png"
    argv = [sys.executable, str(root / "docs" / "rollout_figure.py")]
    argv += ["--checkpoint", str(run_dir / "last.pt"), "--out", str(out), "--max-classes", "4"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tmp_path)
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 1 + 4  # the header, then one line per class: true, predicted, peak, ...
    assert rows[1].startswith("| disk |")
    width, height = layout_size(2, 3, 128)  # two side-by-side groups of two rows
    with Image.open(out) as img:
        assert img.size == (2 * width, height)
