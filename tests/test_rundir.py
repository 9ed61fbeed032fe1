"""A run directory is a transaction: one writer, resume that honours or refuses changes, no mixed
logs, a full disk that loses nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import TINY
from conftest import flags as engine_flags

from vit.engine.checkpoint import load_checkpoint
from vit.engine.rundir import RunLock
from vit.train import main

ROOT = Path(__file__).resolve().parents[1]
# Four steps an epoch.
RUN = {**TINY, "batch_size": 32}


def flags(out: Path, **overrides) -> list[str]:
    return engine_flags({**RUN, **overrides, "out_dir": str(out)})


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------
# One writer
# ----------------------------------------------------------------------------------------------
def test_a_second_process_into_a_locked_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py")]
    slow = flags(out, epochs=1000, seed=1)  # runs until stopped below
    first = subprocess.Popen([*cmd, *slow], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / ".lock.owner").exists() and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[1].decode()
        time.sleep(0.01)
    second = subprocess.run(
        [*cmd, *flags(out, seed=2)], env=env, capture_output=True, text=True, timeout=120
    )
    assert first.poll() is None, "the first run ended before the second started"
    first.send_signal(signal.SIGTERM)  # it saves and stops
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err.decode()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.count("\n") == 1
    assert f"is in use by another run (pid {first.pid} on " in second.stderr
    # The folder holds the first run alone: its config, its checkpoints; the lock is free again.
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1
    assert not (out / ".lock.owner").exists() and not list(out.glob("config.*.yaml"))
    with RunLock(out):
        pass


def test_the_lock_of_a_dead_process_never_blocks(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves its lock files; the kernel released the lock itself."""
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys, os, signal; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
        "from vit.engine.rundir import RunLock; RunLock(Path(sys.argv[1])).__enter__(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    dead = subprocess.run([sys.executable, "-c", code, str(out), str(ROOT)], check=False)
    assert dead.returncode == -signal.SIGKILL and (out / ".lock.owner").exists()
    assert main(flags(out)) == 0


# ----------------------------------------------------------------------------------------------
# Resume honours or refuses
# ----------------------------------------------------------------------------------------------
def test_extending_a_finished_run_trains_the_extra_epochs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(flags(out)) == 0
    capsys.readouterr()
    assert main([*flags(out, epochs=3), "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["steps"] == 3 * 4  # 4 steps per epoch
    assert "resume: epochs: 1 -> 3" in captured.err
    assert "schedule: from step 4 to 12, cosine from lr 0.001 (a warm restart" in captured.err
    # config.yaml holds what the run uses now; the first version is kept.
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 3
    assert yaml.safe_load((out / "config.0.yaml").read_text())["epochs"] == 1
    progress = load_checkpoint(out / "last.pt")["progress"]
    assert (progress["restart_step"], progress["total_steps"]) == (4, 12)


def test_an_extended_run_resumes_exactly(tmp_path: Path, sigterm_at_step, capsys) -> None:
    from vit.engine.classification import ClassificationTask

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(flags(out)) == 0
    assert main([*flags(a, epochs=3), "--resume", "auto"]) == 0
    disarm = sigterm_at_step(ClassificationTask, 7)  # inside the extension, mid-epoch
    assert main([*flags(b, epochs=3), "--resume", "auto"]) == 128 + signal.SIGTERM
    disarm()
    assert main([*flags(b, epochs=3), "--resume", "auto"]) == 0
    assert _max_diff(_weights(a / "last.pt"), _weights(b / "last.pt")) <= 1e-6
    capsys.readouterr()


def test_changes_that_break_exact_resume_are_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(flags(out, epochs=2)) == 0
    before = _files(out)
    capsys.readouterr()
    assert main([*flags(out, epochs=2, batch_size=64, seed=3), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume with a changed batch_size, seed (batch_size: 32 ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _files(out) == before  # nothing rewritten, config.yaml included


def test_resume_auto_on_a_finished_run_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(flags(out)) == 0
    capsys.readouterr()
    assert main([*flags(out), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"the run in {out} is complete (4 steps, 1 epochs)" in err
    assert "pass --epochs N (more than 1) with --resume auto" in err


def test_resume_from_elsewhere_never_overwrites_another_run(tmp_path: Path, capsys) -> None:
    other, target = tmp_path / "other", tmp_path / "target"
    assert main(flags(other, seed=1)) == 0
    assert main(flags(target, seed=2)) == 0
    before = _files(target)
    capsys.readouterr()
    argv = [*flags(target, seed=1), "--resume", str(other / "last.pt")]
    assert main(argv) == 2
    assert "which holds another run" in capsys.readouterr().err
    assert _files(target) == before
    # Into an empty folder, it continues there.
    assert main([*flags(tmp_path / "fresh", seed=1), "--resume", str(other / "last.pt")]) == 0


def test_leftovers_of_a_run_without_checkpoint_are_refused_then_overwritten(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 2, "loss": 9.0}\n')
    (out / "events.out.tfevents.1.host").write_bytes(b"old")
    assert main(flags(out)) == 2
    err = capsys.readouterr().err
    assert "holds the logs of a run that saved no checkpoint (metrics.jsonl, events" in err
    assert main([*flags(out), "--overwrite"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") != 9.0 for r in records)
    assert not (out / "events.out.tfevents.1.host").exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(
    tmp_path: Path, sigterm_at_step, capsys
) -> None:
    from vit.engine.classification import ClassificationTask

    out = tmp_path / "run"
    disarm = sigterm_at_step(ClassificationTask, 6)
    assert main(flags(out, epochs=2)) == 128 + signal.SIGTERM
    disarm()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    assert main([*flags(out, epochs=2), "--resume", "auto"]) == 0
    assert "dropped a torn last line of" in capsys.readouterr().err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] >= 0 for line in lines)


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------
def test_a_full_disk_keeps_the_last_checkpoint_and_exits_1(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The third save (epoch 2's best.pt) fails with ENOSPC after writing part of the file."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    assert main(flags(whole, epochs=3)) == 0
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            path.write(b"partial")  # a file object: vit.fileio.atomic_write's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(flags(out, epochs=3)) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"error: cannot save {out / 'best.pt'}: ")
    assert "the disk is full" in last and "from the previous save is intact" in last
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 4
    monkeypatch.setattr(torch, "save", real)
    assert main([*flags(out, epochs=3), "--resume", "auto"]) == 0
    assert _max_diff(_weights(whole / "last.pt"), _weights(out / "last.pt")) <= 1e-6
