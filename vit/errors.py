"""The errors every part of ``vit`` raises for bad input, and the one way commands report them.

A command (``python train.py``, ``python -m vit.evaluate``, ...) answers a :class:`UsageError` —
a bad option, config, dataset, image or checkpoint — with one line on stderr and exit code 2, never
a traceback. Library callers catch them as the ``ValueError`` they are.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from collections.abc import Callable, Iterable

__all__ = [
    "CheckpointError",
    "CliParser",
    "ConfigError",
    "DataError",
    "UsageError",
    "did_you_mean",
    "run_command",
]


class UsageError(ValueError):
    """Input the user can fix; the message names the problem and the fix."""


class ConfigError(UsageError):
    """An invalid run configuration or command-line option."""


class DataError(UsageError):
    """A dataset or image that cannot be found, read or used."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be used (missing, corrupt, unsafe, another architecture)."""


def did_you_mean(
    word: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.6, quote: bool = True
) -> str:
    """``"; did you mean 'a', 'b'?"`` for the close matches of ``word`` (``""`` without any);
    ``quote=False`` for names that are written bare (``--lr``, config keys)."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    names = map(repr, close) if quote else close
    return f"; did you mean {', '.join(names)}?" if close else ""


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`ConfigError`, so that every command reports them
    the same way: one line, exit code 2 (argparse itself prints its usage block)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def add_device(self) -> None:
        """``--device auto|cpu|cuda`` (auto: CUDA when available)."""
        self.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    def add_weights(self) -> None:
        """``--weights auto|ema|model``: which of a checkpoint's weights to use."""
        self.add_argument(
            "--weights",
            choices=("auto", "ema", "model"),
            default="auto",
            help="auto: the EMA weights when the run kept them (default); ema; model: raw weights",
        )


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body: a :class:`UsageError` becomes ``error: ...`` on stderr and exit 2."""
    try:
        return main() or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
