"""The commands as a person uses them: recipes chosen without a config, --help, progress in logs,
--time-limit on resume, --init-from timm:NAME offline, no leftovers from a run that never started,
one image-path convention, export files readable like their siblings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, flags
from vit.engine.config import CHOICES, GROUPS, RunConfig, parse_args, pick_recipe, resolve_threads

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(
        cmd, env=env or ENV, capture_output=True, text=True, timeout=300, cwd=cwd
    )  # stdout and stderr are pipes, as under nohup or a job scheduler


# -- recipes -----------------------------------------------------------------------------------
def test_no_config_picks_the_measured_recipe_by_data_and_device() -> None:
    notes: list[str] = []
    cfg = parse_args(["--data", "cifar10", "--device", "cpu"], notes)
    assert (cfg.time_limit, cfg.optimizer, cfg.model_args["embed_dim"]) == (30, "muon", 128)
    assert cfg.data == "cifar10"  # the command line wins over the recipe's image folder
    assert len(notes) == 1 and notes[0].startswith("CPU, CIFAR-10: ~80% in 30 min")
    assert "configs/cifar10_cpu_30min.yaml" in notes[0]
    assert parse_args(["--data", "cifar10", "--device", "cuda"]).amp == "bf16"  # the GPU recipe
    folder = parse_args(["--data", "imagefolder", "--data-dir", "photos"])
    assert folder.img_size == 64 and folder.model_args["embed_dim"] == 128
    synthetic = parse_args([])  # `python train.py` alone: the quick start
    assert synthetic.model_args == {"embed_dim": 64, "depth": 3, "num_heads": 4, "patch_size": 4}
    # --config none: the built-in defaults; a recipe-less pair: the defaults too.
    assert parse_args(["--config", "none"]) == parse_args(
        ["--config", "none", "--data", "synthetic"]
    )
    assert parse_args(["--config", "none"]).model_args == RunConfig().model_args
    assert pick_recipe("caption", "coco", "cpu") is None


def test_time_limit_on_the_command_line_lifts_the_epoch_cap() -> None:
    notes: list[str] = []
    lifted = parse_args(["--time-limit", "1"], notes)
    assert lifted.epochs == 1_000_000 and "fills the time limit" in notes[-1]
    assert parse_args(["--time-limit", "1", "--epochs", "4"]).epochs == 4
    recipe = parse_args(["--data", "cifar10", "--device", "cpu"])  # the file's limit: capped
    assert recipe.epochs == 60


def test_threads_default_to_half_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, world, expected in ((2, 1, 1), (1, 1, 1), (16, 1, 8), (64, 1, 8), (8, 2, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)))
        assert resolve_threads(0, world) == expected
    assert resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins over the default
    assert resolve_threads(0) == 2 and resolve_threads(3) == 3


# -- help ----------------------------------------------------------------------------------------
def test_help_is_grouped_plain_named_as_run_and_imports_no_torch() -> None:
    code = (
        "import sys; sys.argv = ['/usr/bin/vit-train', '--help']\n"
        "from vit.train import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    text = run.stdout
    assert run.returncode == 0 and text.rstrip().endswith("NO-TORCH"), run.stderr
    assert text.startswith("usage: vit-train ")
    headings = [h for h in re.findall(r"^([a-z ]+):$", text, re.M) if h != "options"]
    assert headings == list(GROUPS)
    assert "{classify,caption}" in text and "{synthetic,cifar10,imagefolder," in text
    assert "``" not in text and ":mod:" not in text
    assert "(default: 0.001)" in text and "176 s" in text  # defaults, the threads measurement
    for cmd in ("vit.predict", "vit.evaluate", "vit.caption", "vit.export"):
        shown = subprocess.run(
            [sys.executable, "-m", cmd, "--help"], env=ENV, capture_output=True, text=True
        ).stdout
        assert "``" not in shown and ":mod:" not in shown, cmd
        batch = re.search(r"--batch-size \S+\s+[^-]*default: \d+", shown)
        assert "--batch-size" not in shown or batch, cmd


def test_help_choices_match_the_tasks() -> None:
    from vit.engine.tasks import TASKS, get_task

    assert set(CHOICES["task"]) == set(TASKS)
    assert set(CHOICES["data"]) == {d for t in TASKS for d in get_task(t).datasets}
    assert sorted(n for names in GROUPS.values() for n in names) == sorted(
        f.name for f in __import__("dataclasses").fields(RunConfig)
    )


# -- progress in logs, resume, time limit ---------------------------------------------------------
def test_progress_reaches_a_log_and_resume_says_where(tmp_path: Path) -> None:
    args = [*flags({**TINY, "epochs": 2}), "--out-dir", str(tmp_path / "run")]
    run = _train(*args)
    assert run.returncode == 0, run.stderr
    lines = re.findall(
        r"^epoch (\d)/2 step (\d+)/16: loss [\d.]+, lr [\d.e+-]+, \d+ images/s, "
        r".+ elapsed, ~.+ left$",
        run.stderr,
        re.M,
    )
    assert [(e, int(s)) for e, s in lines] == [("1", 8), ("2", 16)]
    assert "\r" not in run.stderr  # no bar in a log
    more = _train(
        *args[:-2], "--epochs", "3", "--out-dir", str(tmp_path / "run"), "--resume", "auto"
    )
    assert more.returncode == 0, more.stderr
    assert "resumed from step 16 of 24 (epoch 3)" in more.stderr


def test_time_limit_counts_the_time_before_a_resume(tmp_path: Path, sigterm_at_step) -> None:
    from vit.engine.checkpoint import load_checkpoint
    from vit.engine.classification import ClassificationTask
    from vit.train import main

    args = [*flags({**TINY, "epochs": 40}), "--out-dir", str(tmp_path / "run"), "--save-every", "4"]
    disarm = sigterm_at_step(ClassificationTask, 4)
    assert main(args) != 0
    disarm()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["elapsed"] > 0
    # A limit its first part already used up: the resumed run stops at its first fit (12
    # steps on), not after the 320 steps of its 40 epochs.
    assert main([*args, "--resume", "auto", "--time-limit", "0.001"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["step"] < 40


def test_each_plan_change_is_one_line_and_an_epoch_cap_is_said(tmp_path: Path, capsys) -> None:
    from vit.engine.trainer import Trainer

    values = {**TINY, "epochs": 100, "time_limit": 1.0, "out_dir": str(tmp_path)}
    t = Trainer(parse_args(flags(values)))
    t.progress.step = 12
    t._fit_schedule(step_time=0.1)  # 60 s at 0.1 s/step: fewer than the 800 steps of 100 epochs
    first = capsys.readouterr().err
    assert re.match(r"plan: \d+ steps \(", first) and "caps" not in first
    assert first.count("\n") == 1
    t._fit_schedule(step_time=0.1)  # the same plan: nothing to say
    assert capsys.readouterr().err == ""
    t._fit_schedule(step_time=1e-6)  # the limit would fit far more: --epochs caps it, said once
    capped = capsys.readouterr().err
    assert "→ 800 steps" in capped and "--epochs 100 caps it" in capped
    t._fit_schedule(step_time=0.1)
    t._fit_schedule(step_time=1e-6)
    assert "caps it" not in capsys.readouterr().err
    # A cap that leaves the plan as it was is said too (a 1-minute limit ending in seconds).
    short = Trainer(parse_args(flags({**values, "epochs": 1, "out_dir": str(tmp_path / "s")})))
    short.progress.step = 2
    short._fit_schedule(step_time=0.1)
    said = capsys.readouterr().err
    assert short.progress.total_steps == 8 and "--epochs 1 caps it" in said


# -- weights, leftovers, records ------------------------------------------------------------------
def test_init_from_timm_offline_says_how_to_pass_a_file(tmp_path: Path) -> None:
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [*flags(TINY), "--out-dir", str(tmp_path / "run")]
    run = _train(*args, "--init-from", "timm:vit_tiny_patch16_224", env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    err = run.stderr.strip().splitlines()[-1]
    assert "not cached" in err and "--init-from vit_tiny_patch16_224.safetensors" in err
    assert not (tmp_path / "run").exists()  # and no empty run folder
    bad = _train(*args, "--init-from", "timm:vit_tiny_patch16_2244", env=env)
    assert bad.returncode == 2 and "timm has no model" in bad.stderr


def test_a_run_that_never_started_leaves_no_folders(tmp_path: Path, monkeypatch) -> None:
    run = _train(
        "--data", "imagefolder", "--data-dir", "nowhere", "--out-dir", "runs/x", cwd=tmp_path
    )
    assert run.returncode == 2 and list(tmp_path.iterdir()) == []

    import torchvision.datasets

    from vit.data.datasets import cifar10
    from vit.errors import DataError

    def offline(root, train, download):
        if download:
            raise OSError("network unreachable")
        raise RuntimeError("Dataset not found")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        cifar10(tmp_path / "data" / "cifar", train=True)
    assert list(tmp_path.iterdir()) == []


def test_image_paths_expand_folders_recursively(tmp_path: Path) -> None:
    from vit.errors import DataError
    from vit.preprocess import image_paths

    for name in ("b/2.png", "b/c/3.JPG", "b/.hidden.png", "b/notes.txt", "a.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    got = image_paths([tmp_path / "b", str(tmp_path / "a.webp")])
    assert got == [tmp_path / "b/2.png", tmp_path / "b/c/3.JPG", tmp_path / "a.webp"]
    with pytest.raises(DataError, match=r"no such file or folder: .*nope"):
        image_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        image_paths([tmp_path / "empty"])


def test_export_files_follow_the_umask(tmp_path: Path) -> None:
    from torch import nn

    from vit.models.pretrained import save_pretrained

    config = {
        "architecture": "vit_tiny_patch4_32",
        "model_args": {},
        "task": "classify",
        "preprocess": {"img_size": 32},
    }
    old = os.umask(0o022)
    try:
        save_pretrained(nn.Linear(2, 2), tmp_path / "e", config=config)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "e").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


def test_init_from_timm_loads_timms_pretrained_weights(tmp_path: Path, monkeypatch, capsys) -> None:
    """``timm:NAME`` goes through ``timm.create_model(NAME, pretrained=True)``; here that call
    returns a seeded model (no download), whose weights must be the run's starting point."""
    import timm
    import torch

    from vit.engine.trainer import Trainer

    real = timm.create_model

    def create_model(name, pretrained=False, **kw):
        assert pretrained and name == "vit_tiny_patch16_224"
        torch.manual_seed(123)
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create_model)
    values = {**TINY, "model_args": {}, "img_size": 32, "out_dir": str(tmp_path)}
    t = Trainer(parse_args(flags({**values, "init_from": "timm:vit_tiny_patch16_224"})))
    theirs = create_model("vit_tiny_patch16_224", pretrained=True).state_dict()
    ours = t.model.state_dict()
    assert torch.equal(ours["blocks.11.norm2.weight"], theirs["blocks.11.norm2.weight"])
    assert torch.equal(ours["blocks.0.mlp.fc1.weight"], theirs["blocks.0.mlp.fc1.weight"])
    assert "init-from timm:vit_tiny_patch16_224:" in capsys.readouterr().err


def test_decoding_a_folder_says_so_in_a_log(tmp_path: Path, capsys) -> None:
    import numpy as np
    from PIL import Image

    from vit.data.datasets import image_folder

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((20, 30, 3), 60 * i, np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.png")
    kw = {"img_size": 16, "cache_dir": tmp_path / "cache"}
    image_folder(tmp_path / "train", **kw)
    said = capsys.readouterr().err
    assert said == f"decoding 6 images of {tmp_path / 'train'} (cached for next time)\n"
    image_folder(tmp_path / "train", **kw)  # from the cache: nothing to wait for, nothing said
    assert capsys.readouterr().err == ""
