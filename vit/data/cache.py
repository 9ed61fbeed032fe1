"""The decoded-image cache: one uint8 array file per dataset and machine, mapped by every process.

A dataset is decoded once into ``<cache_dir>/<name>.npy``, a plain NumPy array file, with
``<name>.json`` beside it (what the array holds; written last, so its presence marks a complete
cache). Every process then maps the array read-only (``numpy.load(mmap_mode="r")``): the kernel's
page cache holds one copy shared by all the processes of a machine, and a dataset larger than the
memory pages from disk as it is read. Nothing is copied into a process's own memory but the
images it is reading.

Who decodes: under ``torchrun`` the first process of each machine (``LOCAL_RANK`` 0) decodes
while the others wait at a barrier; processes that share a cache folder without ``torchrun`` (two
runs started together, two machines on one network file system) take turns through a file lock
(``filelock``), and the later ones find the finished cache. Files are written under temporary
names and renamed into place, so a reader never sees a half-written cache; a cache that is
corrupt or holds another shape is decoded again.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from vit.errors import DataError
from vit.fileio import atomic_write
from vit.preprocess import Preprocess

__all__ = ["decode_files", "decoded_cache", "default_cache_dir", "local_rank"]

# Bumped when the layout of the cache files changes: older files are then decoded again.
CACHE_FORMAT = 1

# Decoding a large folder can take hours; the waiting processes must not time out meanwhile
# (torch.distributed's default is 10-30 minutes).
_DECODE_TIMEOUT = timedelta(days=2)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vit``, or ``~/.cache/vit``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit"


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def decoded_cache(
    cache_dir: str | os.PathLike | None,
    name: str,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], dict[str, Any]],
    *,
    what: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The uint8 array ``shape`` cached as ``<cache_dir>/<name>.npy``, mapped read-only, and the
    metadata ``fill`` returned when it decoded it.

    ``name`` must change whenever the content would (it carries the hash of the inputs).
    ``fill(out)`` writes every element of ``out`` (a writable uint8 array of ``shape``, a
    mapping of the file being written) and returns JSON-serialisable metadata. It runs in one
    process per machine (see the module docstring); the others wait and map the result. Where
    the cache folder cannot be written, each process decodes into its own memory instead, with
    a note on stderr.

    Raises:
        whatever ``fill`` raises (e.g. :class:`~vit.errors.DataError` for an unreadable image).
    """
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{name}.npy"
    found = _decode_or_open(path, shape, fill, what) if local_rank() == 0 else None
    _barrier()
    # The other local ranks map what local rank 0 wrote; without torchrun's barrier, or where
    # it could not write, they take the lock and decode themselves.
    return found or _decode_or_open(path, shape, fill, what)


def _barrier() -> None:
    """Wait for every rank (under torch.distributed), on a gloo group of its own with a long
    timeout, made for this wait and destroyed after it (a cached group would outlive the
    process group it belongs to)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.new_group(backend="gloo", timeout=_DECODE_TIMEOUT)
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def _decode_or_open(
    path: Path,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], dict[str, Any]],
    what: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    found = _open(path, shape)
    if found is not None:
        return found
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_suffix(".lock"))
        with lock:
            found = _open(path, shape, remove_invalid=True)  # another process may have written it
            if found is None:
                _write(path, shape, fill, what)
                found = _open(path, shape)
    except OSError as e:
        print(
            f"note: cannot write the decoded-image cache {path} ({e.strerror or e}); decoding "
            f"{what} in memory, which each process repeats; pass a writable --cache-dir",
            file=sys.stderr,
        )
        out = np.empty(shape, dtype=np.uint8)
        meta = fill(out)
        out.flags.writeable = False  # as a mapped cache: read-only
        return out, meta
    if found is None:  # written but unreadable: the file system lies; say so rather than loop
        raise OSError(f"the decoded-image cache {path} was written but cannot be read back")
    return found


def _open(
    path: Path, shape: tuple[int, ...], *, remove_invalid: bool = False
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The mapped array and its metadata, or ``None`` when the cache is missing, incomplete,
    corrupt or of another shape (and then, with ``remove_invalid``, its files are removed)."""
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        if (
            isinstance(meta, dict)
            and meta.get("format") == CACHE_FORMAT
            and meta.get("shape") == list(shape)
            and images.dtype == np.uint8
            and images.shape == shape
        ):
            return images, meta.get("meta", {})
    except (OSError, ValueError, EOFError):  # json.JSONDecodeError is a ValueError
        pass
    if remove_invalid:
        # Processes that map the old file keep it until they unmap it; the name is free now.
        meta_path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    return None


def _write(
    path: Path, shape: tuple[int, ...], fill: Callable[[np.ndarray], dict[str, Any]], what: str
) -> None:
    """Decode into a temporary file, then rename it and its metadata into place."""
    # An exclusive temporary file (never a planted link), mapped and filled, then renamed.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npy")
    os.close(fd)
    tmp = Path(name)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        # Reserve the blocks now: a full disk is then an OSError here, not a SIGBUS when a page
        # of the mapping is first written.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        t0 = time.monotonic()
        meta = fill(out)
        out.flush()
        del out
        record = {"format": CACHE_FORMAT, "shape": list(shape), "dtype": "uint8", "meta": meta}
        record["decoded"] = {"what": what, "seconds": round(time.monotonic() - t0, 1)}
        os.replace(tmp, path)
        with atomic_write(path.with_suffix(".json")) as f:  # last: marks the cache complete
            f.write(json.dumps(record))
    finally:
        tmp.unlink(missing_ok=True)
    path.with_suffix(".npz").unlink(missing_ok=True)  # the in-memory cache of earlier versions


def decode_files(
    files: Sequence[Path],
    out: np.ndarray,
    preprocess: Preprocess,
    *,
    what: str,
    on_error: Callable[[int, DataError], None] | None = None,
) -> None:
    """Decode ``files`` through ``preprocess`` (uint8 (3, S, S) each) into ``out``, uint8
    (N, S, S, 3), on a thread pool (PIL releases the GIL), a chunk at a time so memory stays
    bounded whatever N is. Progress: a bar (images/s, time left) on a terminal, one line
    ``decoding N images of WHAT`` in a log.

    Raises:
        DataError: an unreadable file; with ``on_error``, it is passed ``(index, error)``
            instead and the image is left black.
    """
    from tqdm import tqdm

    def load(i: int) -> None:
        try:
            out[i] = preprocess.load(files[i]).permute(1, 2, 0).numpy()
        except DataError as e:
            if on_error is None:
                raise
            out[i] = 0
            on_error(i, e)

    n = len(files)
    if not sys.stderr.isatty():  # a log gets one line instead of the bar
        print(f"decoding {n:,} images of {what} (cached for next time)", file=sys.stderr)
    bar = tqdm(
        total=n, desc=f"decoding {what}", unit="img", file=sys.stderr, disable=None, delay=0.5,
        leave=False,
    )  # fmt: skip
    chunk = 4096
    with bar, ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for lo in range(0, n, chunk):
            for _ in pool.map(load, range(lo, min(lo + chunk, n))):
                bar.update()
