"""vit.data.cache: the memory-mapped decoded-image cache. One decoding shared by processes, a
dataset larger than the memory a training process may use trains, mapped and in-memory images give
the same samples and batches."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.data import AugmentPolicy, DeviceLoader, ImageDataset, build_transform, image_folder

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, n: int, classes: int = 2, size: tuple[int, int] = (8, 10)) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            img[..., c % 3] = 200  # a class cue
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_independent_processes_decode_a_folder_once(tmp_path: Path) -> None:
    """Two processes started together on one folder and cache folder (no torchrun): the file
    lock lets one decode; the other maps its cache. Both see the same images."""
    _folder(tmp_path / "data", 30)
    code = """
        import hashlib, sys
        import numpy as np
        from vit.data import image_folder
        x, y, _ = image_folder(sys.argv[1], img_size=16, cache_dir=sys.argv[2])
        print(type(x).__name__, hashlib.sha1(np.ascontiguousarray(x)).hexdigest())
    """
    procs = [_python(code, str(tmp_path / "data"), str(tmp_path / "cache")) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("memmap ")
    assert sum(err.count("(cached for next time)") for _, err in outs) == 1  # decoded once
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_a_changed_folder_is_decoded_again(tmp_path: Path) -> None:
    _folder(tmp_path / "data", 3)
    x, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "cache")
    img = np.full((8, 10, 3), 7, dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "data" / "c0" / "0.png")
    x2, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert (x2[0] == 7).all() and not np.array_equal(x[0], x2[0])
    assert np.array_equal(x[1:], x2[1:])


def test_an_unwritable_cache_folder_decodes_in_memory(tmp_path: Path, capsys) -> None:
    _folder(tmp_path / "data", 3)
    x, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "cache")
    (tmp_path / "file").write_text("not a folder")
    x2, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "file")
    assert not isinstance(x2, np.memmap) and not x2.flags.writeable
    assert np.array_equal(x, x2)
    assert "cannot write the decoded-image cache" in capsys.readouterr().err


def test_mapped_and_in_memory_images_give_the_same_samples(tmp_path: Path) -> None:
    """An ImageDataset over the read-only map (rows of a split, augmented or not) yields what
    one over an in-memory tensor does, and writable tensors; the device loader's batches too,
    resident or gathered from the map a batch at a time."""
    _folder(tmp_path / "data", 20)
    mapped, labels, classes = image_folder(tmp_path / "data", img_size=12, cache_dir=tmp_path)
    rows = torch.arange(40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))][:30]
    memory = torch.from_numpy(np.array(mapped))
    a = ImageDataset(mapped, labels[rows], classes, rows=rows)
    b = ImageDataset(memory[rows], labels[rows], classes)
    assert torch.equal(a.gather(torch.tensor([5, 0, 29, 5])), b.gather(torch.tensor([5, 0, 29, 5])))
    policy = AugmentPolicy(crop_padding=2, hflip=True, randaugment_ops=2, cutout=3)
    a, b = (d.with_transform(build_transform(12, policy), seed=1) for d in (a, b))
    for key in (3, (0, 3), (2, 17)):
        (xa, ya), (xb, yb) = a[key], b[key]
        assert torch.equal(xa, xb) and ya == yb
        xa[0, 0, 0] = 1  # a copy, not the read-only map
    kw = {"device": "cpu", "seed": 2, "shuffle": True, "drop_last": False, "policy": policy}
    streamed = DeviceLoader(a, 8, **kw)
    assert not streamed.resident  # a memory map is read a batch at a time, not copied
    resident = DeviceLoader(b, 8, **kw)
    assert resident.resident
    for loader in (streamed, resident):
        loader.batch_sampler.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(streamed, resident, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# The training process's data segment (RLIMIT_DATA: heap and private writable mappings, what a
# decoded array read into memory would occupy) may grow by HEADROOM beyond what importing torch
# left it; the decoded images are twice that. A read-only file mapping is not counted, so the
# map of the cache trains while a copy in memory cannot be made (checked in the same process).
HEADROOM = 256 << 20


def test_a_dataset_larger_than_the_memory_limit_trains_one_epoch(tmp_path: Path) -> None:
    img_size = 160
    per_image = img_size * img_size * 3
    n = -(-2 * HEADROOM // per_image) // 2 + 1  # per class, two classes
    _folder(tmp_path / "data" / "train", n, size=(6, 6))
    nbytes = 2 * n * per_image
    assert nbytes > 2 * HEADROOM
    code = """
        import json, resource, sys
        import numpy as np
        # What the run imports, before its data size is measured: the limit is for data.
        import torch, vit.data, vit.engine.classification, vit.engine.trainer
        from torch.utils.tensorboard import SummaryWriter
        from vit.train import main

        def data_size() -> int:
            line = next(l for l in open("/proc/self/status") if l.startswith("VmData"))
            return int(line.split()[1]) << 10

        nbytes, headroom = int(sys.argv[1]), int(sys.argv[2])
        limit = data_size() + headroom
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        rc = main(sys.argv[3:])
        try:  # the limit was in force: the images could not have been held in memory
            np.ones(nbytes, np.uint8)
            held = True
        except MemoryError:
            held = False
        print(json.dumps({"rc": rc, "limit": limit, "in_memory_possible": held}))
    """
    run = {
        "config": "none",  # the built-in defaults, not the image-folder recipe
        "data": "imagefolder",
        "data_dir": str(tmp_path / "data"),
        "cache_dir": str(tmp_path / "cache"),
        "img_size": img_size,
        "model_args": "{embed_dim: 16, depth: 1, num_heads: 2, patch_size: 32}",
        "batch_size": 64,
        "epochs": 1,
        "val_fraction": 0.05,
        "crop_padding": 8,
        "rollout_every": 0,
        "device": "cpu",
        "threads": 1,
        "out_dir": str(tmp_path / "run"),
    }
    argv = [a for k, v in run.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    proc = _python(code, str(nbytes), str(HEADROOM), *argv)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) >= 2, err[-3000:]
    result, report = json.loads(lines[-1]), json.loads(lines[-2])
    assert result == {"rc": 0, "limit": result["limit"], "in_memory_possible": False}
    assert report["steps"] == int(2 * n * 0.95) // 64  # one full epoch
    (cache,) = (tmp_path / "cache").glob("imagefolder-*.npy")
    assert cache.stat().st_size > nbytes > 2 * HEADROOM


@pytest.mark.parametrize("corrupt", ["json", "npy"])
def test_cache_files_are_replaced_whole(tmp_path: Path, corrupt: str) -> None:
    """The metadata file is the completion mark: without a readable one the array is decoded
    again, never half-trusted; no temporary files are left behind."""
    _folder(tmp_path / "data", 2)
    x, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "cache")
    (npy,) = (tmp_path / "cache").glob("*.npy")
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["shape"] == [4, 8, 8, 3] and meta["meta"]["labels"] == [0, 0, 1, 1]
    digest = hashlib.sha1(np.ascontiguousarray(x)).hexdigest()
    if corrupt == "json":
        npy.with_suffix(".json").write_text(json.dumps({**meta, "shape": [4, 8, 8, 4]}))
    else:
        with npy.open("r+b") as f:
            f.truncate(npy.stat().st_size - 1)
    x2, _, _ = image_folder(tmp_path / "data", img_size=8, cache_dir=tmp_path / "cache")
    assert hashlib.sha1(np.ascontiguousarray(x2)).hexdigest() == digest
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()) == [
        "json",
        "lock",
        "npy",
    ]


@pytest.mark.gpu
def test_device_loader_streams_a_mapped_dataset_to_cuda_as_it_would_hold_it(tmp_path: Path) -> None:
    """On CUDA: batches gathered from the map on the host, pinned and copied (``resident=False``,
    a dataset larger than the GPU) equal those of the images held on the GPU."""
    x = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:250]
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    ds = ImageDataset(mapped, torch.arange(250) % 10, [str(i) for i in range(10)], rows=rows)
    policy = AugmentPolicy(crop_padding=2, hflip=True, randaugment_ops=2, cutout=4)
    kw = {"device": "cuda", "seed": 1, "shuffle": True, "drop_last": True, "policy": policy}
    streamed, resident = DeviceLoader(ds, 32, resident=False, **kw), DeviceLoader(ds, 32, **kw)
    assert resident.resident and not streamed.resident
    for loader in (streamed, resident):
        loader.batch_sampler.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(streamed, resident, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_mapped_dataset_pickles_as_its_file_name(tmp_path: Path) -> None:
    """DataLoader workers started by spawn receive the dataset pickled: a mapped cache must
    travel as its file name, not as a copy of the images."""
    import pickle

    _folder(tmp_path / "data", 50, size=(32, 32))
    mapped, labels, classes = image_folder(tmp_path / "data", img_size=32, cache_dir=tmp_path)
    ds = ImageDataset(mapped, labels[:60], classes, rows=torch.arange(20, 80))
    blob = pickle.dumps(ds)
    assert len(blob) < mapped.nbytes // 10  # 300 KiB of images, a few KiB pickled
    copy = pickle.loads(blob)
    assert isinstance(copy.images, np.memmap) and not copy.images.flags.writeable
    assert torch.equal(copy.gather(torch.arange(60)), ds.gather(torch.arange(60)))
    in_memory = ImageDataset(torch.from_numpy(np.array(mapped)), labels, classes)
    assert len(pickle.dumps(in_memory)) > mapped.nbytes  # a tensor still travels whole
