"""The training engine: the loop, AMP, the schedule, EMA, DDP, checkpoints, exact resume, logging.

The loop owns everything that is the same for every task — optimizer, schedule, AMP, EMA,
checkpoints, resume, signals, TensorBoard — and asks the :class:`~vit.engine.tasks.Task` for its
data, model, loss and metrics.

Exact resume: the learning rate is a pure function of the step, data order and augmentation are pure
functions of ``(seed, epoch, index)`` (:mod:`vit.data`), mixup/cutmix are seeded per step, and a
checkpoint holds model, optimizer, scaler, EMA, RNG states and the position in the epoch. A run
killed at any step and resumed with ``--resume auto`` ends with the same weights as one never
interrupted (on the CPU, same seed and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from vit.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    timm_checkpoint_keys,
)
from vit.engine.config import RunConfig, resolve_threads
from vit.engine.distributed import init_distributed
from vit.engine.loader import WaitClock, build_loader, use_device_loader
from vit.engine.optim import build_optimizer
from vit.engine.rundir import (
    RunLock,
    check_out_dir,
    check_resume,
    make_out_dir,
    new_folders,
    remove_empty,
    write_config,
)
from vit.engine.runlog import RunLog
from vit.engine.schedule import Progress, extend, fit_to_time, plan_line, scheduled_lr
from vit.engine.tasks import get_task
from vit.engine.tb_summary import config_text, hparam_metrics, hparams
from vit.errors import CheckpointError, ConfigError

__all__ = ["Diverged", "Interrupted", "Trainer", "train"]


class Diverged(RuntimeError):
    """The loss or the gradient became NaN/inf."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved before stopping."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` returns the final validation metrics."""

    def __init__(self, cfg: RunConfig, command: str = "") -> None:
        self.t_start = time.monotonic()
        self.command = command  # as typed, for the model card (vit.export)
        # Small models on a CPU run several times faster on few threads than on all the cores of
        # a busy machine (resolve_threads).
        torch.set_num_threads(
            resolve_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        )
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(cfg)
        self.is_main = self.rank == 0  # logs, checkpoints and the progress bar are rank 0's
        self.out = Path(cfg.out_dir)
        resume, ckpt = self._resume_checkpoint()
        task_cls = get_task(cfg.task)
        if ckpt is not None and ckpt["task"] != cfg.task:
            raise CheckpointError(f"{resume} is a {ckpt['task']!r} checkpoint, not {cfg.task!r}")
        self.resumed_from = resume
        self.resume_notes = (
            check_resume(ckpt, cfg, self.world_size, resume) if ckpt is not None else []
        )
        if ckpt is not None:  # config.yaml and exports name the source the weights came from
            cfg.init_from = str(ckpt["config"].get("init_from") or "")
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
        self.model = self.task.build_model()
        if cfg.grad_accum_steps > 1 and self.is_main:
            norms = sorted(
                {type(m).__name__ for m in self.model.modules() if isinstance(m, _BatchNorm)}
            )
            if norms:
                print(
                    f"note: --grad-accum-steps {cfg.grad_accum_steps} with a model that has "
                    f"BatchNorm layers ({', '.join(norms)}): each micro-batch is normalised "
                    f"with its own statistics, so a step is close to, not the same as, one step "
                    f"on the whole batch",
                    file=sys.stderr,
                )
        if cfg.init_from and ckpt is None:  # a resumed run continues from its own weights
            self._init_from(cfg.init_from)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg, distributed=self.world_size > 1)
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
        self.progress = Progress(total_steps=total, warmup_steps=warmup)
        self.last_metrics: dict[str, Any] = {}  # a checkpoint restores them
        # Training seconds of the processes before this one (--time-limit counts them).
        self.elapsed_before = float(ckpt.get("elapsed", 0.0)) if ckpt is not None else 0.0
        if ckpt is not None:
            self._restore(ckpt, resume)
            self._extend(ckpt)
        collate = self.task.collate_fn()
        # Whether the images and augmentation live on the device (vit.data.DeviceLoader).
        self.device_loader = use_device_loader(
            cfg, (self.train_set, self.val_set), collate, self.device
        )
        kw = {"on_device": self.device_loader, "device": self.device, "collate_fn": collate}
        ranks = {"rank": self.rank, "world_size": self.world_size}
        self.train_loader = build_loader(
            cfg, self.train_set, cfg.batch_size, train=True, **kw, **ranks
        )
        # Each rank validates its share when the task adds up the ranks' sums.
        val_ranks = ranks if self.task.shards_evaluation else {}
        self.val_loader = build_loader(
            cfg, self.val_set, 2 * cfg.batch_size, train=False, **kw, **val_ranks
        )
        self._signal: int | None = None
        self._stop = False  # under DDP: some rank was signalled (agreed at each step)
        self._data_clock = WaitClock()
        self._unchecked: list[tuple[int, Tensor, Tensor]] = []  # (step, loss, grad norm)
        self._cap_said = False  # the "--epochs caps the time limit" line is said once
        self._planned = False  # whether a plan: line was printed (the next ones say "a → b")

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume_checkpoint(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from and its path. Rank 0 alone checks the run directory
        (:func:`vit.engine.rundir.check_out_dir`) and reads the checkpoint; under DDP it sends
        it to every rank, so the other ranks never read the run directory: on several machines
        it need not be on a shared file system, and a network file system's stale view cannot
        make the ranks resume from different steps."""
        path = check_out_dir(self.cfg) if self.is_main else None
        ckpt = load_checkpoint(path) if path is not None else None
        if self.world_size > 1:
            box = [(path, ckpt)]
            torch.distributed.broadcast_object_list(box, src=0)
            path, ckpt = box[0]
        return path, ckpt

    def _init_from(self, path: str) -> None:
        """Fine-tuning: ``path``'s weights through :func:`vit.models.load_pretrained`
        (position embedding and patch kernel resampled, a head of other classes replaced; a
        captioner's encoder for a captioner); its notes are printed once (rank 0)."""
        from vit.models._builder import load_pretrained, logger

        source: Any = path
        if str(path).startswith("timm:"):
            from vit.timm_interop import pretrained_state_dict

            source = pretrained_state_dict(str(path).removeprefix("timm:"))
        logger.disabled = True  # the notes are printed below, by rank 0 alone
        try:
            # A classifier's head is mapped by class name when the source records its names.
            names = self.task.state.get("classes") if self.cfg.task == "classify" else None
            model = getattr(self.model, "encoder", self.model)
            report = load_pretrained(model, source, class_names=names)
        except (TypeError, ValueError) as e:  # CheckpointError is a ValueError
            raise CheckpointError(f"--init-from {path}: {e}") from None
        finally:
            logger.disabled = False
        if self.is_main:
            for note in report.notes or ["every weight loaded as it was"]:
                print(f"init-from {path}: {note}", file=sys.stderr)

    def state_dict(self) -> dict[str, Any]:
        model = self.model.state_dict()
        ema = self.ema.module.state_dict() if self.ema is not None else None
        scaler = self.scaler.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.cfg.task,
            "task_state": self.task.state,
            "model_spec": self.task.model_spec(),
            "config": dataclasses.asdict(self.cfg),
            "model": model,
            "ema": ema,
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler,
            "progress": dataclasses.asdict(self.progress),
            "rng": self._rng_states(),
            "world_size": self.world_size,
            "metrics": self.last_metrics,
            "elapsed": self.elapsed_before + time.monotonic() - self.t_start,
            "command": self.command,
            # timm's names for the same objects (pickle stores each once): what
            # timm.models.load_checkpoint(use_ema=True|False) and resume_checkpoint read;
            # "epoch" is the next epoch to run (resume_checkpoint's answer; no "version", which
            # would add 1).
            **timm_checkpoint_keys(model, ema, scaler, self.progress.epoch),
        }

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        load_weights(self.model, ckpt["model"], path, ckpt["model_spec"])
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
        try:
            # Checkpoints before 0.2 also stored best_step, which nothing read.
            known = {f.name for f in dataclasses.fields(Progress)}
            self.progress = Progress(**{k: v for k, v in ckpt["progress"].items() if k in known})
        except TypeError as e:
            raise CheckpointError(f"{path}: its progress record is malformed ({e})") from None
        self.last_metrics = dict(ckpt.get("metrics") or {})
        rng = ckpt["rng"]
        if "ranks" in rng:  # a DDP checkpoint: this rank's state (rank 0's after a world change)
            ranks = rng["ranks"]
            rng = ranks[self.rank] if len(ranks) == self.world_size else ranks[0]
        set_rng_state(rng)

    def _rng_states(self) -> dict[str, Any]:
        """The RNG state; under DDP every rank's (a collective call), for exact resume."""
        if self.world_size == 1:
            return rng_state()
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, rng_state())
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
        lr = scheduled_lr(p, p.step, lr=self.cfg.lr, min_lr=self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay's scale
        batch = self.task.prepare_batch(batch, self.device)
        n = self.cfg.grad_accum_steps
        # Micro-batches: the mean of their mean losses is the batch's mean loss (equal sizes), so
        # the step is the same; DDP averages the gradients once, after the last one.
        micro = zip(*(t.chunk(n) for t in batch), strict=True) if n > 1 else [batch]
        value = torch.zeros((), device=self.device)
        for i, chunk in enumerate(micro):
            no_sync = getattr(self.train_model, "no_sync", None)
            sync = contextlib.nullcontext() if i == n - 1 or no_sync is None else no_sync()
            with sync:
                with self.autocast:
                    loss = self.task.loss(self.train_model, chunk, p.step) / n
                self.scaler.scale(loss).backward()
            value = value + loss.detach().float()
        value = self._sync_step(value)
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        skipped = False
        if self.scaler.is_enabled():
            # fp16: the scaler skips the step when the gradients hold inf/NaN, which is when their
            # norm is not finite (one host sync, where comparing scales before and after took two).
            skipped = not bool(torch.isfinite(grad_norm))
            self.scaler.step(self.optimizer)
            self.scaler.update()
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

    def _extend(self, ckpt: dict[str, Any]) -> None:
        """``--epochs`` changed on resume: the schedule ends at the new epoch count
        (:func:`vit.engine.schedule.extend`)."""
        p, cfg = self.progress, self.cfg
        if ckpt["config"].get("epochs") == cfg.epochs:
            return
        note = extend(
            p, total_steps=cfg.epochs * self.steps_per_epoch, lr=cfg.lr, min_lr=cfg.min_lr
        )
        if note:
            self.resume_notes.append(note)

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
                last = self.out / "last.pt"
                kept = (
                    f"the last good checkpoint {last} is kept"
                    if last.is_file()
                    else "no checkpoint was written yet"
                )
                raise Diverged(
                    f"the {what} became {row[i].item()} at step {steps[i]}; stopped, {kept} "
                    f"(try a lower --lr or --grad-clip)"
                )

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
        if epoch_end is None:
            per_sample = step_time / cfg.batch_size
            n_params = sum(t.numel() for t in self.model.parameters())
            epoch_end = len(self.val_set) * per_sample / 3 + 0.2 + n_params * 16 / 200e6
        before = p.total_steps
        wanted = fit_to_time(
            p,
            seconds_left=cfg.time_limit * 60
            - self.elapsed_before
            - (time.monotonic() - self.t_start),
            margin=0.03 * cfg.time_limit * 60 + 2.0,
            step_time=step_time,
            epoch_end=epoch_end,
            steps_per_epoch=self.steps_per_epoch,
            val_every=cfg.val_every,
            max_steps=cfg.epochs * self.steps_per_epoch,
        )
        if self.world_size > 1:
            # Each rank timed its own steps; rank 0's schedule is everyone's, or they stop apart.
            sched = torch.tensor([p.total_steps, p.warmup_steps], device=self.device)
            torch.distributed.broadcast(sched, 0)
            p.total_steps, p.warmup_steps = sched.tolist()
        cap = wanted > p.total_steps and not self._cap_said
        if not self.is_main or (p.total_steps == before and not cap):
            return  # one line whenever the plan changes, or --epochs first caps it
        self._cap_said |= cap
        line = plan_line(
            p, before if self._planned else None, self.steps_per_epoch, cfg.time_limit,
            step_time=step_time, epoch_end=epoch_end, epochs=cfg.epochs if cap else None,
            wanted=wanted,
        )  # fmt: skip
        print(line, file=sys.stderr)
        self._planned = True

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
        from tqdm import tqdm

        cfg, p = self.cfg, self.progress
        if self.is_main:  # the run directory is global rank 0's alone
            self.out.mkdir(parents=True, exist_ok=True)
            for note in self.resume_notes:
                print(f"resume: {note}", file=sys.stderr)
            RunLog.check_writable(self.out)
            write_config(self.out, cfg)
            if self.resumed_from is not None and p.step >= p.total_steps:
                print(
                    f"the run in {self.out} is complete ({p.step} steps, {cfg.epochs} epochs); "
                    f"to train longer pass --epochs N (more than {cfg.epochs}) with --resume auto",
                    file=sys.stderr,
                )
                return self.last_metrics
            if self.resumed_from is not None:
                print(
                    f"resumed from step {p.step} of {p.total_steps} (epoch {p.epoch + 1}) "
                    f"of {self.resumed_from}",
                    file=sys.stderr,
                )
        runlog = RunLog(self.out, p, self.t_start, cfg.batch_size, self.steps_per_epoch)
        writer = runlog.open(resumed=self.resumed_from is not None) if self.is_main else None
        if writer is not None and p.step == 0:  # what the run is, and the untrained model
            writer.add_text("run/config", config_text(cfg), 0)
            self.task.on_train_start(writer, self.eval_model(), 0)
        sampler = self.train_loader.batch_sampler
        # --time-limit: fit the schedule from steps 2-12 (step 0 pays for torch.compile), then
        # again at each epoch end in the first 90% of it, from the steps since the last fit and
        # the last measured validation and checkpoint time, so a machine that slows down midway
        # still ends on time. A resumed run is fitted again to the time its predecessors left.
        timed = cfg.time_limit > 0
        fit_at = p.step + 12 if timed else -1
        t_fit, step_fit, epoch_end = None, 0, None
        quiet = not sys.stderr.isatty()
        bar = None
        self.model.train()
        self.t_train = time.monotonic()
        # Without a terminal (a log file, a job scheduler, CI) a line per epoch, and within a
        # long epoch one a minute at a log step, instead of the bar.
        lines = quiet and self.is_main
        runlog.start_lines(self.t_train)
        stats = None
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
                        # Also at each epoch's and the run's last step: any run has curves.
                        last = p.batch_in_epoch == self.steps_per_epoch or p.step >= p.total_steps
                        if p.step % cfg.log_every == 0 or last:
                            self.check_finite()
                            stats = {k: float(v) for k, v in stats.items()}
                            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                            now = time.monotonic()
                            stats["images_per_s"] = seen / (now - t_log)
                            # Share of the wall time spent waiting for the next batch.
                            stats["data_wait"] = self._data_clock.take() / (now - t_log)
                            t_log, seen = now, 0
                            if writer is not None:
                                runlog.log("train", stats)
                            if lines and now - runlog.line_at >= 60:
                                runlog.progress_line(stats)
                        if cfg.save_every and p.step % cfg.save_every == 0:
                            self.save()
                        self._check_signal()
                        if p.step >= p.total_steps:
                            break
                    bar.close()
                    if lines and stats is not None:
                        runlog.progress_line(stats)
                    t_end = time.monotonic()
                    if self._end_epoch(runlog if writer is not None else None):
                        epoch_end = time.monotonic() - t_end
                    if timed and p.step < 0.9 * p.total_steps:
                        if t_fit is None or p.step <= step_fit:  # epochs shorter than 12 steps
                            t_fit, step_fit = self.t_train, 0
                        self._fit_schedule((t_end - t_fit) / (p.step - step_fit), epoch_end)
                        t_fit, step_fit, fit_at = time.monotonic(), p.step, -1
                    self._check_signal()
            if writer is not None:
                writer.add_hparams(
                    hparams(cfg),
                    hparam_metrics(self.task.primary_metric, p.best, self.last_metrics),
                    run_name=".",
                    global_step=p.step,
                )
        finally:
            if bar is not None:  # before any message: a Ctrl-C line must not join the bar's
                bar.close()
            if writer is not None:
                runlog.close()
        return self.last_metrics

    def _end_epoch(self, runlog: RunLog | None) -> bool:
        """Count the epoch; every ``val_every`` epochs and at the end, validate, log and save.
        Returns whether it validated. ``runlog``: None on DDP ranks other than 0."""
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        if p.epoch % self.cfg.val_every and p.step < p.total_steps:
            return False
        metrics = self.validate()
        self.last_metrics = metrics
        primary = metrics[self.task.primary_metric]
        if runlog is not None:
            runlog.log("val", metrics, self.task.records())
        writer = runlog.writer if runlog is not None else None
        self.task.on_epoch_end(writer, self.eval_model(), p.step, p.epoch - 1)
        if primary > p.best:
            p.best = primary
            self.save("best.pt")
        self.save()
        if runlog is not None:
            runlog.val_line(metrics, self.task.primary_metric)
        return True


def train(cfg: RunConfig, command: str = "", notes: Sequence[str] = ()) -> dict[str, Any]:
    """Run a training; returns the final validation metrics plus the best primary metric. The
    run directory is locked for the run's life (by rank 0 under DDP); a run that stops before
    writing anything leaves no folder behind. ``command``: the command line as typed, kept in
    the checkpoints for the export's model card; ``notes``: lines to print once the run is set
    up (which recipe it follows), so that bad input still answers with one line.

    Raises:
        UsageError: bad input (config, data, checkpoint, a run directory in use).
        Diverged, Interrupted, CheckpointSaveError: see :func:`vit.train.main`.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    created = new_folders(Path(cfg.out_dir)) if main_process else []
    try:
        with RunLock(make_out_dir(cfg)) if main_process else contextlib.nullcontext():
            trainer = Trainer(cfg, command)
            for note in notes if main_process else ():
                print(note, file=sys.stderr)
            metrics = trainer.fit()
    except BaseException:
        remove_empty(created)  # a run that never started leaves no empty run folder
        raise
    p = trainer.progress
    return {
        **metrics,
        f"best_{trainer.task.primary_metric}": p.best,
        "steps": p.step,
        "skipped_steps": p.skipped_steps,
        "seconds": round(time.monotonic() - trainer.t_start, 1),
        "out_dir": str(trainer.out),
    }
