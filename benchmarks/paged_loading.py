"""Loading and augmenting from the memory-mapped decoded cache with a cold and a warm page cache:
images/s of the CPU loader (albumentations, ``--workers`` processes) and of the device loader
(``vit.data.DeviceLoader`` reading batches from the map on the host, ``resident=False``, as for a
dataset larger than the device's memory) on the CIFAR recipe's policy (crop after 4 pixels of
padding, flip, two RandAugment operations at magnitude 9, an 8-pixel cutout).

Writes ``--images`` random images of ``--img-size`` pixels as the cache's ``.npy`` in
``--work-dir`` (on the disk to measure, not a tmpfs), then times one shuffled pass per loader and
cache state, device synchronised:

- cold: the file's pages are dropped from the page cache before the pass with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (unprivileged; ``/proc/sys/vm/drop_caches`` is not
  needed), so every image is read from disk in the shuffled order training reads it;
- warm: after a pass that read every page.

The "resident" column is the share of the file in the page cache when the pass started
(``mincore``), which shows the cold pass really started cold.

    python benchmarks/paged_loading.py [--images 65536 --img-size 64 --workers 2 --device cuda]
    python benchmarks/paged_loading.py --quick   # a check of the script
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.data import AugmentPolicy, DeviceLoader, ImageDataset, build_transform, make_loader

POLICY = AugmentPolicy(
    crop_padding=4, hflip=True, randaugment_ops=2, randaugment_magnitude=9.0, cutout=8
)


def resident_share(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` of a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        vec = ctypes.create_string_buffer(pages)
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / pages


def drop(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (they are not mapped at this point)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_pass(name: str, path: Path, args: argparse.Namespace, device: torch.device) -> float:
    images = np.load(path, mmap_mode="r")  # a fresh map, as each training process has
    n = len(images)
    ds = ImageDataset(images, torch.zeros(n, dtype=torch.long), ["0"])
    order = {"seed": 0, "shuffle": True, "drop_last": False}
    if name == "cpu":
        ds = ds.with_transform(build_transform(args.img_size, POLICY), 0)
        loader = make_loader(ds, args.batch_size, workers=args.workers, **order)
    else:
        loader = DeviceLoader(
            ds, args.batch_size, device=device, policy=POLICY, resident=False, **order
        )
    loader.batch_sampler.set_epoch(1)
    t0 = time.perf_counter()
    for x, _ in loader:
        if name == "cpu" and device.type == "cuda":
            x.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del loader
    return n / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=65536)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loaders", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    ap.add_argument("--work-dir", type=Path, default=Path.cwd(), help="where the file is written")
    ap.add_argument("--quick", action="store_true", help="4096 images of 32 px")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.img_size, args.batch_size = 4096, 32, 256
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix=".paged-loading-") as tmp:
        path = Path(tmp) / "images.npy"
        out = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(args.images, args.img_size, args.img_size, 3)
        )
        rng = np.random.default_rng(0)
        for lo in range(0, args.images, 4096):
            hi = min(lo + 4096, args.images)
            out[lo:hi] = rng.integers(0, 256, (hi - lo, *out.shape[1:]), dtype=np.uint8)
        out.flush()
        del out
        size_mib = path.stat().st_size / 2**20
        where = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
        print(
            f"{describe_cpu()}, {where}, torch {torch.__version__}; {args.images} images of "
            f"{args.img_size} px ({size_mib:.0f} MiB) in {args.work_dir}; batch "
            f"{args.batch_size}, CPU loader with {args.workers} workers"
        )
        print()
        print("| loader | page cache | resident at start | images/s |")
        print("|---|---|---|---|")
        for name in args.loaders:
            for state in ("cold", "warm"):
                if state == "cold":
                    drop(path)
                else:
                    timed_pass(name, path, args, device)  # reads every page
                share = resident_share(path)
                rate = timed_pass(name, path, args, device)
                print(f"| {name} | {state} | {share:.0%} | {rate:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
