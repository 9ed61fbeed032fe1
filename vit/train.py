"""``python -m vit.train`` / ``python train.py`` / ``vit-train``: train a model (see ``--help``).

Exit codes: 0 when done, 2 on bad input (one line on stderr), 1 when the loss diverges or a
checkpoint cannot be written, 128+signal after SIGTERM/SIGINT (a checkpoint is saved first).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys

from vit.engine.config import parse_args
from vit.errors import CliParser, OutputError, UsageError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, print the result as one JSON line; returns the exit code."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        notes: list[str] = []
        cfg = parse_args(argv, notes)  # before importing torch: --help answers at once
        # The command as the user typed it, for the export's model card.
        typed = sys.argv[1:] if argv is None else list(argv)
        command = " ".join([CliParser.program("python train.py"), *map(shlex.quote, typed)])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from vit.engine.distributed import leave_process_group
    from vit.engine.trainer import Diverged, Interrupted, train

    try:
        result = train(cfg, command=command, notes=notes)
    except UsageError as e:
        leave_process_group(agreed=False)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Diverged, OutputError) as e:  # OutputError: a checkpoint or record not written
        leave_process_group(agreed=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a log write failed mid-run (a full disk): what was saved is kept
        leave_process_group(agreed=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {reason}; continue with --resume auto", file=sys.stderr)
        return 1
    except Interrupted as e:
        leave_process_group(agreed=True)
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    leave_process_group(agreed=True)
    if main_process:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
