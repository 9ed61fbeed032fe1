"""vit.data: synthetic shapes and their boxes, image folders and their cache, deterministic
augmentation and data order, clear errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit import data
from vit.data import (
    AugmentPolicy,
    DataError,
    EpochBatchSampler,
    ImageDataset,
    build_transform,
    image_folder,
    make_loader,
    split_indices,
    synthetic,
)


def test_synthetic_is_deterministic_and_boxes_are_exact() -> None:
    x, y, boxes = synthetic(50, img_size=32, seed=3, noise=0.0)
    x2, y2, boxes2 = synthetic(50, img_size=32, seed=3, noise=0.0)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(boxes, boxes2)
    assert x.dtype == torch.uint8 and x.shape == (50, 32, 32, 3)
    assert set(y.tolist()) <= set(range(len(data.SYNTHETIC_CLASSES)))
    for img, (x0, y0, x1, y1) in zip(x, boxes.long().tolist(), strict=True):
        # Without noise the background is one colour: everything else is the object.
        obj = (img != img[0, 0]).any(-1)
        ys, xs = torch.nonzero(obj, as_tuple=True)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    other = synthetic(50, img_size=32, seed=4)[0]
    assert not torch.equal(x, other)


def test_augmentation_is_a_function_of_seed_epoch_index() -> None:
    x, y, _ = synthetic(16, img_size=32, seed=0)
    tf = build_transform(32, AugmentPolicy(crop_padding=4, hflip=True, randaugment_ops=2, cutout=8))
    ds = ImageDataset(x, y, data.SYNTHETIC_CLASSES, transform=tf, seed=7)
    a = torch.stack([ds[(2, i)][0] for i in range(16)])
    # Another order of access and a fresh pipeline give the same pixels.
    ds2 = ImageDataset(
        x,
        y,
        data.SYNTHETIC_CLASSES,
        transform=build_transform(
            32, AugmentPolicy(crop_padding=4, hflip=True, randaugment_ops=2, cutout=8)
        ),
        seed=7,
    )
    b = torch.stack([ds2[(2, i)][0] for i in reversed(range(16))]).flip(0)
    assert torch.equal(a, b)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.uint8
    assert not torch.equal(a, torch.stack([ds[(3, i)][0] for i in range(16)]))  # epoch matters
    other_seed = ImageDataset(x, y, data.SYNTHETIC_CLASSES, transform=tf, seed=8)
    assert not torch.equal(a, torch.stack([other_seed[(2, i)][0] for i in range(16)]))
    # Plain integer keys (validation) are never augmented.
    assert torch.equal(ds[5][0], x[5].permute(2, 0, 1))


def test_loader_workers_do_not_change_batches() -> None:
    x, y, _ = synthetic(40, img_size=16, seed=0)
    tf = build_transform(16, AugmentPolicy(crop_padding=2, hflip=True, randaugment_ops=1))
    ds = ImageDataset(x, y, data.SYNTHETIC_CLASSES, transform=tf, seed=1)
    batches = []
    for workers in (0, 1):
        loader = make_loader(ds, 8, seed=1, shuffle=True, drop_last=True, workers=workers)
        loader.batch_sampler.set_epoch(3)
        batches.append([b for b, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_epoch_sampler_order_and_mid_epoch_start() -> None:
    s = EpochBatchSampler(10, 3, seed=5, shuffle=True, drop_last=True)
    s.set_epoch(1)
    full = list(s)
    assert len(full) == 3 and all(e == 1 for b in full for e, _ in b)
    assert len({i for b in full for _, i in b}) == 9  # no repeats, one dropped
    s.set_epoch(1, start=2)
    assert list(s) == full[2:]
    s.set_epoch(2)
    assert [i for b in s for _, i in b] != [i for b in full for _, i in b]
    s = EpochBatchSampler(10, 4, seed=0, shuffle=False, drop_last=False)
    assert [[i for _, i in b] for b in s] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _folder(root: Path, classes: dict[str, int], size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)  # not square
            Image.fromarray(img).save(root / name / f"{i}.png")


def test_image_folder_decodes_once_and_caches(tmp_path: Path, monkeypatch) -> None:
    _folder(tmp_path / "train", {"cat": 3, "dog": 2})
    x, y, classes = image_folder(tmp_path / "train", img_size=8, cache_dir=tmp_path / "cache")
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1]
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.uint8  # resized + centre-cropped
    # A read-only map of the one cache file, shared by every process that reads the folder.
    assert isinstance(x, np.memmap) and x.filename and not x.flags.writeable
    assert len(list((tmp_path / "cache").glob("imagefolder-*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("vit.preprocess.decode_image", no_decoding)
    x2, y2, _ = image_folder(tmp_path / "train", img_size=8, cache_dir=tmp_path / "cache")
    assert np.array_equal(x, x2) and torch.equal(y, y2)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        image_folder(tmp_path / "missing", img_size=8, cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path / "empty", img_size=8, cache_dir=tmp_path)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        image_folder(tmp_path / "noimg", img_size=8, cache_dir=tmp_path)
    _folder(tmp_path / "bad", {"cat": 2})
    (tmp_path / "bad" / "cat" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg.*delete or replace"):
        image_folder(tmp_path / "bad", img_size=8, cache_dir=tmp_path)


def test_split_is_stratified_and_deterministic() -> None:
    labels = torch.tensor([0] * 20 + [1] * 10)
    train, val = split_indices(labels, 0.2)
    assert labels[val].tolist().count(0) == 4 and labels[val].tolist().count(1) == 2
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 30
    assert torch.equal(val, split_indices(labels, 0.2)[1])
    with pytest.raises(DataError, match="too few"):
        split_indices(torch.tensor([0, 1]), 0.5)


def test_cifar10_offline_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            if download:
                raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*--data imagefolder.*synthetic"):
        data.cifar10(tmp_path, train=True)
