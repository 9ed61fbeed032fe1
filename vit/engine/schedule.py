"""The learning-rate schedule: a pure function of the step (exact resume), and how a resumed run
is extended."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vit.errors import ConfigError

__all__ = ["Progress", "extend", "fit_to_time", "lr_at", "scheduled_lr"]


@dataclass
class Progress:
    """Where a run is (saved in checkpoints): its step, epoch, schedule and best metric."""

    step: int = 0
    best: float = -math.inf  # the primary metric's best value so far
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    skipped_steps: int = 0  # fp16: steps the GradScaler skipped (inf/NaN gradients)
    # An extended run (--epochs raised on resume) follows a cosine from `restart_lr` at
    # `restart_step` to min_lr at total_steps; -1: the original warmup + cosine throughout.
    restart_step: int = -1
    restart_lr: float = 0.0


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps`` (Loshchilov & Hutter 2017, without restarts). A pure function of the step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(p: Progress, step: int, *, lr: float, min_lr: float) -> float:
    """The learning rate of ``step``: warmup + cosine (:func:`lr_at`) to ``p.total_steps``, or,
    from an extension's ``p.restart_step`` on, a cosine from ``p.restart_lr`` to ``min_lr``."""
    if 0 <= p.restart_step <= step:
        return lr_at(
            step - p.restart_step,
            lr=p.restart_lr,
            min_lr=min(min_lr, p.restart_lr),
            warmup_steps=0,
            total_steps=p.total_steps - p.restart_step,
        )
    return lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=p.warmup_steps, total_steps=p.total_steps)


def extend(p: Progress, *, total_steps: int, lr: float, min_lr: float) -> str:
    """Make the schedule end at ``total_steps`` (``--epochs`` changed on resume). The lr continues
    from where the run is on a new cosine to ``min_lr``; a finished run restarts it from ``lr`` (a
    warm restart, Loshchilov & Hutter 2017, SGDR). Returns a line saying so ("" if unchanged).

    Raises:
        ConfigError: ``total_steps`` is not past the step the run reached.
    """
    if total_steps == p.total_steps:
        return ""
    if total_steps <= p.step:
        raise ConfigError(
            f"the new schedule ends at step {total_steps}, but the run is at step {p.step}; pass "
            f"more --epochs"
        )
    finished = p.step >= p.total_steps
    restart_lr = lr if finished else scheduled_lr(p, p.step, lr=lr, min_lr=min_lr)
    p.restart_step, p.restart_lr, p.total_steps = p.step, restart_lr, total_steps
    how = " (a warm restart of the finished run)" if finished else ""
    return f"schedule: from step {p.step} to {total_steps}, cosine from lr {restart_lr:.3g}{how}"


def fit_to_time(
    p: Progress,
    *,
    seconds_left: float,
    margin: float,
    step_time: float,
    epoch_end: float,
    steps_per_epoch: int,
    val_every: int,
    max_steps: int,
) -> int:
    """Size the schedule (``--time-limit``) so the remaining steps, every ``val_every`` epochs'
    validation and checkpoint (``epoch_end`` seconds each) and the final one end ``margin``
    seconds before ``seconds_left`` runs out; at most ``max_steps``. The warmup stays within the
    first fifth. Returns the step count the time would allow before the ``max_steps`` cap."""
    per_step = step_time + epoch_end / (steps_per_epoch * val_every)
    budget = seconds_left - margin - epoch_end
    steps = max(p.step + 1, p.step + int(budget / per_step))
    p.total_steps = min(steps, max_steps)
    p.warmup_steps = min(p.warmup_steps, p.total_steps // 5)
    return steps


def plan_line(
    p: Progress,
    before: int | None,
    steps_per_epoch: int,
    time_limit: float,
    *,
    step_time: float,
    epoch_end: float,
    epochs: int | None,
    wanted: int,
) -> str:
    """The line that says how ``--time-limit`` sized the schedule: ``before`` (None for the first
    plan) → ``p.total_steps``; ``epochs`` when ``--epochs`` caps what the limit would fit
    (``wanted`` steps)."""
    capped = ""
    if epochs is not None:
        capped = (
            f"; --epochs {epochs} caps it (the limit would fit {wanted} steps): pass more "
            f"--epochs, or --time-limit alone, to use the whole limit"
        )
    return (
        f"plan: {'' if before is None else f'{before} → '}{p.total_steps} steps "
        f"({p.total_steps / steps_per_epoch:.1f} epochs) to end within --time-limit "
        f"{time_limit:g} min ({step_time * 1e3:.0f} ms/step, {epoch_end:.1f} s per epoch "
        f"end){capped}"
    )
