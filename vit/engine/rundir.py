"""A run directory is a transaction: one writer, a config that says what the run uses, logs of
one run only.

* :class:`RunLock` — a kernel lock on ``.lock`` for the life of a run; a second run into the
  directory is refused naming the holder; the lock ends with its process, so it is never stale.
* :func:`check_out_dir` — a fresh run never mixes with what a folder already holds; ``--resume``
  from elsewhere never overwrites another run.
* :func:`resume_changes` — on resume, keys that may change (extending the run, logging cadence,
  loader workers) are applied and reported; keys that would break exact resume are refused.
* :func:`write_config` — ``config.yaml`` is always what the run uses; earlier versions are kept as
  ``config.0.yaml``, ``config.1.yaml``, ...
* :func:`read_metrics` — ``metrics.jsonl`` read tolerantly: a torn last line (a crash mid-write)
  is dropped with a note.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from vit.engine.config import RunConfig
from vit.errors import ConfigError
from vit.fileio import atomic_write

__all__ = [
    "RESUMABLE_KEYS",
    "RunLock",
    "check_out_dir",
    "check_resume",
    "make_out_dir",
    "new_folders",
    "read_metrics",
    "remove_empty",
    "resume_changes",
    "write_config",
]

# Keys a resumed run may change; every other key would change what the saved state means.
RESUMABLE_KEYS = {
    "epochs": "extends (or shortens) the schedule",
    "grad_accum_steps": "micro-batches of the same step",
    "time_limit": "the schedule is fitted again to the time the earlier runs left",
    "val_every": "validation cadence",
    "save_every": "checkpoint cadence",
    "log_every": "logging cadence",
    "rollout_every": "rollout image cadence",
    "rollout_images": "rollout images shown",
    "rollout_head_fusion": "rollout display",
    "rollout_discard_ratio": "rollout display",
    "rollout_per_layer": "rollout display",
    "rollout_gradient": "rollout display",
    "workers": "loader processes (data are a function of seed, epoch and index)",
    "threads": "CPU threads (float reductions may then differ in the last bits)",
    "device": "where the run continues",
    "compile": "torch.compile",
    "channels_last": "memory format",
    "tta_hflip": "how validation reads the model",
    "data_dir": "where the same data lives",
    "cache_dir": "decoded-image cache",
}
# Never compared: how this process was started.
_IGNORED = {"resume", "out_dir", "overwrite", "init_from"}
# What a run writes into its directory (--overwrite removes exactly these).
_RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "rollout_images.json", "vocab.json")
_RUN_GLOBS = (
    "config*.yaml",
    "events.out.tfevents.*",
    ".*.pt.tmp",
    ".*.pt.*.tmp",  # vit.fileio.atomic_write's temporary files
    ".metrics.jsonl.*.tmp",
    ".config.yaml.*.tmp",
)


class RunLock:
    """``out_dir/.lock`` for the life of a run: ``with RunLock(out_dir): ...``.

    A kernel lock (``filelock``): the operating system releases it when the process ends, however
    it ends, so a lock is never stale. ``.lock.owner`` records the holder (pid, host, start time)
    for the message a second writer gets.

    Raises:
        ConfigError: (on entering) another process holds the directory.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self.owner = self.path.with_name(".lock.owner")
        self._lock = FileLock(self.path, timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise ConfigError(
                f"{self.path.parent} is in use by another run ({self._holder()}); wait for it, or "
                f"choose another --out-dir"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        with atomic_write(self.owner) as f:  # never through a link planted at a temporary name
            f.write(json.dumps(me))
        return self

    def _holder(self) -> str:
        try:
            holder = json.loads(self.owner.read_text())
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(holder["started"])))
            return f"pid {int(holder['pid'])} on {holder['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its owner is still starting"

    def __exit__(self, *exc: object) -> None:
        self.owner.unlink(missing_ok=True)
        self._lock.release()


def _run_files(out: Path) -> list[Path]:
    found = [out / name for name in _RUN_FILES if (out / name).exists()]
    return found + sorted(p for pattern in _RUN_GLOBS for p in out.glob(pattern))


def make_out_dir(cfg: RunConfig) -> Path:
    """``cfg.out_dir``, created if needed.

    Raises:
        ConfigError: it is a file, cannot be created, or is not writable.
    """
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {out} is not writable; choose another --out-dir")
    return out


def new_folders(path: Path) -> list[Path]:
    """The folders that creating ``path`` would make: ``path`` and its missing parents, deepest
    first (for :func:`remove_empty`)."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty but for the released
    :class:`RunLock` file: a run that stopped before writing anything leaves no folders behind.
    Only for folders this run created (:func:`new_folders`), so no other run can hold the lock."""
    for folder in folders:
        try:
            if [p.name for p in folder.iterdir()] == [".lock"]:
                (folder / ".lock").unlink()
            folder.rmdir()
        except OSError:  # not empty (or already gone): keep it and its parents
            return


def check_out_dir(cfg: RunConfig) -> Path | None:
    """Decide what the run does with ``cfg.out_dir``: returns the checkpoint to resume from (or
    ``None`` for a fresh run), after refusing anything that would mix two runs.

    Raises:
        ConfigError: the folder is a file or not writable; it holds a run and neither
            ``--resume`` nor ``--overwrite`` was given; ``--resume PATH`` points elsewhere while the
            folder holds another run.
    """
    out = make_out_dir(cfg)
    last = out / "last.pt"
    existing = _run_files(out)
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite starts over and --resume continues: pass one of them")
    if cfg.overwrite:
        for path in existing:
            path.unlink()
        if existing:
            print(
                f"note: --overwrite removed {len(existing)} files of the run in {out}",
                file=sys.stderr,
            )
        return None
    if cfg.resume == "auto":
        if last.is_file():
            return last
        if existing:
            raise ConfigError(_leftovers(out, existing))
        return None
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_file():
            from vit.errors import CheckpointError

            raise CheckpointError(f"--resume {cfg.resume}: no such checkpoint file")
        if existing and path.resolve().parent != out.resolve():
            raise ConfigError(
                f"--resume {path} would continue that run in {out}, which holds another run "
                f"({existing[0].name}, ...); pass an empty --out-dir, or --resume auto to "
                f"continue the run in {out}"
            )
        return path
    if last.is_file():
        raise ConfigError(
            f"{out} already holds a run ({last}); continue it with --resume auto, start over "
            f"with --overwrite, or choose another --out-dir"
        )
    if existing:
        raise ConfigError(_leftovers(out, existing))
    return None


def _leftovers(out: Path, existing: list[Path]) -> str:
    names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
    return (
        f"{out} holds the logs of a run that saved no checkpoint ({names}); start over with "
        f"--overwrite (removes them) or choose another --out-dir"
    )


def check_resume(ckpt: dict[str, Any], cfg: RunConfig, world_size: int, path: Path) -> list[str]:
    """Refuse a resume whose config changes what the checkpoint's state means (see
    :func:`resume_changes`), or whose checkpoint holds no training state; the changes that may be
    applied, one line each. ``world_size``: this run's number of processes.

    Raises:
        CheckpointError: no optimizer, scaler, progress or RNG state in the checkpoint.
        ConfigError: a change that breaks exact resume.
    """
    from vit.errors import CheckpointError

    missing = [k for k in ("optimizer", "scaler", "progress", "rng") if k not in ckpt]
    if missing or not isinstance(ckpt.get("progress"), dict):
        raise CheckpointError(
            f"{path} holds no training state ({', '.join(missing) or 'progress'} missing or "
            f"malformed): it cannot be resumed; start a new run from its weights with --init-from"
        )
    saved_source = str(ckpt["config"].get("init_from") or "")
    if cfg.init_from and cfg.init_from != saved_source:
        started = f"started from {saved_source}" if saved_source else "started from scratch"
        raise ConfigError(
            f"--init-from {cfg.init_from} with a resumed run: the run in {cfg.out_dir} continues "
            f"from its own checkpoint ({started}); drop --init-from, or start another --out-dir"
        )
    notes = resume_changes(ckpt["config"], cfg)
    saved_world = ckpt.get("world_size", len(ckpt["rng"].get("ranks", [None])))
    random_draws = cfg.augment_policy().enabled or cfg.mixup > 0 or cfg.cutmix > 0
    if saved_world != world_size:
        if random_draws or cfg.drop_path > 0:
            raise ConfigError(
                f"the run was trained by {saved_world} process(es), this is {world_size}: with "
                f"random augmentation or drop path that changes the random draws; resume with "
                f"{saved_world} process(es)"
            )
        notes.append(f"processes: {saved_world} -> {world_size}")
    return notes


def resume_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The resumable differences between a checkpoint's config and the requested one, one
    line each.

    Raises:
        ConfigError: listing every difference that would break exact resume.
    """
    now = dataclasses.asdict(cfg)
    changed = {
        k: (saved.get(k), v)
        for k, v in now.items()
        if k not in _IGNORED and k in saved and saved[k] != v
    }
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        diffs = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        what = (
            "the checkpoint holds another architecture"
            if {"model", "model_args"} & set(refused)
            else "the checkpoint's state only continues under its own values"
        )
        raise ConfigError(
            f"cannot resume with a changed {', '.join(refused)} ({diffs}): {what}; drop those "
            f"options (config.yaml holds the run's) or start another --out-dir"
        )
    return [f"{k}: {old!r} -> {new!r} ({RESUMABLE_KEYS[k]})" for k, (old, new) in changed.items()]


def write_config(out: Path, cfg: RunConfig) -> None:
    """``config.yaml`` := the config the run uses (written atomically); a different earlier one
    is kept as ``config.N.yaml`` (N = 0, 1, ...)."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    path = out / "config.yaml"
    if path.exists() and path.read_text() != text:
        n = 0
        while (out / f"config.{n}.yaml").exists():
            n += 1
        shutil.move(path, out / f"config.{n}.yaml")
    with atomic_write(path) as f:
        f.write(text)


def read_metrics(path: Path, up_to_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` logged at steps ``<= up_to_step`` (what a resumed run
    keeps; later ones are about to be redone). A torn last line is dropped with a note; a torn
    line elsewhere is an error naming it.

    Raises:
        ConfigError: a line other than the last is not JSON.
    """
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                print(f"note: dropped a torn last line of {path} (line {n})", file=sys.stderr)
                continue
            raise ConfigError(
                f"{path} line {n} is not a metrics record ({line[:60]!r}); remove that line"
            ) from None
        if step <= up_to_step:
            keep.append(line)
    return keep
