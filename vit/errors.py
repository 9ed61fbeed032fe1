"""The errors every part of ``vit`` raises for bad input, and the one way commands report them.

A command (``python train.py``, ``python -m vit.evaluate``, ...) answers a :class:`UsageError` —
a bad option, config, dataset, image or checkpoint — with one line on stderr and exit code 2, never
a traceback. Library callers catch them as the ``ValueError`` they are.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable

__all__ = [
    "CheckpointError",
    "CliParser",
    "ConfigError",
    "DataError",
    "OutputError",
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


class OutputError(RuntimeError):
    """An output could not be written although it was checked first (a full disk, an I/O
    error): exit code 1, and whatever was being written is left as it was (see
    :mod:`vit.fileio`). ``reason``: what went wrong, without the path."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def did_you_mean(
    word: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.6, quote: bool = True
) -> str:
    """``"; did you mean 'a', 'b'?"`` for the close matches of ``word`` (``""`` without any);
    ``quote=False`` for names that are written bare (``--lr``, config keys)."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    names = map(repr, close) if quote else close
    return f"; did you mean {', '.join(names)}?" if close else ""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text as plain text: each option's default appended when its help does not state one,
    and reStructuredText markup (``:mod:`x```, double backticks) removed from the prose."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default in (None, False, argparse.SUPPRESS)
            or action.option_strings == []
            or isinstance(action, argparse._HelpAction)
        ):
            return text or None
        return f"{text} (default: %(default)s)".lstrip()

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


def plain_text(text: str) -> str:
    """Docstring prose as plain text: ``:role:`name``` and double backticks become ``name``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`ConfigError`, so that every command reports them
    the same way: one line, exit code 2 (argparse itself prints its usage block). Help is plain
    text with defaults shown, and the program is named as it was run (``vit-train`` when run as
    the installed command)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        if "prog" in kwargs:
            kwargs["prog"] = self.program(kwargs["prog"])
        super().__init__(*args, **kwargs)

    @staticmethod
    def program(default: str) -> str:
        """The command's name as the user ran it: an installed ``vit-*`` script's own name,
        otherwise ``default`` (``python train.py``, ``python -m vit.predict``)."""
        name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        return name if name.startswith("vit-") else default

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def add_device(self) -> None:
        """``--device auto|cpu|cuda`` (auto: CUDA when available)."""
        self.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="auto: CUDA when available, else the CPU",
        )

    def add_weights(self) -> None:
        """``--weights auto|ema|model``: which of a checkpoint's weights to use."""
        self.add_argument(
            "--weights",
            choices=("auto", "ema", "model"),
            default="auto",
            help="auto: the EMA weights when the run kept them (default); ema; model: raw weights",
        )


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body: a :class:`UsageError` becomes ``error: ...`` on stderr and exit 2,
    an :class:`OutputError` (a full disk mid-write) the same line and exit 1."""
    try:
        return main() or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
