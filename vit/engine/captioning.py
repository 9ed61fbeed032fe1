"""The caption task of the training engine (``python train.py --task caption``), and the
cross-attention maps it shows in TensorBoard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vit.captions.attention import attention_strip
from vit.captions.datasets import (
    CAPTION_DATASETS,
    CaptionDataset,
    caption_preprocess,
    load_caption_data,
)
from vit.captions.metrics import bleu_scores, cider_d
from vit.captions.tokenizer import Tokenizer
from vit.engine.config import RunConfig
from vit.engine.tasks import Task
from vit.errors import ConfigError, DataError, did_you_mean
from vit.models import build, upgrade_spec
from vit.models._helpers import unwrap_model

__all__ = ["CAPTION_TASK_ARGS", "CaptionTask"]


# ----------------------------------------------------------------------------------------------
# The caption task of the training engine (`python train.py --task caption`)
# ----------------------------------------------------------------------------------------------
# task_args of the caption task: name → (default, meaning).
CAPTION_TASK_ARGS: dict[str, tuple[Any, str]] = {
    "max_len": (32, "longest token sequence incl. <bos>/<eos>; longer captions are truncated"),
    "beam_size": (1, "beam size of the captions generated for validation (1 = greedy)"),
    "min_count": (1, "words seen fewer times in the training captions become <unk>"),
    "train_scenes": (20_000, "shapes: generated training scenes"),
    "val_scenes": (1_000, "shapes: generated validation (and test) scenes"),
    "sample_images": (6, "validation images shown with captions and attention maps"),
    "encoder_checkpoint": ("", "initialise the encoder from this classification checkpoint"),
    "attention_penalty": (
        1.0,
        "λ of the doubly stochastic attention penalty λ·Σ_i(1 − Σ_t α_ti)² of LSTM decoders "
        "(Xu et al. 2015, Eq. 14; 1 as the authors' code, 0 = off); a Transformer decoder has "
        "no α, so a nonzero value set for one is refused",
    ),
}


class CaptionTask(Task):
    """Image captioning: teacher-forced cross-entropy on the next word; validation generates
    captions and scores corpus BLEU-1..4 and CIDEr-D (BLEU-4 selects ``best.pt``).

    ``--model`` is a caption variant (``caption_*``: Transformer decoder; ``caption_lstm_*``:
    Show, Attend and Tell, whose loss adds the doubly stochastic attention penalty) or any ViT
    variant, used as the encoder of a default Transformer decoder. The vocabulary is built from
    the training captions and kept in the checkpoint's task state and as ``vocab.json`` in the run
    directory.
    """

    datasets = CAPTION_DATASETS
    primary_metric = "bleu4"

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, state)
        self.args = {k: v for k, (v, _) in CAPTION_TASK_ARGS.items()} | cfg.task_args
        self.tokenizer = Tokenizer(self.state["vocab"]) if "vocab" in self.state else None
        self._val: CaptionDataset | None = None
        # What inference repeats (vit.caption reads it from the checkpoint).
        self.preprocess = caption_preprocess(cfg.img_size)
        self.state.setdefault("preprocess", self.preprocess.to_dict())

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        for key, value in cfg.task_args.items():
            if key not in CAPTION_TASK_ARGS:
                hint = did_you_mean(key, CAPTION_TASK_ARGS, n=1)
                raise ConfigError(
                    f"unknown task_args key {key!r} for task 'caption'{hint} (valid: "
                    f"{', '.join(CAPTION_TASK_ARGS)})"
                )
            default = CAPTION_TASK_ARGS[key][0]
            # An integer is a float too (`attention_penalty: 1` in YAML); a bool is no number.
            number = isinstance(default, float) and type(value) is int
            if type(value) is not type(default) and not number:
                raise ConfigError(
                    f"task_args.{key} must be {type(default).__name__}, got {value!r}"
                )
            if isinstance(default, int) and value < 1 and key != "min_count":
                raise ConfigError(f"task_args.{key} must be positive, got {value}")
            if isinstance(default, float) and not 0.0 <= value < float("inf"):
                raise ConfigError(f"task_args.{key} must be finite and >= 0, got {value}")
        if cfg.task_args.get("max_len", 32) < 3:
            raise ConfigError("task_args.max_len must be at least 3 (<bos>, a word, <eos>)")
        unused = {
            "mixup": cfg.mixup,
            "cutmix": cfg.cutmix,
            "randaugment_ops": cfg.randaugment_ops,
            "cutout": cfg.cutout,
            "tta_hflip": cfg.tta_hflip,
        }
        on = [k for k, v in unused.items() if v > 0]
        if on:
            raise ConfigError(
                f"{', '.join(on)} are classification augmentations that would change what a "
                f"caption describes; set them to 0 for --task caption"
            )
        reserved = {"vocab_size", "img_size", "max_len", "num_classes"} & set(cfg.model_args)
        if reserved:
            raise ConfigError(
                f"set {', '.join(sorted(reserved))} through the run config (--img-size, "
                f"task_args.max_len; the vocabulary comes from the data), not model_args"
            )
        if cfg.data == "shapes" and cfg.img_size < 16:
            raise ConfigError(f"shapes scenes need img_size >= 16, got {cfg.img_size}")

    # -- data -----------------------------------------------------------------------------------
    def build_dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        cfg, args = self.cfg, self.args
        try:
            data = load_caption_data(
                cfg.data,
                split,
                data_dir=cfg.data_dir,
                img_size=cfg.img_size,
                num_scenes=args["train_scenes"] if split == "train" else args["val_scenes"],
            )
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from None
        if self.tokenizer is None:
            if split != "train":
                raise ConfigError("the caption task needs its vocabulary: build train first")
            self.tokenizer = Tokenizer.build(
                (c for caps in data.captions for c in caps), min_count=args["min_count"]
            )
            self.state["vocab"] = self.tokenizer.itos
            if int(os.environ.get("RANK", "0")) == 0:  # the run directory is global rank 0's
                out = Path(cfg.out_dir)
                out.mkdir(parents=True, exist_ok=True)
                self.tokenizer.save(out / "vocab.json")
        train = split == "train"
        ds = CaptionDataset(
            data,
            self.tokenizer,
            max_len=args["max_len"],
            img_size=cfg.img_size,
            pairs=train,
            name=f"{cfg.data} {split}",
            crop_padding=cfg.crop_padding if train else 0,
            hflip=cfg.hflip if train else False,
            seed=cfg.seed,
            cache_dir=cfg.cache_dir or None,
        )
        if not train:
            self._val = ds
        return ds

    # -- model ----------------------------------------------------------------------------------
    def model_spec(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs = {
            **cfg.model_args,
            "vocab_size": len(self.state["vocab"]),
            "max_len": self.args["max_len"],
            "img_size": cfg.img_size,
            "drop_path_rate": cfg.drop_path,
        }
        # Any ViT variant as --model is the encoder of the default Transformer decoder.
        return upgrade_spec({"name": cfg.model, "kwargs": kwargs}, "caption")

    def build_model(self) -> nn.Module:
        try:
            model = build(self.model_spec())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build captioning model {self.cfg.model!r}: {e}") from None
        # The default λ serves LSTM decoders; one set by hand for a model without α would be a
        # setting silently ignored.
        if self.cfg.task_args.get("attention_penalty", 0.0) and not _has_alphas(model):
            raise ConfigError(
                f"task_args.attention_penalty is the doubly stochastic penalty on the soft "
                f"attention α of an LSTM decoder (caption_lstm_*); {self.cfg.model!r} "
                f"({type(model).__name__}) has none: drop it or set it to 0"
            )
        if self.args["encoder_checkpoint"]:
            path = Path(self.args["encoder_checkpoint"])
            if not path.is_file():
                raise ConfigError(f"task_args.encoder_checkpoint {path} does not exist")
            try:
                model.load_encoder(path)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"cannot initialise the encoder from {path}: {e}") from None
        return model

    # -- steps ----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        images, tokens, index = batch
        x = self.preprocess.normalize(images.to(device, non_blocking=True))
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Trim the padding columns no caption of this batch reaches.
        length = int((tokens != self.tokenizer.pad_id).sum(1).max())
        return x, tokens[:, :length].to(device, non_blocking=True), index

    def _loss(
        self, model: nn.Module, x: Tensor, tokens: Tensor, smoothing: float, penalty: float = 0.0
    ) -> Tensor:
        """Cross-entropy per predicted token; with ``penalty`` λ > 0 (LSTM decoders) plus the
        doubly stochastic penalty, both per token (see :meth:`loss`)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # predict token t+1 from tokens <= t
        if penalty:
            logits, alphas = model(x, inputs, return_attention=True)  # α: (B, T-1, N)
        else:
            logits = model(x, inputs)  # (B, T-1, V)
        pad = targets == self.tokenizer.pad_id
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.flatten(),
            ignore_index=self.tokenizer.pad_id,
            label_smoothing=smoothing,
        )
        if penalty:
            from vit.models.show_attend_tell import doubly_stochastic_penalty

            # Eq. 14 sums the NLL over a caption and adds λ·penalty per caption; the NLL here is a
            # mean over the batch's tokens, so the penalty is too (per-caption mean × B / tokens):
            # the loss is Eq. 14 per token and λ keeps the paper's weight against the NLL.
            per_caption = doubly_stochastic_penalty(alphas.float(), pad, penalty)
            loss = loss + per_caption * len(tokens) / (~pad).sum().clamp(min=1)
        return loss

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], step: int) -> Tensor:
        """Teacher-forced cross-entropy; for LSTM decoders plus λ·Σ_i(1 − Σ_t α_ti)² (Xu et al.
        2015, Eq. 14) with λ = ``task_args.attention_penalty``, the steps predicting padding left
        out of Σ_t. Validation's ``loss`` is the cross-entropy alone."""
        x, tokens, _ = batch
        penalty = self.args["attention_penalty"] if _has_alphas(model) else 0.0
        return self._loss(model, x, tokens, self.cfg.label_smoothing, float(penalty))

    def caption(self, model: nn.Module, x: Tensor) -> list[str]:
        """Captions of normalised images ``x`` (B, 3, H, W) with the task's beam size."""
        inner = unwrap_model(model)
        ids = inner.generate(x, self.args["max_len"] - 1, beam_size=self.args["beam_size"])
        return [self.tokenizer.decode(row) for row in ids.tolist()]

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> dict[str, Any]:
        dataset = loader.dataset
        hyps: list[str] = []
        refs: list[list[str]] = []
        total_loss, n_tokens = 0.0, 0
        for batch in loader:
            x, tokens, index = self.prepare_batch(batch, device)
            # Loss per predicted token of each image's first reference, without smoothing.
            count = int((tokens[:, 1:] != self.tokenizer.pad_id).sum())
            total_loss += self._loss(model, x, tokens, 0.0).item() * count
            n_tokens += count
            hyps += self.caption(model, x)
            refs += [dataset.references[i] for i in index.tolist()]
        return {
            **bleu_scores(hyps, refs),
            "cider": cider_d(hyps, refs),
            "loss": total_loss / n_tokens,
            "n": len(hyps),
        }

    # -- TensorBoard ----------------------------------------------------------------------------
    def on_epoch_end(self, writer: Any, model: nn.Module, step: int, epoch: int) -> None:
        if writer is None or self._val is None:
            return
        inner = unwrap_model(model)
        was_training = inner.training
        inner.eval()  # the engine hands over the weights it validated, in training mode
        try:
            self._log_samples(writer, inner, step)
        finally:
            inner.train(was_training)

    def _log_samples(self, writer: Any, model: nn.Module, step: int) -> None:
        """Captions of the first validation images, and their word → patch attention strips."""
        ds = self._val
        k = min(self.args["sample_images"], len(ds))
        device = next(model.parameters()).device
        # The same images every epoch: the first k of the validation split.
        images = torch.stack([ds[i][0] for i in range(k)])  # uint8 (k, 3, H, W)
        x, _, _ = self.prepare_batch((images, ds.tokens[:k], torch.arange(k)), device)
        captions = self.caption(model, x)
        rows = ["| image | generated | reference |", "|---|---|---|"]
        rows += [f"| {i} | {c} | {ds.references[i][0]} |" for i, c in enumerate(captions)]
        writer.add_text("captions/samples", "\n".join(rows), step)
        for i, caption in enumerate(captions):
            writer.add_image(
                f"captions/attention_{i}",
                attention_strip(
                    model, x[i : i + 1], images[i].float() / 255, caption, self.tokenizer
                ),
                step,
            )


def _has_alphas(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped) is a Show, Attend and Tell captioner, whose forward
    returns its soft attention α with ``return_attention=True``."""
    from vit.models import CaptioningLSTM

    return isinstance(unwrap_model(model), CaptioningLSTM)
