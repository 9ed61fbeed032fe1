"""Image classification: cross-entropy with label smoothing, mixup/cutmix (timm), top-1."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vit.engine.config import RunConfig
from vit.engine.distributed import world_size
from vit.engine.tasks import Task
from vit.errors import ConfigError, DataError
from vit.fileio import atomic_write
from vit.models import build
from vit.preprocess import Preprocess
from vit.rollout import colorize

__all__ = ["ClassificationTask", "confusion_image"]


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
        self.last_confusion: Tensor | None = None  # of the last evaluate(), for TensorBoard
        self.paths: dict[str, list[Path]] = {}  # image files of each split, for image folders
        self._preprocess: Preprocess | None = None  # from state["preprocess"], on first use
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
        world = world_size()
        micro = cfg.batch_size // world // cfg.grad_accum_steps
        if (cfg.mixup > 0 or cfg.cutmix > 0) and micro % 2:
            # timm's Mixup pairs each micro-batch with its reverse: every rank's micro-batch (the
            # batch per process over --grad-accum-steps) must be even.
            shares = [f"{cfg.batch_size // world} per process on {world}"] if world > 1 else []
            if cfg.grad_accum_steps > 1:
                shares.append(
                    f"micro-batches of {micro} with grad_accum_steps {cfg.grad_accum_steps}"
                )
            detail = f" ({', '.join(shares)})" if shares else ""
            raise ConfigError(
                f"mixup/cutmix need an even micro-batch per process, got batch_size "
                f"{cfg.batch_size}{detail}; use a multiple of {2 * world * cfg.grad_accum_steps}"
            )
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
        if which != "train" and "classes" in self.state and not (root / "train").is_dir():
            return self._held_out_only(root, which)
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
            self.paths[which] = data.list_image_folder(held_out)[0]
            _, _, train_classes, _ = self._arrays("train")
            if classes != train_classes:
                raise data.DataError(
                    f"{held_out} has classes {classes} but {root / 'train'} has {train_classes}; "
                    f"both need the same class folders"
                )
            return x, y, classes, None
        x, y, classes = data.image_folder(root / "train", **kw)
        if len(classes) == 1:
            raise DataError(
                f"{root / 'train'} has one class folder ({classes[0]!r}): a classifier of one "
                f"class cannot be wrong, so it learns nothing; add a folder per class"
            )
        files = data.list_image_folder(root / "train")[0]
        if held_out is not None:
            self.paths["train"] = files
            return x, y, classes, None
        # No val/ or test/: carve a deterministic stratified validation split out of train.
        train_idx, val_idx = data.split_indices(y, self.cfg.val_fraction)
        self._loaded["train"] = (x[train_idx], y[train_idx], classes, None)
        self._loaded["val"] = (x[val_idx], y[val_idx], classes, None)
        self.paths.update(
            train=[files[i] for i in train_idx.tolist()], val=[files[i] for i in val_idx.tolist()]
        )
        return self._loaded[which]

    def _held_out_only(self, root: Path, which: str) -> tuple[Tensor, Tensor, list[str], None]:
        """Evaluation of a trained model on ``root/val`` (or ``root/test``) without a
        ``root/train``: the class list is the checkpoint's."""
        from vit import data

        folder = root / which
        if which == "val" and not folder.is_dir():
            folder = root / "test"
        if not folder.is_dir():
            raise data.DataError(
                f"{root} has no {which}/ folder (nor train/ to split one from); pass the folder "
                f"that holds {which}/<class>/<image>"
            )
        x, y, classes = data.image_folder(
            folder, img_size=self.cfg.img_size, cache_dir=self.cfg.cache_dir or None
        )
        self.paths[which] = data.list_image_folder(folder)[0]
        return x, y, classes, None

    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        from vit import data

        x, y, classes, boxes = self._arrays(split)
        if "classes" in self.state and self.state["classes"] != classes:
            raise data.DataError(
                f"the model was trained on classes {self.state['classes']} but {self.cfg.data} "
                f"has {classes}; evaluate on data with the same classes"
            )
        if split == "train" and "preprocess" not in self.state:
            # Inputs are normalised with the training set's own channel statistics, kept in the
            # task state so evaluation, prediction and rollout feed the model what it was
            # trained on (vit.preprocess records the decoding and resizing too).
            pixels = x.reshape(-1, 3)[:: max(1, x.numel() // 3 // 2_000_000)].float() / 255
            preprocess = Preprocess(
                self.cfg.img_size,
                mean=tuple(round(v, 4) for v in pixels.mean(0).tolist()),
                std=tuple(round(v, 4) for v in pixels.std(0).tolist()),
            )
            self.state.update(classes=classes, preprocess=preprocess.to_dict())
        ds = data.ImageDataset(x, y, classes, boxes=boxes)
        if split == "train":
            cfg = self.cfg
            transform = data.build_transform(cfg.img_size, cfg.augment_policy())
            ds = ds.with_transform(transform, seed=cfg.seed)
            if self._mixup is not None:
                self._mixup.num_classes = len(classes)
        else:
            self._val = ds
        return ds

    @property
    def preprocess(self) -> Preprocess:
        """How files become this model's input (set once the training set is known); built once,
        not at every training step."""
        if self._preprocess is None:
            if "preprocess" not in self.state and "mean" in self.state:  # older checkpoints
                self.state["preprocess"] = Preprocess(
                    self.cfg.img_size, tuple(self.state.pop("mean")), tuple(self.state.pop("std"))
                ).to_dict()
            self._preprocess = Preprocess.from_dict(self.state["preprocess"])
        return self._preprocess

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
            return build(self.model_spec())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build model {self.cfg.model!r}: {e}") from None

    # -- steps ----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = self.preprocess.normalize(x.to(device, non_blocking=True))  # uint8 (B,3,H,W) → float
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
        self,
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Top-1 (and top-5 with more than five classes), the mean cross-entropy and each class's
        accuracy (``top1/<class>``, its recall); the confusion matrix (rows: true class, columns:
        predicted) goes to :meth:`records`. ``predictions``: a list to receive one record per
        image, in the loader's order."""
        classes = self.state["classes"]
        c = len(classes)
        confusion = torch.zeros(c * c, dtype=torch.long, device=device)
        total_loss, top5 = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in loader:
            x, y = self.prepare_batch(batch, device)
            logits = model(x).float()
            if self.cfg.tta_hflip:  # test-time augmentation: log of the mean of the two softmaxes
                pair = torch.stack([logits, model(x.flip(-1)).float()]).log_softmax(-1)
                logits = pair.logsumexp(0) - math.log(2)
            total_loss += F.cross_entropy(logits, y, reduction="sum").double()
            pred = logits.argmax(-1)
            confusion += torch.bincount(y * c + pred, minlength=c * c)
            if c > 5:
                top5 += (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).sum()
            if predictions is not None:
                probs = logits.softmax(-1).max(-1).values
                predictions += [
                    {"label": classes[t], "predicted": classes[q], "prob": round(float(pr), 6)}
                    for t, q, pr in zip(y.tolist(), pred.tolist(), probs.tolist(), strict=True)
                ]
        sums = torch.cat([total_loss[None], torch.as_tensor(top5, device=device).double()[None]])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each DDP rank validated its share (shards_evaluation): add up the sums.
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(confusion)
        matrix = confusion.view(c, c).cpu()
        n = int(matrix.sum())
        per_class = matrix.diag().double() / matrix.sum(1).clamp_min(1)
        self.last_confusion = matrix
        metrics = {"top1": int(matrix.diag().sum()) / n}
        if c > 5:
            metrics["top5"] = sums[1].item() / n
        metrics |= {"loss": sums[0].item() / n, "n": n}
        # Per-class accuracy as flat keys ("top1/cat"): one TensorBoard curve per class.
        return metrics | {f"top1/{k}": v for k, v in zip(classes, per_class.tolist(), strict=True)}

    def records(self) -> dict[str, Any]:
        return {} if self.last_confusion is None else {"confusion": self.last_confusion.tolist()}

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
            with atomic_write(out / "rollout_images.json") as f:
                f.write(json.dumps(record, indent=1) + "\n")
            self._rollout = images
        return self._rollout

    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:
        cfg = self.cfg
        if writer is None:
            return
        if self.last_confusion is not None:
            writer.add_image("val/confusion", confusion_image(self.last_confusion), step)
        if cfg.rollout_every == 0 or (epoch + 1) % cfg.rollout_every:
            return
        from vit.rollout.tensorboard import log_rollout

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


def confusion_image(confusion: Tensor, cell: int = 0) -> Tensor:
    """A confusion matrix (C, C) as a picture: uint8 (3, H, W), each row normalised (the share of
    a true class predicted as each class), jet colours, ``cell`` pixels per entry (default: a
    256-pixel image, at least 4 per entry), a white grid."""
    c = confusion.shape[0]
    cell = cell or max(4, 256 // c)
    shares = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    big = shares.float().repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # (C·cell, C·cell)
    image = colorize(big[None])[0]
    image[:, ::cell, :] = 1.0
    image[:, :, ::cell] = 1.0
    return (image * 255).round().to(torch.uint8)


def _step_seed(seed: int, step: int) -> int:
    from vit.data import sample_seed

    return sample_seed(seed, step, 1 << 41)
