"""Fixtures shared by the engine tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest


@pytest.fixture
def sigterm_at_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[type, int], Callable[[], None]]:
    """``arm(task_cls, step)`` makes the run receive SIGTERM when ``task_cls.loss`` is called for
    ``step`` (an interruption at a chosen point of training); it returns a function that disarms."""

    def arm(task_cls: type, step: int) -> Callable[[], None]:
        real = task_cls.loss

        def loss(self, model, batch, s):
            if s == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, model, batch, s)

        monkeypatch.setattr(task_cls, "loss", loss)
        return lambda: monkeypatch.setattr(task_cls, "loss", real)

    return arm
