"""CPU data loading: epoch-keyed batch sampling (exact resume, DDP shares) and the DataLoader."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vit.data.transforms import AugmentPolicy, sample_seed
from vit.errors import ConfigError

if TYPE_CHECKING:
    from vit.config import RunConfig

__all__ = ["EpochBatchSampler", "WaitClock", "build_loader", "make_loader", "use_device_loader"]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys: a per-epoch permutation that is a pure function of
    ``(seed, epoch)``, optionally starting at batch ``start`` (mid-epoch resume).

    With ``world_size > 1`` (DDP) ``batch_size`` is the global batch: every rank walks the same
    permutation and takes its contiguous share of each global batch, so the ranks together see
    exactly the batches of a single-process run (empty shares of a short last batch are skipped).
    Iterated in the main process, so :meth:`set_epoch` reaches persistent workers too.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        full = self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)
        return max(0, full - self.start)

    def order(self) -> Tensor:
        """The epoch's permutation of ``range(n)`` (int64, CPU)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 1 << 40))
        return torch.randperm(self.n, generator=g)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """This rank's ``[lo, hi)`` range of :meth:`order` for each remaining batch."""
        for b in range(self.start, self.start + len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            r, w = self.rank, self.world_size
            lo, hi = lo + (hi - lo) * r // w, lo + (hi - lo) * (r + 1) // w
            if hi > lo:
                yield lo, hi

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order().tolist()
        for lo, hi in self.bounds():
            yield [(self.epoch, i) for i in order[lo:hi]]


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint and stops the
    # workers itself, so they must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool,
    drop_last: bool,
    workers: int = 0,
    collate_fn: Any = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over :class:`EpochBatchSampler` (reach it as ``loader.batch_sampler``);
    ``batch_size`` is global, each of ``world_size`` ranks loads its share (see the sampler).

    :class:`DeviceLoader` is the GPU-resident alternative for in-memory image data.
    """
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        # Workers' base seed comes from this generator, not the global RNG, whose state (dropout,
        # drop path) a checkpoint restores exactly.
        generator=torch.Generator().manual_seed(seed),
    )


def use_device_loader(
    cfg: RunConfig, datasets: tuple[Dataset, ...], collate_fn: Any, device: torch.device
) -> bool:
    """Resolve ``--loader``: the device loader needs in-memory images batched without a collate
    function, and only pays off on CUDA (``auto``).

    Raises:
        ConfigError: ``--loader device`` for data it cannot hold.
    """
    from vit.data.datasets import ImageDataset

    why = None
    if not all(isinstance(d, ImageDataset) for d in datasets):
        why = f"task {cfg.task!r} does not keep its data as an in-memory ImageDataset"
    elif collate_fn is not None:
        why = f"task {cfg.task!r} collates its own batches"
    if cfg.loader == "device" and why is not None:
        raise ConfigError(f"--loader device cannot be used: {why}; use --loader cpu or auto")
    return cfg.loader == "device" or (
        cfg.loader == "auto" and why is None and device.type == "cuda"
    )


def build_loader(
    cfg: RunConfig,
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    on_device: bool,
    device: torch.device,
    collate_fn: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """The engine's training (``train``: shuffled, augmented, full batches) or validation loader:
    a :func:`make_loader` DataLoader, or (``on_device``) the device-resident
    :class:`~vit.data.DeviceLoader`, of this rank's share of each global batch."""
    if on_device:
        from vit.data.device import DeviceLoader

        policy = AugmentPolicy.from_config(cfg) if train else None
        return DeviceLoader(
            dataset, batch_size, device=device, seed=cfg.seed, shuffle=train, drop_last=train,
            policy=policy, rank=rank, world_size=world_size,
        )  # fmt: skip
    return make_loader(
        dataset, batch_size, seed=cfg.seed, shuffle=train, drop_last=train, workers=cfg.workers,
        collate_fn=collate_fn, pin_memory=device.type == "cuda", rank=rank, world_size=world_size,
    )  # fmt: skip


class WaitClock:
    """Time spent waiting in ``next()`` of an iterator (the data loader's share of a step)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iterate(self, iterable: Any) -> Iterator[Any]:
        it = iter(iterable)
        while True:
            t0 = time.monotonic()
            try:
                item = next(it)
            except StopIteration:
                return
            self.seconds += time.monotonic() - t0
            yield item

    def take(self) -> float:
        """The seconds waited since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
