"""Fixtures shared by the engine tests."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

# A training run of seconds on generated data (tests/test_train.py, test_rundir.py, ...).
TINY = {
    "data": "synthetic",
    "synthetic_train": 128,
    "synthetic_val": 32,
    "img_size": 16,
    "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "batch_size": 16,
    "epochs": 1,
    "rollout_every": 0,
    "log_every": 2,
    "device": "cpu",
    "threads": 1,
}


def flags(values: dict[str, Any]) -> list[str]:
    """Config keys and values as command-line options (``--no-x`` for a false boolean), over the
    built-in defaults (``--config none``: no recipe) unless ``values`` names a ``config``."""
    out = [] if "config" in values else ["--config", "none"]
    for k, v in values.items():
        if isinstance(v, bool):
            out.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
            continue
        out += [f"--{k.replace('_', '-')}", json.dumps(v) if isinstance(v, dict) else str(v)]
    return out


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Decoded-image caches of tests go to a temporary folder, never the user's ~/.cache/vit
    (subprocesses inherit it through the environment)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` calls torch.set_num_threads; keep that from leaking into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same random state (torch, numpy, Python) and default dtype,
    whatever ran before it: a test's random inputs never depend on the order or selection of
    tests (a full-suite run once drew other inputs than the file alone)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


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
