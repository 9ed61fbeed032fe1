"""The engine's loaders: the CPU DataLoader or the device-resident loader, as the run's config
asks, and the clock of the time a step waits for data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from vit.data.loader import make_loader
from vit.errors import ConfigError

if TYPE_CHECKING:
    from vit.engine.config import RunConfig

__all__ = ["WaitClock", "build_loader", "use_device_loader"]


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

        policy = cfg.augment_policy() if train else None
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
