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

__all__ = ["ClassificationTask", "confusion_figure", "top_confusions"]

# Up to this many classes the confusion figure names every class and prints every count; beyond,
# the cells are too small to read and TensorBoard gets the top confusions as text instead.
CONFUSION_LABELLED = 20


class ClassificationTask(Task):
    """Image classification with cross-entropy: label smoothing, mixup/cutmix (timm), top-1."""

    datasets = ("cifar10", "imagefolder", "synthetic")
    primary_metric = "top1"
    shards_evaluation = True

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, state)
        self._loaded: dict[str, Any] = {}
        self._val: Dataset | None = None
        self._rollout: tuple[Tensor, list[int]] | None = None
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
    def _arrays(self, which: str) -> tuple[Any, Tensor, list[str], Tensor | None, Tensor | None]:
        """Decoded ``(images, labels, classes, boxes, rows)`` of ``which`` in train|val|test:
        ``images`` a tensor or a read-only memory map (:mod:`vit.data.cache`), ``rows`` the
        split's rows of it (``None``: all)."""
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
            out = (x, y, list(data.SYNTHETIC_CLASSES), boxes, None)
        elif cfg.data == "cifar10":
            # The official test split validates (the usual CIFAR protocol; see README).
            cache = self.cfg.cache_dir or None
            x, y, classes = data.cifar10(cfg.data_dir, train=which == "train", cache_dir=cache)
            out = (x, y, classes, None, None)
        else:
            out = self._image_folder(which)
        self._loaded[which] = out
        return out

    def _image_folder(
        self, which: str
    ) -> tuple[Any, Tensor, list[str], Tensor | None, Tensor | None]:
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
            train_classes = self._arrays("train")[2]
            if classes != train_classes:
                raise data.DataError(
                    f"{held_out} has classes {classes} but {root / 'train'} has {train_classes}; "
                    f"both need the same class folders"
                )
            return x, y, classes, None, None
        x, y, classes = data.image_folder(root / "train", **kw)
        if len(classes) == 1:
            raise DataError(
                f"{root / 'train'} has one class folder ({classes[0]!r}): a classifier of one "
                f"class cannot be wrong, so it learns nothing; add a folder per class"
            )
        files = data.list_image_folder(root / "train")[0]
        if held_out is not None:
            self.paths["train"] = files
            return x, y, classes, None, None
        # No val/ or test/: carve a deterministic stratified validation split out of train, as
        # rows of the one mapped array (no copy).
        train_idx, val_idx = data.split_indices(y, self.cfg.val_fraction)
        self._loaded["train"] = (x, y[train_idx], classes, None, train_idx)
        self._loaded["val"] = (x, y[val_idx], classes, None, val_idx)
        self.paths.update(
            train=[files[i] for i in train_idx.tolist()], val=[files[i] for i in val_idx.tolist()]
        )
        return self._loaded[which]

    def _held_out_only(self, root: Path, which: str) -> tuple[Any, Tensor, list[str], None, None]:
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
        return x, y, classes, None, None

    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        from vit import data

        x, y, classes, boxes, rows = self._arrays(split)
        if "classes" in self.state and self.state["classes"] != classes:
            raise data.DataError(
                f"the model was trained on classes {self.state['classes']} but {self.cfg.data} "
                f"has {classes}; evaluate on data with the same classes"
            )
        if split == "train" and "preprocess" not in self.state:
            # Inputs are normalised with the training set's own channel statistics, kept in the
            # task state so evaluation, prediction and rollout feed the model what it was
            # trained on (vit.preprocess records the decoding and resizing too).
            pixels = _sample_pixels(x, rows)
            preprocess = Preprocess(
                self.cfg.img_size,
                mean=tuple(round(v, 4) for v in pixels.mean(0).tolist()),
                std=tuple(round(v, 4) for v in pixels.std(0).tolist()),
            )
            self.state.update(classes=classes, preprocess=preprocess.to_dict())
        ds = data.ImageDataset(x, y, classes, boxes=boxes, rows=rows)
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

    # -- TensorBoard ----------------------------------------------------------------------------
    def _rollout_sample(self) -> tuple[Tensor, list[int]]:
        """The fixed validation images of the map pictures: the first image of each class (in
        the validation set's order), for the first ``rollout_images`` classes; chosen once per
        run, the same at every step, listed in the run's ``rollout_images.json``."""
        if self._rollout is None:
            assert self._val is not None
            labels = [int(v) for v in self._val.labels.tolist()]
            first: dict[int, int] = {}
            for i, y in enumerate(labels):
                first.setdefault(y, i)
            idx = [first[c] for c in sorted(first)][: self.cfg.rollout_images]
            images = torch.stack([self._val[i][0] for i in idx])  # uint8 (K, 3, H, W)
            record = {
                "split": "val",
                "indices": idx,
                "labels": [labels[i] for i in idx],
                "classes": self.state["classes"],
            }
            out = Path(self.cfg.out_dir)
            with atomic_write(out / "rollout_images.json") as f:
                f.write(json.dumps(record, indent=1) + "\n")
            self._rollout = (images, record["labels"])
        return self._rollout

    def _log_maps(self, writer: Any, model: nn.Module, step: int) -> None:
        from vit.rollout.tensorboard import log_rollout

        cfg = self.cfg
        images, labels = self._rollout_sample()
        device = next(model.parameters()).device
        x, _ = self.prepare_batch((images, torch.zeros(len(images), dtype=torch.long)), device)
        log_rollout(
            writer,
            model,
            x,
            images.float() / 255,
            step,
            labels=labels,
            classes=self.state["classes"],
            head_fusion=cfg.rollout_head_fusion,
            discard_ratio=cfg.rollout_discard_ratio,
            per_layer=cfg.rollout_per_layer,
            gradient=cfg.rollout_gradient,
        )

    def on_train_start(self, writer: Any, model: nn.Module, step: int) -> None:
        """Before the first step: the class names as text and the maps of the untrained model
        (the "before" of every later picture)."""
        if writer is None:
            return
        classes = self.state["classes"]
        writer.add_text(
            "run/classes",
            f"{len(classes)} classes: " + ", ".join(f"{i} `{c}`" for i, c in enumerate(classes)),
            step,
        )
        if self.cfg.rollout_every > 0:
            self._log_maps(writer, model, step)

    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:
        cfg = self.cfg
        if writer is None:
            return
        if self.last_confusion is not None:
            classes = self.state["classes"]
            picture = confusion_figure(self.last_confusion, classes)
            writer.add_image("val/confusion", picture, step, dataformats="HWC")
            writer.add_text(
                "val/top_confusions", top_confusions(self.last_confusion, classes), step
            )
        if cfg.rollout_every == 0 or (epoch + 1) % cfg.rollout_every:
            return
        self._log_maps(writer, model, step)


def top_confusions(confusion: Tensor, classes: list[str], k: int = 10) -> str:
    """The ``k`` largest off-diagonal counts of a confusion matrix (rows: true, columns:
    predicted) as a Markdown table: true class, predicted class, images, share of the true
    class."""
    c = confusion.shape[0]
    off = confusion.clone().fill_diagonal_(0).flatten()
    rows = ["| true | predicted | images | share of true |", "|---|---|---:|---:|"]
    totals = confusion.sum(1)
    for flat in off.argsort(descending=True)[:k].tolist():
        n = int(off[flat])
        if n == 0:
            break
        t, p = divmod(flat, c)
        rows.append(f"| {classes[t]} | {classes[p]} | {n} | {n / max(int(totals[t]), 1):.1%} |")
    if len(rows) == 2:
        return "no confusions: every image was classified correctly"
    return "\n".join(rows)


def confusion_figure(confusion: Tensor, classes: list[str]) -> np.ndarray:
    """A confusion matrix (C, C) (rows: true class, columns: predicted) as a labelled picture,
    uint8 RGB (H, W, 3): cells coloured by the share of their true class (a sequential colormap,
    0 white to 1 dark blue, one scale for every step), each cell's count printed, class names on
    both axes, up to :data:`CONFUSION_LABELLED` classes; beyond, the colours alone (see
    :func:`top_confusions` for the names)."""
    from matplotlib.figure import Figure

    from vit.rollout.render import figure_to_array

    c = confusion.shape[0]
    counts = confusion.long().numpy()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    labelled = c <= CONFUSION_LABELLED
    cell = 0.32 if labelled else max(0.01, 4.8 / c)  # inches
    names = max((len(n) for n in classes), default=1) if labelled else 0
    side = cell * c
    margin = 0.5 + 0.065 * min(names, 24)  # room for the rotated and left class names
    w, h = side + margin + 1.0, side + margin + 0.4  # inches: the matrix, names, colour bar
    fig = Figure(figsize=(w, h), dpi=100, facecolor="white")
    ax = fig.add_axes((margin / w, margin / h, side / w, side / h))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if labelled:
        ax.set_xticks(range(c), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), labels=classes)
        size = 7 if c <= 12 else 6
        for t in range(c):
            for p in range(c):
                if counts[t, p]:
                    colour = "white" if shares[t, p] > 0.5 else "black"
                    ax.text(
                        p,
                        t,
                        str(counts[t, p]),
                        ha="center",
                        va="center",
                        fontsize=size,
                        color=colour,
                    )
    else:  # class indices every tenth class; the names are in the top-confusions text
        ticks = range(0, c, 10 if c <= 200 else 100)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_yticks(ticks, labels=[str(t) for t in ticks])
    ax.tick_params(labelsize=7, length=0 if labelled else 2)
    index = "" if labelled else " (index)"
    ax.set_xlabel(f"predicted class{index}", fontsize=8)
    ax.set_ylabel(f"true class{index}", fontsize=8)
    top1 = np.trace(counts) / max(int(counts.sum()), 1)
    ax.set_title(f"{int(counts.sum())} images, top-1 {top1:.1%}", fontsize=8)
    cax = fig.add_axes(((margin + side + 0.15) / w, margin / h, 0.12 / w, side / h))
    bar = fig.colorbar(im, cax=cax)
    bar.ax.tick_params(labelsize=6)
    bar.set_label("share of the true class", fontsize=7)
    picture = figure_to_array(fig)
    # Crop the white margins the fixed layout leaves (long names need them, short ones do not):
    # TensorBoard scales a picture to its card's width, so every spare pixel shrinks the text.
    inked = np.nonzero((picture < 250).any(axis=2))
    top, bottom = max(inked[0].min() - 6, 0), inked[0].max() + 7
    left, right = max(inked[1].min() - 6, 0), inked[1].max() + 7
    return np.ascontiguousarray(picture[top:bottom, left:right])


def _sample_pixels(images: Any, rows: Tensor | None, budget: int = 2_000_000) -> Tensor:
    """About ``budget`` RGB pixels of the training images, float (P, 3) in [0, 1], for the
    channel statistics: whole images, evenly spaced, so a memory-mapped set reads only those
    (every image of a set of up to ``budget`` pixels)."""
    rows = torch.arange(len(images)) if rows is None else rows
    per_image = int(images.shape[1]) * int(images.shape[2])
    k = min(len(rows), max(1, -(-budget // per_image)))
    picked = rows[torch.linspace(0, len(rows) - 1, k).round().long()].sort().values
    if isinstance(images, Tensor):
        batch = images[picked]
    else:
        batch = torch.from_numpy(np.asarray(images[picked.numpy()]))
    return batch.reshape(-1, 3).float() / 255


def _step_seed(seed: int, step: int) -> int:
    from vit.data import sample_seed

    return sample_seed(seed, step, 1 << 41)
