"""The device-resident loader (vit.data.DeviceLoader) against the CPU albumentations path, on the
CPU device: identical batches without augmentation, identical pixels for the same crop/flip/cutout
parameters, the same parameter distributions, determinism in (seed, epoch, index), and the engine
with --loader device (mixup on top, exact resume)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from vit.data import (
    DeviceLoader,
    ImageDataset,
    augment_batch,
    build_transform,
    make_loader,
    reseed,
    sample_seed,
    uniform_ints,
)
from vit.train import ConfigError, Trainer, load_checkpoint, main, make_config

CLASSES = [str(i) for i in range(10)]


def _dataset(n: int = 64, size: int = 16, seed: int = 0) -> ImageDataset:
    # Random pixels: any misplaced row, column or channel shows.
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.randint(0, 10, (n,), generator=g), CLASSES)


def _cpu_sample(ds: ImageDataset, policy: dict[str, Any], seed: int, epoch: int, index: int):
    """What the CPU pipeline does to one sample: the augmented image (3, H, W) and the parameters
    it drew, in augment_batch's terms."""
    transform = build_transform(ds.img_size, **policy)
    transform.save_applied_params = True
    # The same reseeding as ImageDataset.__getitem__ does for the key (epoch, index).
    reseed(transform, sample_seed(seed, epoch, index))
    out = transform(image=ds.images[index].numpy())
    applied = dict(out["applied_transforms"])
    params: dict[str, Any] = {}
    if "RandomCrop" in applied:
        x0, y0, _, _ = applied["RandomCrop"]["crop_coords"]
        params["crop_xy"] = (x0, y0)
    params["flip"] = "HorizontalFlip" in applied
    if "CoarseDropout" in applied:
        ((hx0, hy0, _, _),) = applied["CoarseDropout"]["holes"].tolist()
        params["cutout_xy"] = (hx0, hy0)
    image = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)
    return image, params


POLICIES = [
    {"crop_padding": 4, "hflip": True, "cutout": 6},
    {"crop_padding": 2, "hflip": False, "cutout": 0},
    {"crop_padding": 0, "hflip": True, "cutout": 0},
    {"crop_padding": 0, "hflip": False, "cutout": 16},  # cutout as large as the image
]


# ----------------------------------------------------------------------------------------------
# Same pixels as the CPU path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_without_augmentation_batches_equal_the_dataloader(shuffle: bool) -> None:
    ds = _dataset(50)
    kw = {"seed": 7, "shuffle": shuffle, "drop_last": shuffle}
    cpu = make_loader(ds, 16, **kw)
    dev = DeviceLoader(ds, 16, device="cpu", **kw)
    for loader in (cpu, dev):
        loader.batch_sampler.set_epoch(3, start=1)  # mid-epoch resume point
    pairs = list(zip(cpu, dev, strict=True))
    assert len(pairs) == (2 if shuffle else 3)
    for (xc, yc), (xd, yd) in pairs:
        assert xd.dtype == torch.uint8 and xd.shape == xc.shape
        assert torch.equal(xc, xd) and torch.equal(yc, yd)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(map(str, p.values())))
def test_same_parameters_give_the_albumentations_pixels(policy: dict[str, Any]) -> None:
    ds = _dataset(48)
    expected, params = [], []
    for i in range(len(ds)):
        image, p = _cpu_sample(ds, policy, seed=5, epoch=2, index=i)
        expected.append(image)
        params.append(p)
    kw: dict[str, Any] = {"crop_padding": policy["crop_padding"], "cutout": policy["cutout"]}
    if policy["crop_padding"]:
        kw["crop_xy"] = torch.tensor([p["crop_xy"] for p in params])
    if policy["hflip"]:
        kw["flip"] = torch.tensor([p["flip"] for p in params])
        assert 0 < kw["flip"].sum() < len(ds)  # both branches exercised
    if policy["cutout"]:
        kw["cutout_xy"] = torch.tensor([p["cutout_xy"] for p in params])
    out = augment_batch(ds.images, **kw)
    assert out.dtype == torch.uint8 and out.shape == (len(ds), 3, 16, 16)
    assert torch.equal(out, torch.stack(expected))


# ----------------------------------------------------------------------------------------------
# Same distributions as the CPU path
# ----------------------------------------------------------------------------------------------
def test_parameter_distributions_match_albumentations() -> None:
    size, pad, cut = 16, 4, 6
    policy = {"crop_padding": pad, "hflip": True, "cutout": cut}
    ds = _dataset(2, size=size)
    loader = DeviceLoader(ds, 2, device="cpu", seed=1, shuffle=True, drop_last=True, **policy)
    n = 40_000
    dev = loader.params(epoch=0, index=torch.arange(n))
    # The CPU pipeline's parameters over many (epoch, index) keys (image content is irrelevant).
    transform = build_transform(size, **policy)
    transform.save_applied_params = True
    image = ds.images[0].numpy()
    cpu = []
    for i in range(1500):
        reseed(transform, sample_seed(1, 0, i))
        cpu.append(dict(transform(image=image)["applied_transforms"]))
    cpu_crop = torch.tensor([a["RandomCrop"]["crop_coords"][:2] for a in cpu])
    cpu_flip = torch.tensor(["HorizontalFlip" in a for a in cpu])
    cpu_hole = torch.tensor([a["CoarseDropout"]["holes"][0, :2].tolist() for a in cpu])

    for dev_v, cpu_v, span in (
        (dev["crop_xy"], cpu_crop, 2 * pad + 1),  # offsets 0..2p in the padded image
        (dev["cutout_xy"], cpu_hole, size - cut + 1),  # the hole stays inside the image
    ):
        for axis in (0, 1):
            assert set(dev_v[:, axis].tolist()) == set(cpu_v[:, axis].tolist()) == set(range(span))
            freq = torch.bincount(dev_v[:, axis], minlength=span).double() / n
            # Uniform: each value within 5 standard errors of 1/span.
            assert (freq - 1 / span).abs().max() < 5 * (1 / span / n) ** 0.5
        # x and y drawn independently (not one shared draw).
        assert not torch.equal(dev_v[:, 0], dev_v[:, 1])
    for flips, count in ((dev["flip"], n), (cpu_flip, len(cpu))):
        assert abs(flips.double().mean().item() - 0.5) < 5 * (0.25 / count) ** 0.5


def _chi2_independence(a: Tensor, b: Tensor) -> tuple[float, int]:
    """Pearson's chi-squared statistic for the independence of two integer samples, and its
    degrees of freedom."""
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a.long(), b.long()), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return ((table - expected) ** 2 / expected).sum().item(), (table.shape[0] - 1) * (
        table.shape[1] - 1
    )


def test_augmentation_parameters_are_independent_draws() -> None:
    """Crop x, crop y, flip and the cutout corner are drawn independently of each other on both
    paths. Seeding each albumentations transform alike (Compose.set_random_seed) made the flip
    follow the crop: 90 of the 162 crop + flip combinations, and weaker augmentation than asked."""
    n = 3000
    policy = {"crop_padding": 4, "hflip": True, "cutout": 6}
    ds = _dataset(n)
    loader = DeviceLoader(ds, 2, device="cpu", seed=1, shuffle=True, drop_last=True, **policy)
    p = loader.params(epoch=0, index=torch.arange(n))
    dev = [p["crop_xy"][:, 0], p["crop_xy"][:, 1], p["flip"], p["cutout_xy"][:, 0]]
    drawn = [_cpu_sample(ds, policy, seed=1, epoch=0, index=i)[1] for i in range(n)]
    cpu = list(torch.tensor([(*d["crop_xy"], d["flip"], d["cutout_xy"][0]) for d in drawn]).T)
    for name, draws in (("device", dev), ("cpu", cpu)):
        assert len({tuple(row) for row in torch.stack(draws[:3], 1).tolist()}) == 9 * 9 * 2
        for i in range(len(draws)):
            for j in range(i + 1, len(draws)):
                chi2, dof = _chi2_independence(draws[i], draws[j])
                assert chi2 < dof + 6 * (2 * dof) ** 0.5, (name, i, j, chi2, dof)


def test_uniform_ints_are_uniform_and_decorrelated() -> None:
    index = torch.arange(100_000)
    a = uniform_ints(0, 0, index, 0, 10)
    freq = torch.bincount(a, minlength=10).double() / len(index)
    assert a.min() >= 0 and a.max() <= 9 and (freq - 0.1).abs().max() < 0.005
    # Other streams, epochs and seeds give other draws.
    for other in (
        uniform_ints(0, 0, index, 1, 10),
        uniform_ints(0, 1, index, 0, 10),
        uniform_ints(1, 0, index, 0, 10),
    ):
        assert (a == other).double().mean().item() == pytest.approx(0.1, abs=0.01)


def test_loader_params_are_the_per_stream_uniform_ints() -> None:
    """params() draws all five streams in one pass; each equals its own uniform_ints."""
    loader = DeviceLoader(
        _dataset(2), 2, device="cpu", seed=3, shuffle=True, drop_last=True,
        crop_padding=4, hflip=True, cutout=6,
    )  # fmt: skip
    index = torch.randperm(1000)
    for epoch in (0, 5, 0):
        p = loader.params(epoch, index)
        expect = {s: uniform_ints(3, epoch, index, s, h) for s, h in enumerate((9, 9, 2, 11, 11))}
        assert torch.equal(p["crop_xy"], torch.stack([expect[0], expect[1]], dim=1))
        assert torch.equal(p["flip"], expect[2].bool())
        assert torch.equal(p["cutout_xy"], torch.stack([expect[3], expect[4]], dim=1))


# ----------------------------------------------------------------------------------------------
# Determinism in (seed, epoch, index)
# ----------------------------------------------------------------------------------------------
def test_augmentation_is_a_function_of_seed_epoch_and_index() -> None:
    ds = _dataset(40)
    policy = {"crop_padding": 3, "hflip": True, "cutout": 5}

    def samples(batch_size: int, start: int, epoch: int = 1, seed: int = 0) -> dict[int, Any]:
        loader = DeviceLoader(
            ds, batch_size, device="cpu", seed=seed, shuffle=True, drop_last=False, **policy
        )
        loader.batch_sampler.set_epoch(epoch, start)
        order = loader.batch_sampler.order().tolist()
        xs = torch.cat([x for x, _ in loader])
        return dict(zip(order[start * batch_size :], xs, strict=True))

    whole = samples(8, 0)
    # Another batch size, a resume point: the same pixels for every sample seen.
    for other in (samples(5, 0), samples(8, 2)):
        assert all(torch.equal(whole[i], x) for i, x in other.items())
    # Another epoch or seed: other augmentations (most samples change).
    for other in (samples(8, 0, epoch=2), samples(8, 0, seed=1)):
        changed = sum(not torch.equal(whole[i], x) for i, x in other.items())
        assert changed > 0.8 * len(ds)


def test_device_loader_refuses_what_it_cannot_do() -> None:
    with pytest.raises(TypeError, match="in-memory ImageDataset"):
        DeviceLoader(torch.utils.data.TensorDataset(torch.zeros(2)), 2, device="cpu",
                     shuffle=False, drop_last=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs crop_xy"):
        augment_batch(_dataset(2).images, crop_padding=2)
    with pytest.raises(ValueError, match="needs cutout_xy"):
        augment_batch(_dataset(2).images, cutout=2)
    with pytest.raises(ValueError, match="cutout 20 exceeds the image size 16"):
        DeviceLoader(_dataset(4), 2, device="cpu", shuffle=True, drop_last=True, cutout=20)


# ----------------------------------------------------------------------------------------------
# In the engine
# ----------------------------------------------------------------------------------------------
TINY = {
    "data": "synthetic",
    "synthetic_train": 64,
    "synthetic_val": 32,
    "img_size": 16,
    "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "batch_size": 16,
    "epochs": 2,
    "rollout_every": 0,
    "log_every": 2,
    "device": "cpu",
    "crop_padding": 2,
    "cutout": 4,
}


def _cfg(tmp_path: Path, name: str, **overrides: Any):
    return make_config({**TINY, "out_dir": str(tmp_path / name), **overrides})


def _flags(values: dict[str, Any]) -> list[str]:
    out = []
    for k, v in values.items():
        if isinstance(v, bool):
            out.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            out += [f"--{k.replace('_', '-')}", json.dumps(v) if isinstance(v, dict) else str(v)]
    return out


def test_engine_loader_selection(tmp_path: Path) -> None:
    t = Trainer(_cfg(tmp_path, "a", loader="device"))
    assert isinstance(t.train_loader, DeviceLoader) and isinstance(t.val_loader, DeviceLoader)
    assert t.train_loader.cutout == 4 and t.val_loader.cutout == 0  # validation unaugmented
    # auto: the device loader only pays off on CUDA.
    assert not isinstance(Trainer(_cfg(tmp_path, "b")).train_loader, DeviceLoader)
    with pytest.raises(ConfigError, match=r"randaugment_ops > 0.*--loader cpu"):
        Trainer(_cfg(tmp_path, "c", loader="device", randaugment_ops=2))


def test_engine_with_device_loader_and_mixup_resumes_exactly(
    tmp_path: Path, sigterm_at_step, capsys
) -> None:
    """Device loader with crop/flip/cutout, mixup/cutmix on top; SIGTERM mid-epoch, then resume."""
    from vit.train import ClassificationTask

    recipe = {**TINY, "loader": "device", "mixup": 0.8, "cutmix": 1.0, "hflip": True}
    assert main(_flags({**recipe, "out_dir": str(tmp_path / "a")})) == 0
    disarm = sigterm_at_step(ClassificationTask, 5)  # mid-epoch (4 steps per epoch)
    b = _flags({**recipe, "out_dir": str(tmp_path / "b")})
    assert main(b) == 128 + signal.SIGTERM
    assert "SIGTERM at step 6" in capsys.readouterr().err
    disarm()
    assert main([*b, "--resume", "auto"]) == 0
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_device_loader_matches_cpu() -> None:
    ds = _dataset(64)
    policy = {"crop_padding": 4, "hflip": True, "cutout": 6}
    kw = {"seed": 2, "shuffle": True, "drop_last": True, **policy}
    cpu = [x for x, _ in DeviceLoader(ds, 16, device="cpu", **kw)]
    gpu = [x.cpu() for x, _ in DeviceLoader(ds, 16, device="cuda", **kw)]
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu, strict=True))
