"""CPU data loading: epoch-keyed batch sampling (exact resume, DDP shares) and the DataLoader."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Sized
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vit.data.transforms import sample_seed

__all__ = ["EpochBatchSampler", "make_loader"]


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
        len(cast(Sized, dataset)),  # map-style, sized: torch's Dataset type has no __len__
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
