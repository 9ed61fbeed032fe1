"""DDP: ``torchrun --nproc_per_node 2 train.py`` (gloo, CPU, loopback) matches a single-process run
with the same global batch; the ranks' shares of the engine's batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vit.data import DeviceLoader, ImageDataset, make_loader, synthetic
from vit.engine.checkpoint import load_checkpoint
from vit.train import main

ROOT = Path(__file__).resolve().parents[1]

# No dropout, drop path or mixup: one global batch split over two ranks is then the same
# computation as the whole batch in one process (each rank's loss is its mean, DDP averages the
# gradients). Crop/flip/cutout are per-sample functions of (seed, epoch, index), so they match too.
RUN = {
    "data": "synthetic",
    "synthetic_train": 128,
    "synthetic_val": 40,
    "img_size": 16,
    "model_args": "{embed_dim: 32, depth: 2, num_heads: 2}",
    "batch_size": 32,
    "epochs": 2,
    "rollout_every": 0,
    "log_every": 2,
    "device": "cpu",
    "cutout": 4,
}


def _argv(out: Path, **extra: object) -> list[str]:
    values = {**RUN, **extra, "out_dir": str(out)}
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


# ~25 s each on 2 cores; the device loader's rank shares are also checked in-process below.
# Muon: the two ranks split the Newton-Schulz iterations and exchange the results.
@pytest.mark.parametrize(
    ("loader", "optimizer"),
    [("cpu", "adamw"), ("cpu", "muon"), pytest.param("device", "adamw", marks=pytest.mark.slow)],
)
def test_two_gloo_processes_match_one_process(
    tmp_path: Path, loader: str, optimizer: str, capsys
) -> None:
    extra = {"loader": loader, "optimizer": optimizer}
    assert main(_argv(tmp_path / "single", **extra)) == 0
    single_result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "train.py"), *_argv(tmp_path / "ddp", **extra)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, proc.stdout  # only rank 0 reports
    ddp_result = results[0]

    single = load_checkpoint(tmp_path / "single" / "last.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["progress"] == single["progress"]
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, atol=1e-5, rtol=0, msg=name)
    # Validation is sharded over the ranks and all-reduced: the same sums as one process.
    assert ddp_result["n"] == single_result["n"] == RUN["synthetic_val"]
    assert ddp_result["top1"] == single_result["top1"]
    assert abs(ddp_result["loss"] - single_result["loss"]) < 1e-5
    # Each rank's RNG state is kept for exact resume.
    assert len(ddp["rng"]["ranks"]) == 2
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in map(json.loads, lines) if r["kind"] == "val"]) == RUN["epochs"]


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_shares_partition_each_global_batch(drop_last: bool) -> None:
    x, y, _ = synthetic(50, img_size=12)
    ds = ImageDataset(x, y, [str(i) for i in range(10)])
    kw = {"seed": 3, "shuffle": True, "drop_last": drop_last}

    def batches(world: int, rank: int, device: bool) -> list[torch.Tensor]:
        if device:
            loader = DeviceLoader(ds, 16, device="cpu", rank=rank, world_size=world, **kw)
        else:
            loader = make_loader(ds, 16, rank=rank, world_size=world, **kw)
        loader.batch_sampler.set_epoch(2, start=1)
        return [b[1] for b in loader]

    for device in (False, True):
        whole = batches(1, 0, device)
        shares = [batches(3, r, device) for r in range(3)]
        assert len(whole) == (2 if drop_last else 3)
        for b, labels in enumerate(whole):
            # A share of a short last batch can be empty and is then skipped (no empty batches).
            parts = [s[b] for s in shares if b < len(s)]
            assert torch.equal(torch.cat(parts), labels)
        assert [len(s) for s in shares] == ([2, 2, 2] if drop_last else [2, 3, 3])


def test_batch_size_must_divide_among_ranks(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(_argv(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "batch_size 32 is the global batch" in err and "multiple of 3" in err


@pytest.mark.slow  # three torchrun launches, ~45 s
def test_ddp_sigterm_and_resume_is_exact(tmp_path: Path) -> None:
    """SIGTERM to torchrun mid-run: the ranks agree on a step, rank 0 saves; resuming (drop path
    on, so each rank's own RNG stream matters) ends with the uninterrupted run's weights."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = {"epochs": 6, "drop_path": 0.1, "synthetic_train": 256}

    def launch(out: Path, *more: str) -> subprocess.Popen:
        argv = [*cmd, str(ROOT / "train.py"), *_argv(out, **extra), *more]
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)

    assert launch(tmp_path / "a").wait(timeout=240) == 0
    killed = launch(tmp_path / "b")
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"val"' in metrics.read_text()):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    killed.send_signal(signal.SIGTERM)
    killed.wait(timeout=120)
    stopped = load_checkpoint(tmp_path / "b" / "last.pt")["progress"]["step"]
    assert 0 < stopped < 48
    assert launch(tmp_path / "b", "--resume", "auto").wait(timeout=240) == 0
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["progress"] == b["progress"]
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_folder(root: Path, n: int = 40, classes: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            img[:, :, c % 3] = 40 * c  # a class cue, so the model learns something
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")


def test_two_nodes_on_loopback_match_one_process(tmp_path: Path, capsys) -> None:
    """Two torchrun invocations (``--nnodes 2 --node_rank 0/1``, c10d rendezvous on a free
    loopback port), two processes each, train on an image folder: the weights equal a
    single-process run's with the same global batch and seed. Each "machine" (its own
    --cache-dir) decodes the folder once, by its local rank 0, and only global rank 0 writes
    the run directory."""
    _image_folder(tmp_path / "data" / "train")
    extra = {"data": "imagefolder", "data_dir": str(tmp_path / "data"), "val_fraction": 0.25}
    extra |= {"epochs": 1, "workers": 0, "config": "none"}  # no recipe, no time limit
    args = _argv(tmp_path / "single", **extra, cache_dir=tmp_path / "cache-single")
    assert main(args) == 0
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--nproc_per_node", "2", "--node_rank", str(node), "--rdzv_backend", "c10d"]
        cmd += ["--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes"]
        out = tmp_path / f"node{node}"  # each node's own disk: run directory and cache
        argv = _argv(out / "run", **extra, cache_dir=out / "cache")
        nodes.append(
            subprocess.Popen(
                [*cmd, str(ROOT / "train.py"), *argv],
                env=env,
                cwd=out.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, (_, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    single = load_checkpoint(tmp_path / "single" / "last.pt")
    # Global rank 0 wrote the run; which node holds it is the rendezvous' choice.
    runs = [tmp_path / f"node{n}" / "run" for n in (0, 1)]
    written = [r for r in runs if (r / "last.pt").exists()]
    assert len(written) == 1
    other = next(r for r in runs if r not in written)
    assert not other.exists() or not any(other.iterdir())  # the other node writes nothing
    ddp = load_checkpoint(written[0] / "last.pt")
    assert ddp["world_size"] == 4 and ddp["progress"] == single["progress"]
    # Four ranks add their gradients in another order than one process; AdamW's normalised step
    # turns that rounding into up to 2e-5 here (a one-machine 4-process run differs as much).
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, atol=5e-5, rtol=0, msg=name)
    for n, (_, err) in enumerate(outputs):
        # One decoding per machine (two splits of one folder: one cache), by local rank 0.
        assert len(list((tmp_path / f"node{n}" / "cache").glob("imagefolder-*.npy"))) == 1
        assert err.count("(cached for next time)") == 1, err


@pytest.mark.slow  # two torchrun "machines", then a resume in one process, ~60 s
def test_a_two_node_run_resumes_in_one_process(tmp_path: Path, capsys) -> None:
    """SIGTERM to both machines' torchrun after the first epoch: the ranks agree on a step,
    global rank 0 saves; one process resumes that checkpoint (world 2 -> 1, which divides the
    batch; no random draw depends on the rank) and ends with the weights of an uninterrupted
    one-process run."""
    import signal
    import time

    extra = {"epochs": 4, "synthetic_train": 256, "cutout": 0, "crop_padding": 0, "config": "none"}
    assert main([*_argv(tmp_path / "single", **extra), "--no-hflip"]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port, nodes = _free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d"]
        cmd += ["--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "resume"]
        argv = [*_argv(tmp_path / f"node{node}", **extra), "--no-hflip"]
        nodes.append(
            subprocess.Popen(
                [*cmd, str(ROOT / "train.py"), *argv],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            logs = [tmp_path / f"node{n}" / "metrics.jsonl" for n in (0, 1)]
            if any(m.exists() and '"val"' in m.read_text() for m in logs):
                break
            assert all(p.poll() is None for p in nodes) and time.monotonic() < deadline
            time.sleep(0.2)
        for p in nodes:
            p.send_signal(signal.SIGTERM)
        for p in nodes:
            p.wait(timeout=120)
    finally:
        for p in nodes:
            p.kill()
    (run,) = [tmp_path / f"node{n}" for n in (0, 1) if (tmp_path / f"node{n}" / "last.pt").exists()]
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["world_size"] == 2 and 0 < stopped["progress"]["step"] < 32
    resumed = [*_argv(run, **extra), "--no-hflip", "--resume", "auto"]
    assert main(resumed) == 0
    assert "processes: 2 -> 1" in capsys.readouterr().err
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["progress"] == b["progress"]
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=1e-5, rtol=0, msg=name)
