"""train.py as a user runs it, in subprocesses: exact resume after SIGKILL, the quick start, and
bad input without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Same thread count in every process: CPU float reductions then repeat bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RECIPE = [
    "--data", "synthetic", "--synthetic-train", "512", "--synthetic-val", "32",
    "--img-size", "16", "--model-args", "{embed_dim: 32, depth: 2, num_heads: 2}",
    "--batch-size", "16", "--epochs", "3", "--lr", "0.002", "--rollout-every", "0",
    "--mixup", "0.8", "--cutmix", "1.0", "--randaugment-ops", "2", "--cutout", "4",
    "--drop-path", "0.1", "--ema", "--device", "cpu", "--save-every", "5", "--threads", "1",
]  # fmt: skip


def train(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    state = {**ckpt["model"], **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}
    for i, s in ckpt["optimizer"]["state"].items():
        state |= {f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return state


def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    done = train(*RECIPE, "--out-dir", str(a))
    assert done.returncode == 0, done.stderr

    cmd = [sys.executable, str(ROOT / "train.py"), *RECIPE, "--out-dir", str(b)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (b / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no handler, no final save: as if the machine died
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    progress = torch.load(b / "last.pt", weights_only=True)["progress"]
    assert progress["batch_in_epoch"] != 0 and progress["step"] < 96  # mid-epoch, unfinished

    resumed = train(*RECIPE, "--out-dir", str(b), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    wa, wb = _state(a / "last.pt"), _state(b / "last.pt")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-6
    final_a = json.loads(done.stdout.strip().splitlines()[-1])
    final_b = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert final_a["top1"] == final_b["top1"] and final_a["steps"] == final_b["steps"] == 96


def test_quick_start_reaches_90_percent(tmp_path: Path) -> None:
    """A smaller version of the README's synthetic quick start (configs/synthetic.yaml)."""
    out = tmp_path / "run"
    small = ["--synthetic-train", "2000", "--synthetic-val", "500"]
    run = train("--config", str(ROOT / "configs/synthetic.yaml"), *small, "--out-dir", str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["top1"] >= 0.9
    ev = subprocess.run(
        [sys.executable, "-m", "vit.evaluate", "--checkpoint", str(out / "best.pt")],
        env=ENV, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["top1"] >= 0.9


def test_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    run = train("--data", "imagefolder", "--data-dir", str(tmp_path / "nowhere"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: --data imagefolder expects")
    assert run.stderr.count("\n") == 1


def test_python_m_vit_train_is_train_py(tmp_path: Path) -> None:
    """``python -m vit.train`` runs training exactly as ``python train.py`` does."""
    help_m = subprocess.run(
        [sys.executable, "-m", "vit.train", "--help"], env=ENV, capture_output=True, text=True
    )
    assert help_m.returncode == 0 and help_m.stdout.startswith("usage: ")
    assert help_m.stdout == train("--help").stdout
    args = ["--data", "synthetic", "--synthetic-train", "64", "--synthetic-val", "16"]
    args += ["--img-size", "16", "--model-args", "{embed_dim: 16, depth: 1, num_heads: 2}"]
    args += ["--batch-size", "16", "--epochs", "1", "--rollout-every", "0", "--threads", "1"]
    runs = []
    for name, cmd in (
        ("m", [sys.executable, "-m", "vit.train"]),
        ("py", [sys.executable, str(ROOT / "train.py")]),
    ):
        out = tmp_path / name
        run = subprocess.run(
            [*cmd, *args, "--out-dir", str(out)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        runs.append(torch.load(out / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize(
    "script",
    ["vit-train", "vit-evaluate", "vit-rollout", "vit-caption", "vit-predict", "vit-export"],
)
def test_installed_commands_answer_help(script: str) -> None:
    path = shutil.which(script) or str(Path(sys.executable).parent / script)
    assert Path(path).is_file(), f"{script} is not installed: pip install -e ."
    run = subprocess.run([path, "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: "), run.stderr
