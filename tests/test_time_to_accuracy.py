"""benchmarks/time_to_accuracy.py: a recipe and the timm reference through the engine, the curve
and the summary; the reference takes only the data settings of the recipe file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tta", ROOT / "benchmarks" / "time_to_accuracy.py")
tta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tta)

RECIPE = """
data: synthetic
synthetic_train: 256
synthetic_val: 64
img_size: 16
model_args: {embed_dim: 32, depth: 2, num_heads: 2}
batch_size: 64
epochs: 2
lr: 0.004
log_every: 1
rollout_every: 0
device: cpu
"""


def _run(tmp_path: Path, capsys, *extra: str) -> tuple[dict, dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert tta.main(["--config", str(recipe), "--out-dir", str(out), *extra]) == 0
    stdout = capsys.readouterr().out
    assert "epoch  seconds" in stdout and "data wait" in stdout
    return json.loads(stdout.strip().splitlines()[-1]), yaml.safe_load(
        (out / "config.yaml").read_text()
    )


def test_recipe_curve_and_overrides(tmp_path: Path, capsys) -> None:
    summary, cfg = _run(tmp_path, capsys, "--time-limit", "5", "--lr", "0.003")
    assert cfg["lr"] == 0.003 and cfg["time_limit"] == 5 and cfg["batch_size"] == 64
    assert [c[0] for c in summary["curve"]] == [1, 2] and summary["epochs"] == 2
    assert summary["top1"] == summary["curve"][-1][2] and summary["images_per_s"] > 0
    assert 0 <= summary["data_wait"] < 1 and summary["loader_share_of_step"] > 0


def test_baseline_timm_keeps_only_the_recipe_data(tmp_path: Path, capsys) -> None:
    extra = ("--epochs", "1", "--batch-size", "32", "--synthetic-train", "64")
    summary, cfg = _run(tmp_path, capsys, "--baseline-timm", *extra)
    assert cfg["model"] == "timm:vit_tiny_patch16_224" and summary["baseline_timm"]
    assert cfg["model_args"]["embed_dim"] == 128 and cfg["model_args"]["patch_size"] == 4
    # The reference recipe, not the file's: lr and amp; the file's data, the command line's batch.
    assert (cfg["lr"], cfg["amp"], cfg["label_smoothing"]) == (0.002, "off", 0.1)
    assert (cfg["data"], cfg["img_size"], cfg["batch_size"]) == ("synthetic", 16, 32)
    assert 0.7e6 < summary["params"] < 0.9e6
