"""The :class:`Task` interface the training engine trains, and the registry of tasks by name."""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vit.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from vit.engine.config import RunConfig

__all__ = ["TASKS", "Task", "get_task"]


class Task(abc.ABC):
    """What the engine trains: a task supplies data, model, loss and metrics, the loop the rest.

    Contract:
      * ``datasets``: the ``--data`` names it accepts; ``primary_metric``: a key of
        :meth:`evaluate`'s result, higher is better, that selects ``best.pt``.
      * ``state``: small, ``weights_only``-safe facts a checkpoint must carry to rebuild the task
        later (class names, normalisation, a vocabulary); passed back to ``__init__`` on resume and
        by ``python -m vit.evaluate``.
      * The training dataset is indexed with ``(epoch, index)`` keys and must make any randomness
        a function of them (exact resume); validation/test datasets get the same keys and should
        ignore the epoch.
    """

    datasets: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    # True when evaluate() all-reduces its sums under DDP, so each rank validates only its share.
    shards_evaluation: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.state: dict[str, Any] = dict(state or {})

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Refuse config values this task cannot use (raise :class:`ConfigError`)."""
        if cfg.data not in cls.datasets:
            hint = did_you_mean(cfg.data, cls.datasets, n=1)
            raise ConfigError(
                f"unknown dataset {cfg.data!r} for task {cfg.task!r}{hint} "
                f"(choose from {', '.join(cls.datasets)})"
            )

    @abc.abstractmethod
    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        """The dataset of a split; may fill ``self.state`` (it is saved after the datasets)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model for this run (after the datasets, so ``state`` is known)."""

    @abc.abstractmethod
    def model_spec(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``, from which :func:`vit.models.build` rebuilds it."""

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The DataLoader's collate function (``None``: PyTorch's default)."""
        return None

    @abc.abstractmethod
    def prepare_batch(self, batch: Any, device: torch.device) -> Any:
        """Move a collated batch to ``device`` and finish it there (normalise, memory format)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int) -> Tensor:
        """The training loss of a prepared batch (runs under autocast). Randomness beyond the
        global torch RNG (e.g. mixup) must be seeded from ``step``."""

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> dict[str, Any]:
        """Metrics over ``loader`` (runs under autocast; ``model`` is in eval mode): must hold
        ``primary_metric``, ``"loss"`` and ``"n"`` (number of examples)."""

    def records(self) -> dict[str, Any]:
        """Results of the last :meth:`evaluate` that are not one number (e.g. a confusion
        matrix), for ``metrics.jsonl`` and ``vit.evaluate``'s JSON line."""
        return {}

    def on_train_start(self, writer: Any, model: nn.Module, step: int) -> None:  # noqa: B027
        """Extra TensorBoard output before the first training step (``writer`` is None on DDP
        ranks other than 0)."""

    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:  # noqa: B027
        """Extra TensorBoard output after each validation (``model``: the weights validated)."""


TASKS: dict[str, str] = {
    # name → "module:Class", imported on first use so `--task` never pays for unused tasks.
    "classify": "vit.engine.classification:ClassificationTask",
    "caption": "vit.engine.captioning:CaptionTask",
}


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``."""
    if name not in TASKS:
        hint = did_you_mean(name, TASKS, n=1)
        raise ConfigError(f"unknown task {name!r}{hint} (choose from {', '.join(TASKS)})")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
