"""GPU-resident loading: the images on the training device, batches gathered and augmented there
with the CPU pipeline's distributions (crop, flip, RandAugment, cutout), no worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vit.data.datasets import ImageDataset
from vit.data.loader import EpochBatchSampler
from vit.data.transforms import RANDAUGMENT_OPS, AugmentPolicy, sample_seed

__all__ = [
    "DeviceLoader",
    "augment_batch",
    "randaugment_batch",
    "randaugment_params",
    "uniform_ints",
]

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap, the low
    32 bits stay exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_ints(seed: int, epoch: int, index: Tensor, stream: int, high: int) -> Tensor:
    """Integers in ``[0, high)``, one per entry of ``index``, each a pure function of
    ``(seed, epoch, index, stream)``: the device loader's analogue of :func:`sample_seed`, computed
    on ``index``'s device without a generator, so any batching, rank or resume point draws the
    same value for a sample."""
    return _hash_uniform(index, _stream_key(seed, epoch, stream), high)


def _stream_key(seed: int, epoch: int, stream: int) -> int:
    return sample_seed(seed, epoch, (1 << 42) + stream)


def _hash_uniform(index: Tensor, key: Tensor | int, high: Tensor | int) -> Tensor:
    """:func:`uniform_ints` given the stream's key; ``key`` and ``high`` may be tensors that
    broadcast against ``index`` (several streams in one pass)."""
    h = _mix32(_mix32((index.long() * 0x9E3779B1 + key) & _M32) ^ (key >> 7))
    return (h * high) >> 32  # Lemire's multiply-shift: uniform up to a 2^-32 bias


def augment_batch(
    images: Tensor,
    *,
    crop_padding: int = 0,
    crop_xy: Tensor | None = None,
    flip: Tensor | None = None,
    randaugment: dict[str, Tensor] | None = None,
    cutout: int = 0,
    cutout_xy: Tensor | None = None,
) -> Tensor:
    """Crop, flip, RandAugment and cutout a batch with the CPU pipeline's semantics
    (:func:`build_transform`): zero padding by ``crop_padding`` then a crop at ``crop_xy``
    (B, 2) ``(x, y)`` in padded coordinates, a horizontal flip where ``flip`` (B,) is true (crop
    and flip are one gather), the RandAugment operations drawn in ``randaugment`` (see
    :func:`randaugment_params` and :func:`randaugment_batch`), then a zero ``cutout``-pixel square
    with top-left corner ``cutout_xy`` (B, 2) ``(x, y)``.

    ``images``: uint8 (B, H, W, 3), the dataset layout. Returns uint8 (B, 3, H, W).
    """
    b, h, w, _ = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)  # (B, H) source row of each output row
    cols = torch.arange(w, device=dev).expand(b, w)  # (B, W)
    if crop_padding > 0:
        if crop_xy is None:
            raise ValueError("crop_padding > 0 needs crop_xy, the (B, 2) crop offsets")
        rows = rows + (crop_xy[:, 1:] - crop_padding)
        cols = cols + (crop_xy[:, :1] - crop_padding)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Padding is never materialised: out-of-image sources are clamped, then zeroed by the mask.
    keep = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(b, device=dev)[:, None, None]
    out = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    out = rearrange(out * keep[..., None].to(out.dtype), "b h w c -> b c h w")
    if randaugment is not None:
        out = randaugment_batch(out, randaugment)
    if cutout > 0:
        if cutout_xy is None:
            raise ValueError("cutout > 0 needs cutout_xy, the (B, 2) corners of the squares")
        ry = torch.arange(h, device=dev) - cutout_xy[:, 1:]  # (B, H)
        rx = torch.arange(w, device=dev) - cutout_xy[:, :1]  # (B, W)
        hole = ((ry >= 0) & (ry < cutout))[:, :, None] & ((rx >= 0) & (rx < cutout))[:, None, :]
        out = out * ~hole[:, None]
    return out.contiguous()


# The uniform streams randaugment_params reads: one per operation to choose the operations, then
# one per parameter.
_RA_PARAMS = (
    *RANDAUGMENT_OPS[:8],  # rotate ... saturation: one number each, named as the operation
    "sharpen_alpha",
    "sharpen_lightness",
    "posterize_bits",
    "solarize_threshold",
)
_RA_STREAMS = len(RANDAUGMENT_OPS) + len(_RA_PARAMS)


def randaugment_params(u: Tensor, n: int, magnitude: float, img_size: int) -> dict[str, Tensor]:
    """The RandAugment draws of a batch from uniforms ``u`` in [0, 1), float (B, 25): which
    ``n`` of the :data:`RANDAUGMENT_OPS` each image gets (``"ops"``, bool (B, 13); ``n`` distinct,
    uniformly, as albumentations' ``SomeOf``) and every operation's parameter (B,), in
    albumentations' units and from the ranges of :func:`_randaugment_ops`: degrees for
    ``rotate``/``shear_*``, whole pixels for ``translate_*`` (its ``int(fraction * size)``),
    factors for ``brightness``/``contrast``/``saturation``, ``sharpen_alpha`` and
    ``sharpen_lightness``, ``posterize_bits`` kept (int64), ``solarize_threshold`` in [0, 1]."""
    if not 0 < n <= len(RANDAUGMENT_OPS):
        raise ValueError(f"n must be in [1, {len(RANDAUGMENT_OPS)}], got {n}")
    k = len(RANDAUGMENT_OPS)
    # The n smallest of k i.i.d. uniforms: a uniformly random n-subset.
    chosen = u[:, :k].argsort(dim=1)[:, :n]
    ops = torch.zeros(u.shape[0], k, dtype=torch.bool, device=u.device).scatter_(1, chosen, True)
    v = dict(zip(_RA_PARAMS, u[:, k:].unbind(1), strict=True))
    m = magnitude / 10.0
    bits_lo = max(1, round(8 - 4 * m))

    def between(lo: float, hi: float, x: Tensor) -> Tensor:  # python's random.uniform(lo, hi)
        return lo + (hi - lo) * x

    jitter = (max(0.0, 1 - 0.9 * m), 1 + 0.9 * m)
    return {
        "ops": ops,
        "rotate": between(-30 * m, 30 * m, v["rotate"]),
        **{a: between(-17 * m, 17 * m, v[a]) for a in ("shear_x", "shear_y")},
        **{
            a: (between(-0.3 * m, 0.3 * m, v[a]) * img_size).trunc()
            for a in ("translate_x", "translate_y")
        },
        **{a: between(*jitter, v[a]) for a in ("brightness", "contrast", "saturation")},
        "sharpen_alpha": between(0.0, 0.9 * m, v["sharpen_alpha"]),
        "sharpen_lightness": between(0.5, 1.0, v["sharpen_lightness"]),
        "posterize_bits": bits_lo + (v["posterize_bits"] * (9 - bits_lo)).long(),
        "solarize_threshold": between(1 - m, 1.0, v["solarize_threshold"]),
    }


def _warp(x: Tensor, lin: Tensor, shift: Tensor) -> Tensor:
    """cv2.warpAffine (bilinear, zero border) about the image centre, as albumentations' Affine:
    output pixel ``p`` samples the input at ``lin @ (p - c) + c - shift``; ``lin`` (B, 2, 2),
    ``shift`` (B, 2) in pixels. Elementwise, so TF32 matmuls cannot blur the coordinates."""
    _, _, h, w = x.shape
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    px = (torch.arange(w, device=x.device, dtype=x.dtype) - cx)[None, None, :]  # (1, 1, W)
    py = (torch.arange(h, device=x.device, dtype=x.dtype) - cy)[None, :, None]  # (1, H, 1)
    lin, shift = lin[..., None, None], shift[..., None, None]
    sx = lin[:, 0, 0] * px + lin[:, 0, 1] * py + (cx - shift[:, 0])  # (B, H, W)
    sy = lin[:, 1, 0] * px + lin[:, 1, 1] * py + (cy - shift[:, 1])
    grid = torch.stack([sx * (2 / (w - 1)) - 1, sy * (2 / (h - 1)) - 1], -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round()


def _gray(x: Tensor) -> Tensor:
    """OpenCV's RGB-to-gray of uint8 images (fixed point, 14 bits), on integral floats (B, H, W)."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 4899 + g * 9617 + b * 1868 + 8192) / 16384)


def _histogram_lut(x: Tensor, *, skip_top: bool) -> Tensor:
    """Per-channel histogram equalisation (cv2.equalizeHist, albumentations' Equalize); with
    ``skip_top`` albumentations' AutoContrast ("cdf"), whose histogram leaves out the value 255
    (cv2.calcHist's range [0, 255)) and which maps it to 255. A constant channel stays as is."""
    b, c, h, w = x.shape
    v = x.reshape(b * c, h * w).long()
    counted = (v < 255).to(x.dtype) if skip_top else torch.ones_like(v, dtype=x.dtype)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(1, v, counted)
    cum = hist.cumsum(1)
    lo = (hist > 0).to(torch.uint8).argmax(1, keepdim=True)  # the first value present
    base = cum.gather(1, lo)
    span = cum[:, -1:] - base  # 0 for a constant channel
    d = span.clamp(min=1)
    # In float32, in each library's order of operations, so that halves round alike (a python
    # number over a tensor would multiply by a rounded reciprocal).
    lut = ((cum - base) * 255 / d) if skip_top else (cum - base) * (torch.full_like(d, 255) / d)
    lut = lut.round()
    return torch.where(span > 0, lut.gather(1, v), v.to(x.dtype)).reshape(b, c, h, w)


def randaugment_batch(images: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The RandAugment operations of :func:`randaugment_params` on a batch, uint8 (B, 3, H, W):
    each image gets its chosen operations in :data:`RANDAUGMENT_OPS` order (albumentations'
    ``SomeOf`` applies them sorted), each with albumentations' arithmetic and uint8 rounding
    between operations. Every operation runs on the whole batch and is kept where chosen, so
    nothing waits on the device. The CPU pipeline gives the same pixels, up to an occasional
    1-level rounding difference (rotation, shear, contrast, saturation)."""
    x = images.float()
    b = x.shape[0]
    dev, f32 = x.device, x.dtype
    eye = torch.eye(2, device=dev).expand(b, 2, 2)
    no_shift = torch.zeros(b, 2, device=dev)

    def per_image(t: Tensor) -> Tensor:
        return t.to(f32)[:, None, None, None]

    def rotate() -> Tensor:
        r = torch.deg2rad(params["rotate"].to(f32))
        cos, sin = r.cos(), r.sin()
        return _warp(x, torch.stack([cos, -sin, sin, cos], 1).view(b, 2, 2), no_shift)

    def shear(axis: int) -> Tensor:
        lin = eye.clone()  # albumentations shears by minus the drawn angle; this inverts it
        lin[:, axis, 1 - axis] = torch.tan(torch.deg2rad(params[("shear_x", "shear_y")[axis]]))
        return _warp(x, lin, no_shift)

    def translate(axis: int) -> Tensor:
        shift = no_shift.clone()
        shift[:, axis] = params[("translate_x", "translate_y")[axis]].to(f32)
        return _warp(x, eye, shift)

    def contrast() -> Tensor:
        f = per_image(params["contrast"])
        return torch.floor(x * f + _gray(x).mean((1, 2))[:, None, None, None] * (1 - f))

    def saturation() -> Tensor:
        f = per_image(params["saturation"])
        return (x * f + _gray(x)[:, None] * (1 - f)).round()

    def sharpen() -> Tensor:
        # The kernel (1 - a) identity + a [[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]]
        # with cv2's default border (reflect-101); the 3x3 sums are exact, where a convolution
        # could run in TF32.
        a, light = per_image(params["sharpen_alpha"]), per_image(params["sharpen_lightness"])
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        ring = F.avg_pool2d(padded, 3, stride=1, divisor_override=1) - x
        return (x * (1 - a + a * (8 + light)) - a * ring).round()

    def posterize() -> Tensor:
        step = per_image(2 ** (8 - params["posterize_bits"]))
        return torch.floor(x / step) * step

    def solarize() -> Tensor:
        threshold = per_image(torch.ceil(params["solarize_threshold"].double() * 255))
        return torch.where(x >= threshold, 255 - x, x)

    apply = {
        "rotate": rotate,
        "shear_x": lambda: shear(0),
        "shear_y": lambda: shear(1),
        "translate_x": lambda: translate(0),
        "translate_y": lambda: translate(1),
        "brightness": lambda: torch.floor(x * per_image(params["brightness"])),
        "contrast": contrast,
        "saturation": saturation,
        "sharpen": sharpen,
        "posterize": posterize,
        "solarize": solarize,
        "equalize": lambda: _histogram_lut(x, skip_top=False),
        "autocontrast": lambda: _histogram_lut(x, skip_top=True),
    }
    chosen = params["ops"]
    for i, name in enumerate(RANDAUGMENT_OPS):
        x = torch.where(chosen[:, i, None, None, None], apply[name]().clamp(0, 255), x)
    return x.to(torch.uint8)


class DeviceLoader:
    """Batches of an in-memory :class:`ImageDataset`, held on ``device`` and augmented there.

    The uint8 images move to the device once; each batch is a gather plus :func:`augment_batch`
    of ``policy`` (random crop after zero padding, horizontal flip with p=0.5, RandAugment-style
    operations, cutout of one square fully inside the image — the same distributions as the
    albumentations pipeline of :func:`~vit.data.build_transform`), with no worker
    processes, which a CPU pipeline cannot match when feeding a small ViT on a GPU (the airbench
    approach).
    The order comes from :class:`EpochBatchSampler` (``loader.batch_sampler``, same permutation,
    resume point and DDP shares as :func:`make_loader`) and every random draw from
    :func:`uniform_ints` of ``(seed, epoch, index)``, so exact resume holds. Yields
    ``(uint8 (B, 3, H, W), int64 (B,))`` on ``device``; normalisation stays with the task.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        device: torch.device | str,
        seed: int = 0,
        shuffle: bool,
        drop_last: bool,
        policy: AugmentPolicy | None = None,
        rank: int = 0,
        world_size: int = 1,
        resident: bool | None = None,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(
                f"DeviceLoader needs an in-memory ImageDataset, got {type(dataset).__name__}; "
                f"use make_loader for other datasets"
            )
        policy = policy or AugmentPolicy()
        policy.check(dataset.img_size)
        crop_padding, cutout = policy.crop_padding, policy.cutout
        randaugment_ops = policy.randaugment_ops
        self.device = torch.device(device)
        self.dataset = dataset
        if resident is None:
            resident = _fits(dataset, self.device)
        self.resident = resident
        # uint8 (N, H, W, 3) on the device; otherwise each batch is gathered from the dataset.
        self.images = _to_device(dataset, self.device) if resident else None
        self.labels = dataset.labels.to(self.device)
        self.seed, self.crop_padding, self.cutout = seed, crop_padding, cutout
        self.hflip = policy.hflip
        self.randaugment_ops = randaugment_ops
        self.randaugment_magnitude = policy.randaugment_magnitude
        # The same order, resume point and DDP shares as make_loader's.
        self.batch_sampler = EpochBatchSampler(
            len(dataset),
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self._augment = shuffle and policy.enabled
        # The streams of params(): crop x, crop y, flip, cutout x, cutout y, then RandAugment's;
        # each draws from [0, high). Offsets 0..2p as RandomCrop of the padded image;
        # CoarseDropout keeps the hole inside the image; RandAugment's are 24-bit uniforms.
        crop, hole = 2 * crop_padding + 1, dataset.img_size - cutout + 1
        highs = [crop, crop, 2, hole, hole] + [1 << 24] * (_RA_STREAMS if randaugment_ops else 0)
        self._highs = torch.tensor(highs, device=self.device)[:, None]
        self._keys: tuple[int, Tensor] | None = None  # (epoch, the streams' keys)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def params(self, epoch: int, index: Tensor) -> dict[str, Any]:
        """Augmentation parameters of samples ``index`` in ``epoch`` (see :func:`augment_batch`):
        every stream's :func:`uniform_ints` in one pass of a few kernels."""
        if self._keys is None or self._keys[0] != epoch:  # one small host-to-device copy an epoch
            keys = [[_stream_key(self.seed, epoch, stream)] for stream in range(len(self._highs))]
            self._keys = (epoch, torch.tensor(keys, device=self.device))
        draws = _hash_uniform(index[None], self._keys[1], self._highs)  # (streams, B)
        out: dict[str, Any] = {"crop_padding": self.crop_padding, "cutout": self.cutout}
        if self.crop_padding > 0:
            out["crop_xy"] = draws[0:2].T
        if self.hflip:
            out["flip"] = draws[2].bool()
        if self.randaugment_ops > 0:
            u = draws[5:].T.float() / (1 << 24)  # exact: 24-bit integers
            out["randaugment"] = randaugment_params(
                u, self.randaugment_ops, self.randaugment_magnitude, self.dataset.img_size
            )
        if self.cutout > 0:
            out["cutout_xy"] = draws[3:5].T
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = self.batch_sampler
        epoch = sampler.epoch
        order = sampler.order()
        batches: Iterator[tuple[Tensor, Tensor]]
        if self.images is not None:  # resident
            images, order = self.images, order.to(self.device, non_blocking=True)
            batches = ((order[lo:hi], images[order[lo:hi]]) for lo, hi in sampler.bounds())
        else:
            batches = self._streamed(order, list(sampler.bounds()))
        for index, x in batches:  # x: uint8 (B, H, W, 3) on the device
            if self._augment:
                x = augment_batch(x, **self.params(epoch, index))
            else:
                x = rearrange(x, "b h w c -> b c h w").contiguous()
            yield x, self.labels[index]

    def _streamed(
        self, order: Tensor, bounds: list[tuple[int, int]]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches gathered from the dataset on the host (a memory-mapped cache pages in there)
        by a background thread, ``_PREFETCH`` batches ahead, so reading the next batches from
        disk overlaps augmenting and training on this one; pinned, then copied asynchronously."""
        from concurrent.futures import ThreadPoolExecutor

        pin = self.device.type == "cuda"

        def read(lo: int, hi: int) -> Tensor:
            x = self.dataset.gather(order[lo:hi])
            return x.pin_memory() if pin else x

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(read, *b) for b in bounds[:_PREFETCH]]
            for i, (lo, hi) in enumerate(bounds):
                x = pending.pop(0).result()
                if i + _PREFETCH < len(bounds):
                    pending.append(pool.submit(read, *bounds[i + _PREFETCH]))
                index = order[lo:hi].to(self.device, non_blocking=True)
                yield index, x.to(self.device, non_blocking=True)


# Batches read ahead when the images stay on the host (DeviceLoader(resident=False)).
_PREFETCH = 4
# Share of the device's free memory the images may take to be kept there (the rest is for
# training).
_RESIDENT_SHARE = 0.5


def _fits(dataset: ImageDataset, device: torch.device) -> bool:
    """Whether the images are held on ``device``: on an accelerator when they take at most half
    of its free memory; on the CPU when they are a tensor in memory already (a memory-mapped
    cache is read a batch at a time, never copied whole)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return dataset.nbytes <= _RESIDENT_SHARE * free
    return device.type == "cpu" and isinstance(dataset.images, Tensor)


def _to_device(dataset: ImageDataset, device: torch.device, chunk: int = 1 << 28) -> Tensor:
    """The dataset's images on ``device``, uint8 (N, H, W, 3), copied ``chunk`` bytes at a time
    (a memory-mapped cache never passes through host memory whole)."""
    images = dataset.images
    if dataset.rows is None and isinstance(images, Tensor) and images.device == device:
        return images
    n = len(dataset)
    out = torch.empty((n, *dataset.images.shape[1:]), dtype=torch.uint8, device=device)
    step = max(1, chunk // max(1, dataset.nbytes // n))
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        out[lo:hi] = dataset.gather(torch.arange(lo, hi)).to(device)
    return out
