"""The training engine: run config, tasks, loop, AMP, checkpoints, exact resume, logging.

``python train.py ...`` (a thin wrapper over :func:`main`) trains any registered :class:`Task`;
classification (:class:`ClassificationTask`) is the first. The loop owns everything that is the same
for every task — optimiser, schedule, AMP, EMA, checkpoints, resume, signals, TensorBoard — and asks
the task for its data, model, loss and metrics.

Exact resume: the learning rate is a pure function of the step, data order and augmentation are pure
functions of ``(seed, epoch, index)`` (:mod:`vit.data`), mixup/cutmix are seeded per step, and a
checkpoint holds model, optimiser, scaler, EMA, RNG states and the position in the epoch. A run
killed at any step and resumed with ``--resume auto`` ends with the same weights as one never
interrupted (on the CPU, same seed and thread count).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import types
import typing
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "TASKS",
    "CheckpointError",
    "ClassificationTask",
    "ConfigError",
    "Diverged",
    "RunConfig",
    "Task",
    "Trainer",
    "get_task",
    "load_checkpoint",
    "load_config",
    "load_model",
    "lr_at",
    "main",
    "resolve_device",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "vit.train/1"


class ConfigError(ValueError):
    """An invalid run configuration; the message names the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, unsafe, another architecture)."""


class Diverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved before stopping."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Run configuration
# ----------------------------------------------------------------------------------------------
def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything that defines a training run. YAML files and ``--key value`` options set these
    fields (the command line wins over the file); the resolved config is saved as
    ``config.yaml``."""

    task: str = _opt("classify", "what to train: a name in vit.train.TASKS")
    data: str = _opt("synthetic", "dataset name; valid names depend on --task")
    data_dir: str = _opt("data", "where the dataset lives (cifar10 downloads into it)")
    cache_dir: str = _opt("", "decoded-image cache; '' = $XDG_CACHE_HOME/vit or ~/.cache/vit")
    val_fraction: float = _opt(0.1, "validation share of train when DIR has no val/ or test/")
    img_size: int = _opt(32, "training resolution (images are resized once when decoded)")
    model: str = _opt("vit_tiny_patch4_32", "a name from vit.models.list_models()")
    model_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "model keyword overrides, e.g. '{depth: 6}'"}
    )
    task_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the task itself (see its docs)"}
    )
    epochs: int = _opt(10, "epochs (with --time-limit: the most epochs the schedule may take)")
    batch_size: int = _opt(128, "images per optimiser step")
    optimizer: Literal["adamw", "muon"] = _opt(
        "adamw",
        "muon: Muon (Jordan et al. 2024; vit.optim) on the blocks' weight matrices, AdamW on "
        "embeddings, head, norms and biases, one lr for both (Muon's updates are scaled to "
        "AdamW's RMS)",
    )
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = _opt(
        0.05, "AdamW decoupled weight decay (not on norms/biases/embeddings)"
    )
    beta2: float = _opt(0.999, "AdamW beta2 (also of Muon's AdamW part)")
    warmup_epochs: float = _opt(1.0, "linear warmup length in epochs")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this; 0 = off")
    label_smoothing: float = _opt(0.1, "label smoothing (also applied to mixup targets)")
    mixup: float = _opt(0.0, "mixup alpha (Zhang et al. 2018); 0 = off")
    cutmix: float = _opt(0.0, "cutmix alpha (Yun et al. 2019); 0 = off")
    drop_path: float = _opt(0.0, "stochastic depth rate of the last block")
    ema: bool = _opt(False, "keep EMA weights (timm ModelEmaV3); validation then uses them")
    ema_decay: float = _opt(0.999, "EMA decay (warmed up from 0, so short runs work)")
    crop_padding: int = _opt(4, "random crop after zero padding by this many pixels; 0 = off")
    hflip: bool = _opt(True, "random horizontal flip")
    tta_hflip: bool = _opt(
        False, "classify: validate on each image and its mirror image, averaging the softmaxes"
    )
    randaugment_ops: int = _opt(0, "RandAugment-style operations per image; 0 = off")
    randaugment_magnitude: float = _opt(9.0, "RandAugment magnitude, 0-10")
    cutout: int = _opt(0, "cutout square side in pixels; 0 = off")
    synthetic_train: int = _opt(5000, "synthetic data: training images")
    synthetic_val: int = _opt(1000, "synthetic data: validation (and test) images")
    amp: Literal["bf16", "fp16", "off"] = _opt("off", "autocast dtype; fp16 adds a GradScaler")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto = cuda when available, else cpu")
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: bool = _opt(True, "channels-last memory format for images and conv weights")
    workers: int = _opt(0, "DataLoader worker processes (--loader cpu)")
    threads: int = _opt(0, "CPU threads of torch (set_num_threads); 0 = torch's default")
    loader: Literal["auto", "cpu", "device"] = _opt(
        "auto",
        "cpu: DataLoader + albumentations; device: images and the whole augmentation policy on "
        "the training device (vit.data.DeviceLoader); auto: device on CUDA when the data is an "
        "in-memory image set",
    )
    seed: int = _opt(0, "seed of initialisation, data order, augmentation, dropout")
    out_dir: str = _opt("", "run directory; '' = runs/<task>-<data>")
    resume: str = _opt("", "'auto' (out-dir/last.pt when present) or a checkpoint path")
    time_limit: float = _opt(0.0, "minutes: fit warmup+cosine+final eval into this; 0 = off")
    val_every: int = _opt(
        1, "epochs between validations and checkpoints (the last epoch always validates)"
    )
    save_every: int = _opt(0, "also save last.pt every this many steps; 0 = epoch ends only")
    log_every: int = _opt(50, "steps between training scalars")
    rollout_every: int = _opt(
        1, "epochs between attention-rollout images (at validations); 0 = off"
    )
    rollout_images: int = _opt(8, "validation images shown in the rollout grid")
    rollout_head_fusion: Literal["mean", "max", "min"] = _opt("mean", "rollout head fusion")
    rollout_discard_ratio: float = _opt(0.0, "rollout: share of lowest weights dropped")
    rollout_per_layer: bool = _opt(False, "rollout: also log each layer's attention")


_POSITIVE = (
    "img_size",
    "epochs",
    "batch_size",
    "lr",
    "val_every",
    "log_every",
    "rollout_images",
    "ema_decay",
)
_NON_NEGATIVE = (
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "grad_clip",
    "mixup",
    "cutmix",
    "drop_path",
    "crop_padding",
    "randaugment_ops",
    "randaugment_magnitude",
    "cutout",
    "workers",
    "threads",
    "time_limit",
    "save_every",
    "rollout_every",
    "rollout_discard_ratio",
    "synthetic_train",
    "synthetic_val",
    "seed",
)
_BELOW_ONE = ("label_smoothing", "drop_path", "rollout_discard_ratio", "ema_decay", "beta2")


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return tp.__name__


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping like '{{depth: 6}}', got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(key: str, known: list[str], prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix}{key!r}{hint} (see python train.py --help)")


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate a flat mapping of config keys (YAML keys, underscores) into a :class:`RunConfig`."""
    fields = _fields()
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, list(fields))
        checked[key] = _check_type(key, value, fields[key])
    cfg = RunConfig(**checked)
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)!r}")
    for key in _BELOW_ONE:
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)!r}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    if cfg.randaugment_ops > 0:
        from vit.data import RANDAUGMENT_OPS

        if cfg.randaugment_ops > len(RANDAUGMENT_OPS):
            raise ConfigError(
                f"randaugment_ops is at most {len(RANDAUGMENT_OPS)} (the policy's operations), "
                f"got {cfg.randaugment_ops}"
            )
    if cfg.randaugment_magnitude > 10:
        raise ConfigError(
            f"randaugment_magnitude is on a 0-10 scale, got {cfg.randaugment_magnitude}"
        )
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / f"{cfg.task}-{cfg.data}")
    get_task(cfg.task).check_config(cfg)
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (validated later by :func:`make_config`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (the shipped ones are in configs/)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    return values


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ConfigError: every CLI reports them in one line, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{depth: 6}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """``--config FILE`` plus one option per :class:`RunConfig` field (``--data-dir``, ...)."""
    p = CliParser(
        prog="train.py",
        description="Train a Vision Transformer. Options override the --config file.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of config keys (see configs/)")
    for f in dataclasses.fields(RunConfig):
        tp = _fields()[f.name]
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {f.default!r})"}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw["choices"] = typing.get_args(tp)
        elif typing.get_origin(tp) is dict:
            kw["type"], kw["help"] = _yaml_mapping, f.metadata["help"]
        else:
            kw["type"] = tp
        p.add_argument(flag, dest=f.name, **kw)
    return p


def parse_args(argv: list[str] | None) -> RunConfig:
    """Command line (and its ``--config`` file) → validated :class:`RunConfig`."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        opts = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(bad.split("=")[0], opts, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown option {bad!r}{hint} (see python train.py --help)")
    cli = vars(ns)
    values = load_config(cli.pop("config")) if "config" in cli else {}
    return make_config({**values, **cli})


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
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
            close = difflib.get_close_matches(cfg.data, cls.datasets, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
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
        """``{"name": ..., "kwargs": {...}}``, from which :meth:`model_from_spec` rebuilds it."""

    @staticmethod
    def model_from_spec(spec: dict[str, Any]) -> nn.Module:
        name = spec["name"]
        if name.startswith("timm:"):
            # Any timm model by name, e.g. the reference ViT of benchmarks/time_to_accuracy.py,
            # so that it is trained and measured by the same engine.
            import timm

            if not timm.is_model(name.removeprefix("timm:")):
                raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())")
            return timm.create_model(name.removeprefix("timm:"), **spec["kwargs"])
        from vit.models import create_model

        return create_model(name, **spec["kwargs"])

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

    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:  # noqa: B027
        """Extra TensorBoard output after each validation (``model``: the weights validated)."""


TASKS: dict[str, str] = {
    # name → "module:Class", imported on first use so `--task` never pays for unused tasks.
    "classify": "vit.train:ClassificationTask",
    "caption": "vit.captions:CaptionTask",
}


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {name!r}{hint} (choose from {', '.join(TASKS)})")
    module, cls = TASKS[name].split(":")
    import importlib

    return getattr(importlib.import_module(module), cls)


class ClassificationTask(Task):
    """Image classification with cross-entropy: label smoothing, mixup/cutmix (timm), top-1."""

    datasets = ("cifar10", "imagefolder", "synthetic")
    primary_metric = "top1"
    shards_evaluation = True

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, state)
        self._loaded: dict[str, Any] = {}
        self._val: Dataset | None = None
        self._rollout: Tensor | None = None
        self._norm: tuple[Tensor, Tensor] | None = None  # (mean, std) as (1, 3, 1, 1) tensors
        self._mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            # Mixup's own label smoothing: the soft targets carry it, so it is not lost.
            self._mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=0,  # set once the classes are known
            )

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.task_args:
            raise ConfigError(
                f"task 'classify' takes no task_args, got {sorted(cfg.task_args)}; remove them"
            )
        reserved = {"num_classes", "img_size", "drop_path_rate"} & set(cfg.model_args)
        if reserved:
            raise ConfigError(
                f"set {', '.join(sorted(reserved))} through the run config (--img-size, "
                f"--drop-path; classes come from the data), not model_args"
            )
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
        if cfg.model.startswith("timm:") and cfg.rollout_every > 0:
            raise ConfigError(
                f"attention rollout needs a vit model, not {cfg.model!r}; set --rollout-every 0"
            )
        if cfg.data == "cifar10" and cfg.img_size != 32:
            raise ConfigError(f"CIFAR-10 images are 32x32; set img_size 32 (got {cfg.img_size})")

    # -- data -----------------------------------------------------------------------------------
    def _arrays(self, which: str) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
        """Decoded (images, labels, classes, boxes) of ``which`` in train|val|test|train_all."""
        from vit import data

        if which in self._loaded:
            return self._loaded[which]
        cfg = self.cfg
        boxes = None
        if cfg.data == "synthetic":
            # The data seed is fixed per split (not the run seed): every run sees the same images.
            n = cfg.synthetic_train if which == "train" else cfg.synthetic_val
            x, y, boxes = data.synthetic(
                n, img_size=cfg.img_size, seed={"train": 1, "val": 2, "test": 3}[which]
            )
            out = (x, y, list(data.SYNTHETIC_CLASSES), boxes)
        elif cfg.data == "cifar10":
            # The official test split validates (the usual CIFAR protocol; see README).
            x, y, classes = data.cifar10(cfg.data_dir, train=which == "train")
            out = (x, y, classes, None)
        else:
            out = self._image_folder(which)
        self._loaded[which] = out
        return out

    def _image_folder(self, which: str) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
        from vit import data

        root = Path(self.cfg.data_dir)
        if not (root / "train").is_dir():
            raise data.DataError(
                f"--data imagefolder expects {root}/train/<class>/<image> (optional {root}/val or "
                f"{root}/test); {root / 'train'} does not exist"
            )
        kw = {"img_size": self.cfg.img_size, "cache_dir": self.cfg.cache_dir or None}
        held_out = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if which == "test":
            if not (root / "test").is_dir():
                raise data.DataError(
                    f"no test split: {root / 'test'} does not exist; use --split val"
                )
            held_out = root / "test"
        if which != "train" and held_out is not None:
            x, y, classes = data.image_folder(held_out, **kw)
            _, _, train_classes, _ = self._arrays("train")
            if classes != train_classes:
                raise data.DataError(
                    f"{held_out} has classes {classes} but {root / 'train'} has {train_classes}; "
                    f"both need the same class folders"
                )
            return x, y, classes, None
        x, y, classes = data.image_folder(root / "train", **kw)
        if held_out is not None:
            return x, y, classes, None
        # No val/ or test/: carve a deterministic stratified validation split out of train.
        train_idx, val_idx = data.split_indices(y, self.cfg.val_fraction)
        self._loaded["train"] = (x[train_idx], y[train_idx], classes, None)
        self._loaded["val"] = (x[val_idx], y[val_idx], classes, None)
        return self._loaded[which]

    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        from vit import data

        x, y, classes, boxes = self._arrays(split)
        if "classes" in self.state and self.state["classes"] != classes:
            raise data.DataError(
                f"the model was trained on classes {self.state['classes']} but {self.cfg.data} "
                f"has {classes}; evaluate on data with the same classes"
            )
        if split == "train" and "mean" not in self.state:
            # Inputs are normalised with the training set's own channel statistics, kept in the
            # task state so evaluation and rollout feed the model what it was trained on.
            pixels = x.reshape(-1, 3)[:: max(1, x.numel() // 3 // 2_000_000)].float() / 255
            self.state.update(
                classes=classes,
                mean=[round(v, 4) for v in pixels.mean(0).tolist()],
                std=[round(v, 4) for v in pixels.std(0).tolist()],
            )
        ds = data.ImageDataset(x, y, classes, boxes=boxes)
        if split == "train":
            cfg = self.cfg
            transform = data.build_transform(cfg.img_size, **_augmentation_policy(cfg))
            ds = ds.with_transform(transform, seed=cfg.seed)
            if self._mixup is not None:
                self._mixup.num_classes = len(classes)
        else:
            self._val = ds
        return ds

    # -- model ----------------------------------------------------------------------------------
    def model_spec(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs = {
            **cfg.model_args,
            "num_classes": len(self.state["classes"]),
            "img_size": cfg.img_size,
            "drop_path_rate": cfg.drop_path,
        }
        return {"name": cfg.model, "kwargs": kwargs}

    def build_model(self) -> nn.Module:
        try:
            return self.model_from_spec(self.model_spec())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build model {self.cfg.model!r}: {e}") from None

    # -- steps ----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = x.to(device, non_blocking=True).float().div_(255)  # uint8 (B,3,H,W) → [0, 1]
        if self._norm is None or self._norm[0].device != x.device:  # made once, not every step
            stats = torch.tensor([self.state["mean"], self.state["std"]], device=x.device)
            self._norm = tuple(rearrange(stats, "two c -> two 1 c 1 1"))
        mean, std = self._norm
        x = (x - mean) / std
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int) -> Tensor:
        x, y = batch
        if self._mixup is None:
            return F.cross_entropy(model(x), y, label_smoothing=self.cfg.label_smoothing)
        from timm.loss import SoftTargetCrossEntropy

        # timm's Mixup draws from numpy's global RNG: seed it per step (exact resume) and put the
        # caller's state back.
        saved = np.random.get_state()
        np.random.seed(_step_seed(self.cfg.seed, step))
        try:
            x, soft = self._mixup(x, y)
        finally:
            np.random.set_state(saved)
        return SoftTargetCrossEntropy()(model(x), soft)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> dict[str, Any]:
        total_loss, correct, n = 0.0, 0, 0
        for batch in loader:
            x, y = self.prepare_batch(batch, device)
            logits = model(x).float()
            if self.cfg.tta_hflip:  # test-time augmentation: log of the mean of the two softmaxes
                pair = torch.stack([logits, model(x.flip(-1)).float()]).log_softmax(-1)
                logits = pair.logsumexp(0) - math.log(2)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each DDP rank validated its share (shards_evaluation): add up the sums.
            sums = torch.tensor([total_loss, correct, n], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            total_loss, correct, n = sums[0].item(), round(sums[1].item()), round(sums[2].item())
        return {"top1": correct / n, "loss": total_loss / n, "n": n}

    # -- rollout --------------------------------------------------------------------------------
    def _rollout_batch(self) -> Tensor:
        """A fixed, deterministic set of validation images, recorded in rollout_images.json."""
        if self._rollout is None:
            assert self._val is not None
            g = torch.Generator().manual_seed(0)
            k = min(self.cfg.rollout_images, len(self._val))
            idx = torch.randperm(len(self._val), generator=g)[:k].sort().values.tolist()
            images = torch.stack([self._val[i][0] for i in idx])  # uint8 (K, 3, H, W)
            record = {
                "split": "val",
                "indices": idx,
                "labels": [int(self._val[i][1]) for i in idx],
                "classes": self.state["classes"],
            }
            out = Path(self.cfg.out_dir)
            (out / "rollout_images.json").write_text(json.dumps(record, indent=1) + "\n")
            self._rollout = images
        return self._rollout

    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:
        cfg = self.cfg
        if writer is None or cfg.rollout_every == 0 or (epoch + 1) % cfg.rollout_every:
            return
        from vit.rollout import log_rollout

        images = self._rollout_batch()
        device = next(model.parameters()).device
        x, _ = self.prepare_batch((images, torch.zeros(len(images), dtype=torch.long)), device)
        log_rollout(
            writer,
            model,
            x,
            images.float() / 255,
            step,
            head_fusion=cfg.rollout_head_fusion,
            discard_ratio=cfg.rollout_discard_ratio,
            per_layer=cfg.rollout_per_layer,
        )


def _step_seed(seed: int, step: int) -> int:
    from vit.data import sample_seed

    return sample_seed(seed, step, 1 << 41)


# ----------------------------------------------------------------------------------------------
# Schedule, device, checkpoints
# ----------------------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps`` (Loshchilov & Hutter 2017, without restarts). A pure function of the step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but no CUDA device is available; use "
            "--device cpu or --device auto"
        )
    return torch.device(name)


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary file, then a rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (no code runs), or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (torch.save writes a "
            f"zip archive); pass a last.pt or best.pt written by train.py"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below is the answer
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects that would run code when "
                f"unpickled; only checkpoints written by vit.train (tensors and plain data) load"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt, or a plain pickle (never loaded, as "
            f"unpickling can run code)"
        ) from None
    except Exception as e:  # any other failure to parse the file (zip, struct, EOF, ...)
        first = (str(e) or type(e).__name__).split(". ")[0].splitlines()[0]
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated ({first})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a vit training checkpoint (no format {CHECKPOINT_FORMAT!r}); for timm "
            f"or plain state dicts use vit.models.from_timm / load_state_dict"
        )
    return ckpt


def _strip_compile_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # torch.compile wraps the model as `_orig_mod`; checkpoints hold the plain module's names.
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def _load_weights(model: nn.Module, state: dict[str, Tensor], path: Path, spec: Any) -> None:
    try:
        model.load_state_dict(_strip_compile_prefix(state))
    except RuntimeError as e:
        detail = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(
            f"checkpoint {path} holds another architecture ({spec}) than this run's model "
            f"({detail.strip()}); use the same --model and model_args, or another --out-dir"
        ) from None


def load_model(
    path: str | Path, weights: Literal["ema", "model"] = "ema"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode (EMA weights when it has them and
    ``weights="ema"``). Returns ``(model, checkpoint)``; the checkpoint's ``task_state`` holds e.g.
    the class names and the input normalisation (``mean``, ``std``)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    task_cls = get_task(ckpt["task"])
    model = task_cls.model_from_spec(ckpt["model_spec"])
    state = ckpt["ema"] if weights == "ema" and ckpt.get("ema") is not None else ckpt["model"]
    _load_weights(model, state, path, ckpt["model_spec"])
    return model.eval(), ckpt


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Under torchrun (``WORLD_SIZE`` > 1) this process joins the
    group from torchrun's environment: nccl with one GPU per process (``LOCAL_RANK``) on CUDA,
    gloo on the CPU. ``batch_size`` stays the global batch and must divide among the ranks."""
    device = resolve_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch and must divide among the "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def _leave_process_group(*, agreed: bool) -> None:
    """End DDP: after an exit every rank agreed on, wait for the others first (rank 0 may still
    be writing the last checkpoint); after a one-rank error, leave at once (torchrun stops the
    rest) rather than wait in a barrier the others never reach."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if agreed:
            dist.barrier()
        dist.destroy_process_group()


class _WaitClock:
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


def _augmentation_policy(cfg: RunConfig) -> dict[str, Any]:
    """The training augmentation's settings, as both loaders take them
    (``vit.data.build_transform`` and ``vit.data.DeviceLoader``)."""
    keys = ("crop_padding", "hflip", "randaugment_ops", "randaugment_magnitude", "cutout")
    return {k: getattr(cfg, k) for k in keys}


def build_optimizer(
    model: nn.Module, cfg: RunConfig, *, distributed: bool = False
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over timm's parameter groups (no weight decay on norms, biases and the
    model's ``no_weight_decay()``), at ``cfg.lr``; the scheduler sets each step's lr.
    ``distributed``: the default process group's ranks hold DDP-averaged gradients."""
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    from timm.optim import param_groups_weight_decay

    # Muon orthogonalises the updates of hidden weight matrices only: the input and output
    # layers stay with AdamW (Jordan et al. 2024), as do 1-D parameters.
    fallback = ("*patch_embed.*", "*token_embed.*", "head.*") if cfg.optimizer == "muon" else ()
    groups = param_groups_weight_decay(
        model, cfg.weight_decay, no_weight_decay_list=nwd, fallback_list=fallback
    )
    betas = (0.9, cfg.beta2)
    if cfg.optimizer == "muon":
        from vit.optim import Muon

        # Under DDP the ranks split the Newton-Schulz iterations (vit.optim.Muon).
        group = torch.distributed.group.WORLD if distributed else None
        return Muon(groups, lr=cfg.lr, betas=betas, process_group=group)
    # On CUDA one fused kernel updates every parameter (the foreach default launches several
    # per group); the results agree to rounding.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    best: float = -math.inf
    best_step: int = -1
    skipped_steps: int = 0  # fp16: steps the GradScaler skipped (inf/NaN gradients)


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` returns the final validation metrics."""

    def __init__(self, cfg: RunConfig) -> None:
        self.t_start = time.monotonic()
        if cfg.threads:
            # Small models on a CPU run several times faster on one thread than on all cores.
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.rank, self.world_size, self.device = _init_distributed(cfg)
        self.is_main = self.rank == 0  # logs, checkpoints and the progress bar are rank 0's
        self.out = Path(cfg.out_dir)
        resume = self._resume_path()
        ckpt = load_checkpoint(resume) if resume else None
        task_cls = get_task(cfg.task)
        if ckpt is not None and ckpt["task"] != cfg.task:
            raise CheckpointError(f"{resume} is a {ckpt['task']!r} checkpoint, not {cfg.task!r}")
        self.task = task_cls(cfg, ckpt["task_state"] if ckpt else None)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.train_set = self.task.build_dataset("train")
        self.val_set = self.task.build_dataset("val")
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {cfg.batch_size} exceeds the {len(self.train_set)} training images; "
                f"lower --batch-size"
            )
        self.model = self.task.build_model().to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg, distributed=self.world_size > 1)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # what autocast leaves in fp32
            torch.backends.cudnn.allow_tf32 = True
            # cuDNN's fused attention backward returns NaN gradients on Hopper GPUs in known
            # cases (pytorch/pytorch#196678); two bf16 CIFAR runs on an H100 stopped with a NaN
            # loss (steps 566 and 1268, sound gradient norms before). Flash and memory-efficient
            # attention take over at the same speed.
            torch.backends.cuda.enable_cudnn_sdp(False)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        # AMP is decided once here; the loop has no dtype branches.
        self.autocast = (
            torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True)
        self.train_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP averages the ranks' gradients; each rank's loss is the mean over its share of
            # the global batch, so a step equals the single-process step on the whole batch.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
            # The initialisation above is shared; dropout and drop path must differ per rank.
            torch.manual_seed(cfg.seed + self.rank)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        total = cfg.epochs * self.steps_per_epoch
        warmup = min(round(cfg.warmup_epochs * self.steps_per_epoch), total)
        self.progress = _Progress(total_steps=total, warmup_steps=warmup)
        self.resumed_from = resume
        self.last_metrics: dict[str, Any] = {}  # a checkpoint restores them
        if ckpt is not None:
            self._restore(ckpt, resume)
        self.collate = self.task.collate_fn()
        self.device_loader = self._use_device_loader()
        self.train_loader = self._loader(self.train_set, cfg.batch_size, train=True)
        self.val_loader = self._loader(self.val_set, 2 * cfg.batch_size, train=False)
        self._signal: int | None = None
        self._stop = False  # under DDP: some rank was signalled (agreed at each step)
        self._data_clock = _WaitClock()
        self._unchecked: list[tuple[int, Tensor, Tensor]] = []  # (step, loss, grad norm)

    def _use_device_loader(self) -> bool:
        """Resolve ``--loader``: the device loader needs in-memory images batched without a collate
        function, and only pays off on CUDA (``auto``)."""
        from vit.data import ImageDataset

        cfg = self.cfg
        why = None
        if not all(isinstance(d, ImageDataset) for d in (self.train_set, self.val_set)):
            why = f"task {cfg.task!r} does not keep its data as an in-memory ImageDataset"
        elif self.collate is not None:
            why = f"task {cfg.task!r} collates its own batches"
        if cfg.loader == "device" and why is not None:
            raise ConfigError(f"--loader device cannot be used: {why}; use --loader cpu or auto")
        return cfg.loader == "device" or (
            cfg.loader == "auto" and why is None and self.device.type == "cuda"
        )

    def _loader(self, ds: Dataset, batch_size: int, *, train: bool) -> Any:
        """The training or validation loader: a DataLoader, or the device-resident loader, of
        this rank's share of each global batch."""
        from vit import data

        cfg = self.cfg
        shard = train or self.task.shards_evaluation
        ranks = {"rank": self.rank, "world_size": self.world_size} if shard else {}
        if self.device_loader:
            return data.DeviceLoader(
                ds,
                batch_size,
                device=self.device,
                seed=cfg.seed,
                shuffle=train,
                drop_last=train,
                **(_augmentation_policy(cfg) if train else {}),
                **ranks,
            )
        return data.make_loader(
            ds,
            batch_size,
            seed=cfg.seed,
            shuffle=train,
            drop_last=train,
            workers=cfg.workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            **ranks,
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        cfg, last = self.cfg, self.out / "last.pt"
        if cfg.resume == "auto":
            return last if last.is_file() else None
        if cfg.resume:
            if not Path(cfg.resume).is_file():
                raise CheckpointError(f"--resume {cfg.resume}: no such checkpoint file")
            return Path(cfg.resume)
        if last.is_file():
            raise ConfigError(
                f"{self.out} already holds a run ({last}); continue it with --resume auto or "
                f"choose another --out-dir"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.cfg.task,
            "task_state": self.task.state,
            "model_spec": self.task.model_spec(),
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "rng": self._rng_states(),
            "metrics": self.last_metrics,
        }

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        _load_weights(self.model, ckpt["model"], path, ckpt["model_spec"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        elif self.ema is not None:  # EMA switched on mid-run: start it from the current weights
            self.ema.module.load_state_dict(self.model.state_dict())
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this model ({e})"
            ) from None
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = _Progress(**ckpt["progress"])
        self.last_metrics = dict(ckpt.get("metrics") or {})
        rng = ckpt["rng"]
        if "ranks" in rng:  # a DDP checkpoint: this rank's state (rank 0's after a world change)
            ranks = rng["ranks"]
            rng = ranks[self.rank] if len(ranks) == self.world_size else ranks[0]
        _set_rng_state(rng)

    def _rng_states(self) -> dict[str, Any]:
        """The RNG state; under DDP every rank's (a collective call), for exact resume."""
        if self.world_size == 1:
            return _rng_state()
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, _rng_state())
        return {"ranks": states}

    def save(self, name: str = "last.pt") -> Path:
        self.check_finite()  # never replace a good checkpoint with diverged weights
        path = self.out / name
        state = self.state_dict()  # every rank: gathering the RNG states is collective under DDP
        if self.is_main:
            save_checkpoint(state, path)
        return path

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, Any]:
        """One optimiser step on a collated batch; returns loss, lr and gradient norm.

        The loss and gradient norm stay tensors and are checked for NaN/inf later, in
        :meth:`check_finite` (at log steps, before every checkpoint and every 1000 steps): reading
        them here would make the host wait for the device at every step."""
        p = self.progress
        lr = lr_at(
            p.step,
            lr=self.cfg.lr,
            min_lr=self.cfg.min_lr,
            warmup_steps=p.warmup_steps,
            total_steps=p.total_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.task.prepare_batch(batch, self.device)
        with self.autocast:
            loss = self.task.loss(self.train_model, batch, p.step)
        value = self._sync_step(loss)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        skipped = False
        if self.scaler.is_enabled():  # fp16: the step is skipped when the gradients hold inf/NaN
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
            p.skipped_steps += skipped
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and not skipped:
            self.ema.update(self.model, step=p.step)
        value, grad_norm = value.detach(), grad_norm.detach()
        self._unchecked.append((p.step, value, grad_norm))
        if len(self._unchecked) >= 1000:  # with a long --log-every, still bounded
            self.check_finite()
        p.step += 1
        return {"loss": value, "lr": lr, "grad_norm": grad_norm, "skipped": float(skipped)}

    def check_finite(self) -> None:
        """Raise :class:`Diverged` naming the first step since the last check whose loss (or,
        without fp16's GradScaler, gradient norm) was NaN or inf; one host-device sync."""
        if not self._unchecked:
            return
        steps, losses, norms = zip(*self._unchecked, strict=True)
        self._unchecked.clear()
        values = torch.stack([torch.stack(losses).float(), torch.stack(norms).float()]).cpu()
        for what, row in zip(("loss", "gradient norm"), values, strict=True):
            if what == "gradient norm" and self.scaler.is_enabled():
                continue  # fp16: the GradScaler skips those steps
            bad = (~torch.isfinite(row)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise Diverged(f"the {what} became {row[i].item()} at step {steps[i]}")

    def _sync_step(self, loss: Tensor) -> Tensor:
        """The loss, averaged over DDP ranks together with a "signalled" flag: every rank then
        agrees on the step after which to stop (one rank stopping alone would leave the others
        waiting in the next all-reduce). A single process returns it without waiting for it."""
        if self.world_size == 1:
            return loss
        flag = torch.tensor(float(self._signal is not None), device=loss.device)
        both = torch.stack([loss.detach().float(), flag])
        torch.distributed.all_reduce(both)
        self._stop = both[1].item() > 0
        return both[0] / self.world_size

    # -- validation -----------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> dict[str, Any]:
        model = self.eval_model()
        was_training = model.training
        model.eval()
        try:
            with self.autocast:
                return self.task.evaluate(model, self.val_loader, self.device)
        finally:
            model.train(was_training)

    # -- time limit -----------------------------------------------------------------------------
    def _fit_schedule(self, step_time: float, epoch_end: float | None = None) -> None:
        """Size the schedule so warmup, cosine, the validations and checkpoints (every
        ``val_every`` epochs) and the final ones all end within ``--time-limit``, from the
        measured step time and epoch-end time (before the first validation: validating a sample
        costs about a third of a training step, checkpoints are written at 200 MB/s)."""
        cfg, p = self.cfg, self.progress
        remaining = cfg.time_limit * 60 - (time.monotonic() - self.t_start)
        if epoch_end is None:
            per_sample = step_time / cfg.batch_size
            n_params = sum(t.numel() for t in self.model.parameters())
            epoch_end = len(self.val_set) * per_sample / 3 + 0.2 + n_params * 16 / 200e6
        margin = 0.03 * cfg.time_limit * 60 + 2.0
        budget = remaining - margin - epoch_end
        per_step = step_time + epoch_end / (self.steps_per_epoch * cfg.val_every)
        steps = max(p.step + 1, p.step + int(budget / per_step))
        p.total_steps = min(steps, cfg.epochs * self.steps_per_epoch)
        p.warmup_steps = min(p.warmup_steps, p.total_steps // 5)
        if self.world_size > 1:
            # Each rank timed its own steps; rank 0's schedule is everyone's, or they stop apart.
            sched = torch.tensor([p.total_steps, p.warmup_steps], device=self.device)
            torch.distributed.broadcast(sched, 0)
            p.total_steps, p.warmup_steps = sched.tolist()
        if not self.is_main:
            return
        print(
            f"time limit {cfg.time_limit:g} min: {step_time * 1e3:.0f} ms/step, "
            f"{epoch_end:.1f} s per epoch end → "
            f"{p.total_steps} steps ({p.total_steps / self.steps_per_epoch:.1f} epochs)",
            file=sys.stderr,
        )

    # -- logging --------------------------------------------------------------------------------
    def _open_logs(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        metrics = self.out / "metrics.jsonl"
        if self.resumed_from is not None and metrics.exists():
            # Drop what the interrupted run logged after its checkpoint: it is about to be redone.
            keep = [
                line
                for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.progress.step
            ]
            metrics.write_text("".join(line + "\n" for line in keep))
        self._metrics_file = metrics.open("a")
        purge = self.progress.step if self.resumed_from is not None else None
        return SummaryWriter(str(self.out), purge_step=purge)

    def _log(self, writer: Any, kind: str, values: dict[str, Any]) -> None:
        if writer is None:  # DDP ranks other than 0
            return
        p = self.progress
        # "seconds": since this process started (the time-to-accuracy curve).
        seconds = round(time.monotonic() - self.t_start, 2)
        record = {"kind": kind, "step": p.step, "epoch": p.epoch, "seconds": seconds, **values}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        for k, v in values.items():
            if k != "n" and isinstance(v, (int, float)):
                writer.add_scalar(f"{kind}/{k}", v, p.step)

    # -- signals --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _catch_signals(self) -> Iterator[None]:
        def handler(signum: int, frame: types.FrameType | None) -> None:
            if self._signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._signal = signum

        saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in saved.items():
                signal.signal(s, h)

    def _check_signal(self) -> None:
        if self._stop if self.world_size > 1 else self._signal is not None:
            path = self.save()
            name = signal.Signals(self._signal or signal.SIGTERM).name
            raise Interrupted(
                self._signal or signal.SIGTERM,
                f"{name} at step {self.progress.step}: saved {path}; continue with --resume auto",
            )

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule; returns the final validation metrics."""
        import yaml
        from tqdm import tqdm

        cfg, p = self.cfg, self.progress
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out / "config.yaml").write_text(
                yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
            )
        writer = self._open_logs() if self.is_main else None
        sampler = self.train_loader.batch_sampler
        # --time-limit: fit the schedule from steps 2-12 (step 0 pays for torch.compile), then
        # again at each epoch end in the first 90% of it, from the steps since the last fit and
        # the last measured validation and checkpoint time, so a machine that slows down midway
        # still ends on time. A resumed run keeps its schedule.
        timed = cfg.time_limit > 0 and self.resumed_from is None
        fit_at = p.step + 12 if timed else -1
        t_fit, step_fit, epoch_end = None, 0, None
        quiet = not sys.stderr.isatty()
        self.model.train()
        self.t_train = time.monotonic()
        try:
            with self._catch_signals():
                while p.step < p.total_steps:
                    sampler.set_epoch(p.epoch, p.batch_in_epoch)
                    bar = tqdm(
                        total=self.steps_per_epoch,
                        initial=p.batch_in_epoch,
                        desc=f"epoch {p.epoch + 1}",
                        disable=quiet or not self.is_main,
                        leave=False,
                    )
                    t_log, seen = time.monotonic(), 0
                    self._data_clock.take()
                    for batch in self._data_clock.iterate(self.train_loader):
                        stats = self.train_step(batch)
                        p.batch_in_epoch += 1
                        seen += cfg.batch_size
                        bar.update()
                        if p.step == fit_at - 10:
                            t_fit, step_fit = time.monotonic(), p.step
                        elif p.step == fit_at and t_fit is not None:
                            self._fit_schedule((time.monotonic() - t_fit) / 10)
                        if p.step % cfg.log_every == 0:
                            self.check_finite()
                            stats = {k: float(v) for k, v in stats.items()}
                            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                            now = time.monotonic()
                            stats["images_per_s"] = seen / (now - t_log)
                            # Share of the wall time spent waiting for the next batch.
                            stats["data_wait"] = self._data_clock.take() / (now - t_log)
                            t_log, seen = now, 0
                            self._log(writer, "train", stats)
                        if cfg.save_every and p.step % cfg.save_every == 0:
                            self.save()
                        self._check_signal()
                        if p.step >= p.total_steps:
                            break
                    bar.close()
                    t_end = time.monotonic()
                    if self._end_epoch(writer):
                        epoch_end = time.monotonic() - t_end
                    if timed and p.step < 0.9 * p.total_steps:
                        if t_fit is None:  # an epoch shorter than the first fit's 12 steps
                            t_fit, step_fit = self.t_train, 0
                        self._fit_schedule((t_end - t_fit) / (p.step - step_fit), epoch_end)
                        t_fit, step_fit, fit_at = time.monotonic(), p.step, -1
                    self._check_signal()
            if writer is not None:
                writer.add_hparams(
                    _hparams(cfg),
                    {f"hparam/best_{self.task.primary_metric}": p.best},
                    run_name=".",
                    global_step=p.step,
                )
        finally:
            if writer is not None:
                writer.close()
                self._metrics_file.close()
        return self.last_metrics

    def _end_epoch(self, writer: Any) -> bool:
        """Count the epoch; every ``val_every`` epochs and at the end, validate, log and save.
        Returns whether it validated."""
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        if p.epoch % self.cfg.val_every and p.step < p.total_steps:
            return False
        metrics = self.validate()
        self.last_metrics = metrics
        primary = metrics[self.task.primary_metric]
        self._log(writer, "val", metrics)
        self.task.on_epoch_end(writer, self.eval_model(), p.step, p.epoch - 1)
        if primary > p.best:
            p.best, p.best_step = primary, p.step
            self.save("best.pt")
        self.save()
        if writer is None:  # DDP ranks other than 0
            return True
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "n")
        print(
            f"epoch {p.epoch} step {p.step}/{p.total_steps}: val {shown} "
            f"(best {self.task.primary_metric} {p.best:.4g}) "
            f"[{time.monotonic() - self.t_start:.0f} s]",
            file=sys.stderr,
        )
        writer.flush()
        return True


def _hparams(cfg: RunConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
        for k, v in dataclasses.asdict(cfg).items()
    }


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run a training; returns the final validation metrics plus the best primary metric."""
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    p = trainer.progress
    return {
        **metrics,
        f"best_{trainer.task.primary_metric}": p.best,
        "steps": p.step,
        "skipped_steps": p.skipped_steps,
        "seconds": round(time.monotonic() - trainer.t_start, 1),
        "out_dir": str(trainer.out),
    }


def main(argv: list[str] | None = None) -> int:
    """``python train.py``: exit 0 when done, 2 on bad input (one line on stderr), 1 when the loss
    diverges, 128+signal after SIGTERM/SIGINT (a checkpoint is saved first)."""
    from vit.data import DataError

    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        _leave_process_group(agreed=False)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        _leave_process_group(agreed=True)
        print(f"error: {e}; stopped, the last good checkpoint is kept", file=sys.stderr)
        return 1
    except Interrupted as e:
        _leave_process_group(agreed=True)
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    _leave_process_group(agreed=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0
