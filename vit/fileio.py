"""How ``vit`` writes files: atomically, never through links, never over its inputs.

Every file a command writes (predictions, evaluation rows, export folders, run-directory records)
goes through here:

* :func:`check_output` — before any work, refuse an output that is a folder, lies in a missing or
  read-only folder, or is one of the command's inputs (an image, the checkpoint).
* :func:`atomic_write` — the content goes to a temporary file created exclusively (``O_EXCL``,
  :func:`tempfile.mkstemp`: a link planted under a predictable name is never followed) in the
  destination's folder, then renamed over the destination (:func:`os.replace`, which replaces a
  link rather than writing through it). A failure (a full disk) removes the temporary file and
  leaves the destination as it was.
* :func:`csv_cell` — a text cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``,
  ``@``, tab, carriage return first) gets a leading apostrophe, as OWASP recommends against CSV
  injection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from vit.errors import ConfigError, OutputError

__all__ = [
    "atomic_write",
    "check_output",
    "csv_cell",
    "csv_row",
    "is_regular_file",
    "write_failure",
]

# OWASP "CSV Injection": cells starting with these are formulas to Excel, LibreOffice, Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` safe for a spreadsheet: text that starts like a formula gets a leading ``'``
    (shown, not run); numbers pass unchanged (a negative number is not a formula)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_row(values: Iterable[Any]) -> list[Any]:
    """:func:`csv_cell` of every cell of a row."""
    return [csv_cell(v) for v in values]


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is (or links to) a regular file: not a FIFO, socket or device, whose
    reading can block forever or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output(
    path: str | os.PathLike[str],
    option: str,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse, before any work, an output file that cannot be written or would destroy an input.

    ``option``: how the user named it (``--output``), for the message. ``inputs``: files and
    folders the command reads; an output equal to one of them, or inside an input folder that is
    read recursively, is refused.

    Raises:
        ConfigError: ``path`` is a folder or a special file, its folder is missing or not
            writable, or it is one of ``inputs``.
    """
    out = Path(path)
    shown = os.fsencode(out).decode("utf-8", "backslashreplace")
    if out.is_dir():
        raise ConfigError(f"{option} {shown} is a folder; name a file in it")
    if out.exists() and not is_regular_file(out):
        raise ConfigError(f"{option} {shown} is not a regular file; name a new file")
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {option} {shown}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {option} {shown}: its folder {parent} is not writable")
    for source in map(Path, inputs):
        if out.exists() and source.exists() and _same_file(out, source):
            raise ConfigError(
                f"{option} {shown} is one of the inputs ({source}); it would be replaced: name "
                f"another file"
            )
    return out


def write_failure(e: OSError, path: str | os.PathLike[str]) -> OutputError:
    """The one-line :class:`~vit.errors.OutputError` for a failed write of ``path``."""
    reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    reason = (reason.splitlines() or ["?"])[0]
    return OutputError(f"cannot write {path}: {reason}; nothing was written there", reason)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing: ``with atomic_write(p) as f: f.write(...)``.

    The file object is a fresh temporary file in ``path``'s folder (created with ``O_EXCL``, mode
    0644 less the umask); on leaving the block it is flushed, synced and renamed to ``path``. On
    any error it is removed and ``path`` keeps its old content (or stays absent).

    Raises:
        OutputError: the write failed (e.g. ``ENOSPC``); ``path`` is unchanged.
    """
    path = Path(path)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the result from others
        with open(
            fd,
            mode,
            encoding=None if binary else encoding,
            newline=None if binary else newline,
            closefd=True,
        ) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_failure(e, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
