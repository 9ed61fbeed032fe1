"""Import cost of the library, after ``import torch``, against ``import timm``.

    python benchmarks/import_time.py [--runs 7]

Each measurement is a fresh interpreter running ``import torch; import MODULE`` under
``python -X importtime``; the figure is MODULE's cumulative import time as the interpreter reports
it (torch already loaded), the median over the runs. The last column is the ratio to timm measured
in the same rounds, so a slower machine moves both.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

MODULES = ("vit.models", "vit.layers", "vit.rollout", "timm")


def import_seconds(module: str) -> float:
    """Cumulative seconds ``import module`` takes in a fresh interpreter after ``import torch``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import torch; import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6  # microseconds
    raise RuntimeError(f"python -X importtime reported no line for {module}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="interpreters per module (default 7)")
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {m: [] for m in MODULES}
    for _ in range(args.runs):  # modules alternate, so load drift hits them alike
        for module in MODULES:
            times[module].append(import_seconds(module))
    timm = statistics.median(times["timm"])
    print(f"# python {sys.version.split()[0]}, median of {args.runs} fresh interpreters")
    print(f"{'import (after torch)':<24}{'seconds':>10}{'vs timm':>10}")
    for module in MODULES:
        median = statistics.median(times[module])
        print(f"{module:<24}{median:>10.3f}{median / timm:>9.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
