"""The device-resident loader (vit.data.DeviceLoader) against the CPU albumentations path, on the
CPU device: identical batches without augmentation, identical pixels for the same crop/flip/cutout
and RandAugment parameters, the same parameter distributions, determinism in (seed, epoch, index),
and the engine with --loader device (mixup on top, exact resume)."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytest
import torch
from torch import Tensor

from vit.data import (
    RANDAUGMENT_OPS,
    AugmentPolicy,
    DeviceLoader,
    ImageDataset,
    augment_batch,
    build_transform,
    make_loader,
    randaugment_batch,
    randaugment_params,
    reseed,
    sample_seed,
    uniform_ints,
)
from vit.engine.checkpoint import load_checkpoint
from vit.engine.config import ConfigError, make_config
from vit.engine.trainer import Trainer
from vit.train import main

CLASSES = [str(i) for i in range(10)]


def _dataset(n: int = 64, size: int = 16, seed: int = 0) -> ImageDataset:
    # Random pixels: any misplaced row, column or channel shows.
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.randint(0, 10, (n,), generator=g), CLASSES)


def _cpu_sample(ds: ImageDataset, policy: dict[str, Any], seed: int, epoch: int, index: int):
    """What the CPU pipeline does to one sample: the augmented image (3, H, W) and the parameters
    it drew, in augment_batch's terms."""
    transform = build_transform(ds.img_size, AugmentPolicy(**policy))
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


def _smooth_dataset(n: int, size: int = 16) -> ImageDataset:
    """Half noise, half blurred noise: interpolation and histograms see both kinds of image; the
    first image is one flat colour, the last has a flat channel (histogram edge cases)."""
    noise = _dataset(n, size).images.permute(0, 3, 1, 2).float()
    blurred = torch.nn.functional.avg_pool2d(noise, 5, 1, 2, count_include_pad=False).round()
    images = torch.cat([noise[: n // 2], blurred[n // 2 :]])
    images[0] = torch.tensor([77.0, 140.0, 255.0])[:, None, None]
    images[-1, 0] = 200
    images = images.to(torch.uint8)
    return ImageDataset(images.permute(0, 2, 3, 1).contiguous(), torch.zeros(n).long(), CLASSES)


def _albumentations_op(name: str, p: dict[str, Tensor], i: int) -> A.BasicTransform:
    """The CPU policy's operation ``name`` with its ranges pinned to image ``i``'s draw in ``p``."""

    def pin(key: str) -> tuple[float, float]:
        return (p[key][i].item(),) * 2

    zero = (0.0, 0.0)
    jitter = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    return {
        "rotate": lambda: A.Affine(rotate=pin("rotate"), p=1),
        "shear_x": lambda: A.Affine(shear={"x": pin("shear_x"), "y": zero}, p=1),
        "shear_y": lambda: A.Affine(shear={"x": zero, "y": pin("shear_y")}, p=1),
        "translate_x": lambda: A.Affine(translate_px={"x": pin("translate_x"), "y": (0, 0)}, p=1),
        "translate_y": lambda: A.Affine(translate_px={"x": (0, 0), "y": pin("translate_y")}, p=1),
        **{
            k: (lambda k=k: A.ColorJitter(**{**jitter, k: pin(k)}, p=1))
            for k in ("brightness", "contrast", "saturation")
        },
        "sharpen": lambda: A.Sharpen(
            alpha=pin("sharpen_alpha"), lightness=pin("sharpen_lightness"), p=1
        ),
        "posterize": lambda: A.Posterize(num_bits=pin("posterize_bits"), p=1),
        "solarize": lambda: A.Solarize(threshold_range=pin("solarize_threshold"), p=1),
        "equalize": lambda: A.Equalize(p=1),
        "autocontrast": lambda: A.AutoContrast(p=1),
    }[name]()


def _chw(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


# Bilinear resampling and the float arithmetic of cv2 round a few pixels the other way.
ROUNDED = {"rotate", "shear_x", "shear_y", "contrast", "saturation"}


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_randaugment_ops_give_the_albumentations_pixels(name: str) -> None:
    """Each operation, with a different draw for every image, against the albumentations
    transform of the CPU policy pinned to that draw."""
    ds = _smooth_dataset(32)
    u = torch.rand(len(ds), 25, generator=torch.Generator().manual_seed(1))
    p = randaugment_params(u, 1, 9.0, ds.img_size)
    p["ops"] = torch.tensor([op == name for op in RANDAUGMENT_OPS]).expand(len(ds), -1)
    out = randaugment_batch(ds.images.permute(0, 3, 1, 2), p)
    expected = torch.stack(
        [
            _chw(_albumentations_op(name, p, i)(image=ds.images[i].numpy())["image"])
            for i in range(len(ds))
        ]
    )
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    assert not torch.equal(out, ds.images.permute(0, 3, 1, 2))  # the operation did something
    diff = (out.int() - expected.int()).abs()
    if name in ROUNDED:
        assert diff.max() <= 1 and (diff > 0).double().mean() < 0.005, diff.max()
    else:
        assert torch.equal(out, expected)


def test_loader_with_randaugment_gives_the_albumentations_pixels() -> None:
    """The whole device policy (crop, flip, two operations, cutout) against albumentations applied
    with the loader's draws: the operations in policy order, between the flip and the cutout."""
    ds = _smooth_dataset(128)
    policy = {"crop_padding": 2, "hflip": True, "randaugment_ops": 2, "cutout": 4}
    loader = DeviceLoader(
        ds, 128, device="cpu", seed=3, shuffle=True, drop_last=True, policy=AugmentPolicy(**policy)
    )
    ((out, _),) = list(loader)
    index = loader.batch_sampler.order()
    p = loader.params(0, index)
    ra = p["randaugment"]
    assert (ra["ops"].sum(1) == 2).all()
    cropped = augment_batch(ds.images[index], crop_padding=2, crop_xy=p["crop_xy"], flip=p["flip"])
    exact = 0
    for i in range(len(ds)):
        image = cropped[i].permute(1, 2, 0).numpy()
        chosen = [op for op, c in zip(RANDAUGMENT_OPS, ra["ops"][i], strict=True) if c]
        for op in chosen:
            image = _albumentations_op(op, ra, i)(image=image)["image"]
        expected = _chw(image).clone()
        x, y = p["cutout_xy"][i].tolist()
        expected[:, y : y + 4, x : x + 4] = 0
        diff = (out[i].int() - expected.int()).abs()
        if ROUNDED.isdisjoint(chosen):
            assert torch.equal(out[i], expected), chosen
            exact += 1
        else:  # a pixel rounded the other way may move a later histogram or threshold a little
            assert diff.double().mean() < 0.5 and (diff > 0).double().mean() < 0.05, chosen
    assert exact > len(ds) // 4  # 36% of the pairs avoid ROUNDED


# ----------------------------------------------------------------------------------------------
# Same distributions as the CPU path
# ----------------------------------------------------------------------------------------------
def test_parameter_distributions_match_albumentations() -> None:
    size, pad, cut = 16, 4, 6
    policy = {"crop_padding": pad, "hflip": True, "cutout": cut}
    ds = _dataset(2, size=size)
    loader = DeviceLoader(
        ds, 2, device="cpu", seed=1, shuffle=True, drop_last=True, policy=AugmentPolicy(**policy)
    )
    n = 40_000
    dev = loader.params(epoch=0, index=torch.arange(n))
    # The CPU pipeline's parameters over many (epoch, index) keys (image content is irrelevant).
    transform = build_transform(size, AugmentPolicy(**policy))
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


def _cpu_randaugment_draws(name: str, params: dict[str, Any]) -> dict[str, float]:
    """What the CPU policy's operation ``name`` drew, as randaugment_params' draws, from the
    parameters albumentations records."""
    m = params.get("matrix")
    return {
        "rotate": lambda: {"rotate": params["rotate"]},
        # The matrix shears by minus the drawn angle.
        "shear_x": lambda: {"shear_x": -float(np.degrees(np.arctan(m[0, 1])))},
        "shear_y": lambda: {"shear_y": -float(np.degrees(np.arctan(m[1, 0])))},
        "translate_x": lambda: {"translate_x": float(m[0, 2])},
        "translate_y": lambda: {"translate_y": float(m[1, 2])},
        **{k: (lambda k=k: {k: params[k]}) for k in ("brightness", "contrast", "saturation")},
        "sharpen": lambda: {
            "sharpen_alpha": params["alpha"],
            # The kernel's centre is 1 - alpha + alpha (8 + lightness).
            "sharpen_lightness": (params["sharpening_matrix"][1, 1] - 1 + params["alpha"])
            / params["alpha"]
            - 8,
        },
        "posterize": lambda: {"posterize_bits": params["num_bits"]},
        "solarize": lambda: {"solarize_threshold": params["threshold"]},
        "equalize": dict,
        "autocontrast": dict,
    }[name]()


def _ks_statistic(a: Tensor, b: Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two samples'
    empirical distribution functions."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def test_randaugment_chooses_distinct_operations_uniformly() -> None:
    n_ops, count = 2, 40_000
    loader = DeviceLoader(_dataset(2), 2, device="cpu", seed=1, shuffle=True, drop_last=True,
                          policy=AugmentPolicy(randaugment_ops=n_ops))  # fmt: skip
    ops = loader.params(epoch=0, index=torch.arange(count))["randaugment"]["ops"]
    assert (ops.sum(1) == n_ops).all()
    k = len(RANDAUGMENT_OPS)
    freq = ops.double().mean(0)
    assert (freq - n_ops / k).abs().max() < 5 * (n_ops / k / count) ** 0.5
    pairs = torch.stack([ops[:, i] & ops[:, j] for i in range(k) for j in range(i + 1, k)], 1)
    pair_freq = pairs.double().mean(0)  # albumentations' SomeOf: each of the 78 pairs alike
    assert (pair_freq - 1 / len(pair_freq)).abs().max() < 5 * (1 / len(pair_freq) / count) ** 0.5


@pytest.mark.parametrize("magnitude", [9.0, 4.0])
def test_randaugment_parameter_distributions_match_albumentations(magnitude: float) -> None:
    """Every parameter the device loader draws against the albumentations policy's draws, with
    all 13 operations on so that each sample shows each parameter: two-sample KS tests."""
    size, k = 32, len(RANDAUGMENT_OPS)
    policy = {"randaugment_ops": k, "randaugment_magnitude": magnitude}
    loader = DeviceLoader(_dataset(2, size), 2, device="cpu", seed=1, shuffle=True,
                          drop_last=True, policy=AugmentPolicy(**policy))  # fmt: skip
    dev = loader.params(epoch=0, index=torch.arange(40_000))["randaugment"]
    transform = build_transform(size, AugmentPolicy(**policy))
    transform.save_applied_params = True
    image = _smooth_dataset(2, size).images[1].numpy()
    cpu: dict[str, list[float]] = {key: [] for key in dev if key != "ops"}
    for i in range(3000):
        reseed(transform, sample_seed(1, 0, i))
        applied = transform(image=image)["applied_transforms"]
        assert len(applied) == k
        for name, (_, params) in zip(RANDAUGMENT_OPS, applied, strict=True):
            for key, value in _cpu_randaugment_draws(name, params).items():
                cpu[key].append(value)
    for key, values in cpu.items():
        statistic = _ks_statistic(dev[key], torch.tensor(values))
        # The critical value at alpha 1e-5: c sqrt((n + m) / (n m)), c = 2.44.
        limit = 2.44 * (1 / len(values) + 1 / len(dev[key])) ** 0.5
        assert statistic < limit, (key, statistic, limit)


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
    loader = DeviceLoader(
        ds, 2, device="cpu", seed=1, shuffle=True, drop_last=True, policy=AugmentPolicy(**policy)
    )
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
        policy=AugmentPolicy(crop_padding=4, hflip=True, cutout=6),
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
    policy = {"crop_padding": 3, "hflip": True, "randaugment_ops": 2, "cutout": 5}

    def samples(batch_size: int, start: int, epoch: int = 1, seed: int = 0) -> dict[int, Any]:
        loader = DeviceLoader(
            ds,
            batch_size,
            device="cpu",
            seed=seed,
            shuffle=True,
            drop_last=False,
            policy=AugmentPolicy(**policy),
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
        DeviceLoader(_dataset(4), 2, device="cpu", shuffle=True, drop_last=True,
                     policy=AugmentPolicy(cutout=20))  # fmt: skip


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
    t = Trainer(_cfg(tmp_path, "c", loader="device", randaugment_ops=2))
    assert t.train_loader.randaugment_ops == 2 and t.val_loader.randaugment_ops == 0
    with pytest.raises(ConfigError, match="randaugment_ops is at most 13"):
        make_config({**TINY, "randaugment_ops": 14})


def test_engine_with_device_loader_and_mixup_resumes_exactly(
    tmp_path: Path, sigterm_at_step, capsys
) -> None:
    """Device loader with crop/flip/RandAugment/cutout, mixup/cutmix on top; SIGTERM mid-epoch,
    then resume."""
    from vit.engine.classification import ClassificationTask

    recipe = {**TINY, "loader": "device", "mixup": 0.8, "cutmix": 1.0, "hflip": True}
    recipe["randaugment_ops"] = 2
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
@pytest.mark.parametrize("randaugment_ops", [0, 2])
def test_cuda_device_loader_matches_cpu(randaugment_ops: int) -> None:
    ds = _smooth_dataset(64)
    policy = {"crop_padding": 4, "hflip": True, "randaugment_ops": randaugment_ops, "cutout": 6}
    kw = {"seed": 2, "shuffle": True, "drop_last": True, "policy": AugmentPolicy(**policy)}
    cpu = torch.cat([x for x, _ in DeviceLoader(ds, 16, device="cpu", **kw)])
    gpu = torch.cat([x.cpu() for x, _ in DeviceLoader(ds, 16, device="cuda", **kw)])
    if randaugment_ops == 0:
        assert torch.equal(cpu, gpu)
    else:  # float arithmetic (interpolation, means) may round a pixel the other way
        assert ((cpu.int() - gpu.int()).abs() > 0).double().mean() < 0.01


def test_loader_benchmark_prints_its_table(capsys) -> None:
    """benchmarks/loader.py runs end to end (tiny sizes) and prints a row per loader."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loader.py"
    spec = importlib.util.spec_from_file_location("loader_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (
        bench.main(["--device", "cpu", "--images", "64", "--batch-size", "32", "--rounds", "1"])
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert len(rows) == 4 and rows[0].endswith(" 1.00x")
