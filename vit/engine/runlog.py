"""What a run tells as it trains: ``metrics.jsonl`` (one JSON object a line), the TensorBoard
events, and the progress and validation lines on stderr. Global rank 0 alone writes them."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from vit.engine.rundir import read_metrics
from vit.engine.schedule import Progress
from vit.engine.tb_summary import scalar_tag
from vit.errors import ConfigError
from vit.fileio import atomic_write

__all__ = ["RunLog"]


class RunLog:
    """The records of the run in ``out``; ``progress`` is the trainer's, read at each record.

    ``t_start``: when the process started (``time.monotonic()``), the origin of the ``seconds``
    of each record and of the elapsed time in the progress lines.
    """

    def __init__(
        self, out: Path, progress: Progress, t_start: float, batch_size: int, steps_per_epoch: int
    ) -> None:
        self.out, self.progress, self.t_start = out, progress, t_start
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.writer: Any = None
        self.line_at = self.t_train = t_start
        self.line_step = self.first_step = progress.step

    @staticmethod
    def check_writable(out: Path) -> None:
        """Before anything in the run directory changes: the records a run appends to or
        replaces must be writable (a read-only metrics.jsonl would otherwise fail after
        config.yaml took the new settings).

        Raises:
            ConfigError: naming the file.
        """
        for name in ("metrics.jsonl", "config.yaml"):
            path = out / name
            if path.exists() and not os.access(path, os.W_OK):
                raise ConfigError(
                    f"{path} is not writable; make it writable (chmod u+w) or choose another "
                    f"--out-dir"
                )

    def open(self, *, resumed: bool) -> Any:
        """Open ``metrics.jsonl`` for appending and the TensorBoard writer (returned)."""
        from torch.utils.tensorboard import SummaryWriter

        metrics = self.out / "metrics.jsonl"
        if resumed and metrics.exists():
            # Drop what the interrupted run logged after its checkpoint (it is about to be
            # redone): the kept lines replace the file in one rename, never a truncate-and-write
            # that a fault could cut short.
            text = metrics.read_text(errors="replace")
            keep = read_metrics(metrics, self.progress.step)
            if len(keep) != sum(1 for line in text.splitlines() if line.strip()):
                with atomic_write(metrics) as f:
                    f.write("".join(line + "\n" for line in keep))
        self._metrics_file = metrics.open("a")
        # TensorBoard hides events at steps >= purge_step: the checkpoint's own step was logged
        # before it was saved (its validation, its last train point), so the redone steps start
        # one later.
        purge = self.progress.step + 1 if resumed else None
        self.writer = SummaryWriter(str(self.out), purge_step=purge)
        return self.writer

    def log(self, kind: str, values: dict[str, Any], records: dict[str, Any] | None = None) -> None:
        """One line of ``metrics.jsonl`` (``values`` and the non-scalar ``records``); the
        numbers as TensorBoard scalars."""
        p = self.progress
        # "seconds": since this process started (the time-to-accuracy curve).
        seconds = round(time.monotonic() - self.t_start, 2)
        record = {"kind": kind, "step": p.step, "epoch": p.epoch, "seconds": seconds, **values}
        record |= records or {}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        for k, v in values.items():
            if k != "n" and isinstance(v, int | float):
                self.writer.add_scalar(scalar_tag(kind, k), v, p.step)

    def start_lines(self, t_train: float) -> None:
        """Training starts now: progress lines count rates and time left from here."""
        self.t_train = self.line_at = t_train
        self.line_step = self.first_step = self.progress.step

    def progress_line(self, stats: dict[str, Any]) -> None:
        """One progress line on stderr: step, loss, lr, images/s since the last line, elapsed
        and estimated remaining time (from this process's steps so far)."""
        p, now = self.progress, time.monotonic()
        rate = (p.step - self.line_step) * self.batch_size / max(now - self.line_at, 1e-9)
        per_step = (now - self.t_train) / max(1, p.step - self.first_step)
        left = (p.total_steps - p.step) * per_step
        epochs = math.ceil(p.total_steps / self.steps_per_epoch)
        print(
            f"epoch {p.epoch + (p.batch_in_epoch > 0)}/{epochs} step {p.step}/{p.total_steps}: "
            f"loss {float(stats['loss']):.4f}, lr {float(stats['lr']):.2e}, {rate:.0f} images/s, "
            f"{_duration(now - self.t_start)} elapsed, ~{_duration(left)} left",
            file=sys.stderr,
        )
        self.line_at, self.line_step = now, p.step

    def val_line(self, metrics: dict[str, Any], primary: str) -> None:
        """The validation's line on stderr (its scalars, the best primary metric so far)."""
        p = self.progress
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "n" and "/" not in k)
        print(
            f"epoch {p.epoch} step {p.step}/{p.total_steps}: val {shown} "
            f"(best {primary} {_fmt(p.best)}) [{time.monotonic() - self.t_start:.0f} s]",
            file=sys.stderr,
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self._metrics_file.close()


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt(value: float) -> str:
    """A metric for the progress line: four decimals, so 1.0000 and 0.9660 line up."""
    return f"{value:.4f}"
