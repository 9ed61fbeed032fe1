"""Memory of 1, 2 and 4 local training processes on one image folder: the decoded-image cache is
one memory-mapped file per machine, so the page cache holds the images once however many
processes train on them.

Writes a generated image folder (``--images`` PNG files, decoded to ``--img-size`` pixels:
``--images x img_size^2 x 3`` bytes), decodes it into the cache once (not measured), then for
each process count runs ``torchrun --standalone --nproc_per_node P train.py`` on it (a small ViT,
CPU, ``--epochs`` epochs: every image is read) while sampling every process's
``/proc/<pid>/smaps_rollup`` together every ``--interval`` seconds. PSS (proportional set size)
counts a page shared by k processes as 1/k in each, so the sum over the processes is the memory
they hold together. Each process also holds a few hundred MiB of its own (the interpreter,
torch, allocator pools: "anon"), so the total approaches one process's as the data outgrows that.
The table shows each process's PSS (anonymous / file-backed) at the sample
where the total peaked, and the total against one process.

    python benchmarks/shared_memory.py [--images 12288 --img-size 224 --procs 1 2 4]
    python benchmarks/shared_memory.py --quick   # a check of the script: small folder, 1 and 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchmarks.machine import describe_cpu  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 10, side: int = 48) -> None:
    """``n`` small noise PNGs with a class colour cue (decoding resizes them up)."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(n):
        c = i % classes
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        img[..., c % 3] = 25 * c
        Image.fromarray(img).save(folder / f"{i:06d}.png", compress_level=1)


def smaps(pid: int) -> dict[str, int] | None:
    """``Pss``, ``Pss_Anon``, ``Pss_File`` and ``Rss`` of a process in bytes (None once gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File", "Rss"):
            out[key] = int(rest.split()[0]) << 10
    return out


def workers(parent: int) -> list[int]:
    """The training processes: the children of torchrun's process that run train.py."""
    found = []
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (child / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"train.py" in cmd:
            found.append(int(child.name))
    return sorted(found)


def run(procs: int, args: argparse.Namespace, data: Path, cache: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(procs), str(ROOT / "train.py")]
    cmd += ["--data", "imagefolder", "--data-dir", str(data), "--cache-dir", str(cache)]
    cmd += ["--img-size", str(args.img_size), "--model-args", args.model_args]
    cmd += ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    cmd += ["--device", "cpu", "--threads", "1", "--rollout-every", "0", "--workers", "0"]
    cmd += ["--out-dir", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    best: dict = {"total": 0, "per_process": []}
    while proc.poll() is None:
        sample = [s for s in map(smaps, workers(proc.pid)) if s is not None]
        total = sum(s["Pss"] for s in sample)
        if len(sample) == procs and total > best["total"]:
            best = {"total": total, "per_process": sample}
        time.sleep(args.interval)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"torchrun with {procs} processes failed:\n{err[-3000:]}")
    if not best["per_process"]:
        raise SystemExit(f"no sample of all {procs} processes; lower --interval")
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=12288)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--model-args", default="{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 32}"
    )
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--work-dir", type=Path, help="keep the folder and cache here (default: temp)")
    ap.add_argument("--quick", action="store_true", help="1024 images of 96 px, 1 and 2 processes")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.img_size, args.procs = 1024, 96, [1, 2]
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        data, cache = work / "folder", work / "cache"
        if not (data / "train").is_dir():
            make_folder(data, args.images)
        from vit.data import image_folder

        images, _, _ = image_folder(data / "train", img_size=args.img_size, cache_dir=cache)
        nbytes = images.nbytes
        del images
        print(
            f"{describe_cpu()}, torch {torch.__version__}; {args.images} images of "
            f"{args.img_size} px = {nbytes / 2**20:.0f} MiB decoded; PSS in MiB at the peak of "
            f"the total"
        )
        print()
        print("| processes | each process: PSS (anon + file) | total (anon + file) | vs 1 |")
        print("|---|---|---|---|")
        base = None
        for p in args.procs:
            best = run(p, args, data, cache, work / f"run{p}")
            mib = 1 / 2**20
            each = ", ".join(
                f"{s['Pss'] * mib:.0f} ({s['Pss_Anon'] * mib:.0f} + {s['Pss_File'] * mib:.0f})"
                for s in best["per_process"]
            )
            if p == 1:
                base = best["total"]
            ratio = f"{best['total'] / base:.2f}x" if base else "-"
            anon = sum(s["Pss_Anon"] for s in best["per_process"]) * mib
            file = sum(s["Pss_File"] for s in best["per_process"]) * mib
            total = f"{best['total'] * mib:.0f} ({anon:.0f} + {file:.0f})"
            print(f"| {p} | {each} | {total} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
