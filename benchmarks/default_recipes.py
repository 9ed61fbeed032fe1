"""The default recipes as a new user runs them: ``python train.py`` with no ``--config``, timed
from the shell's point of view (start-up included), one table row each.

    python benchmarks/default_recipes.py synthetic
    python benchmarks/default_recipes.py photos --src ../shared/data/cifar10-jpeg/train
    python benchmarks/default_recipes.py synthetic photos --quick   # a check of seconds

``synthetic``: ``python train.py --data synthetic`` (configs/synthetic.yaml). ``photos``: a folder
of "photos of some size" written from a CIFAR-10 image folder (``--src``: ``<class>/*.jpg``): the
first ``--per-class`` images of each class as ``train/``, the next 100 as ``val/``, upscaled to
``--size`` pixels (bicubic, JPEG quality 90), then ``python train.py --data imagefolder --data-dir
DIR`` (configs/imagefolder_cpu.yaml). Each run is a subprocess in a fresh run directory under
``--work`` with the default thread count; ``--quick`` shortens the runs (synthetic: 1 epoch of 256
images; photos: 20 per class, a 0.2-minute limit) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from benchmarks.machine import describe_cpu  # noqa: E402


def write_photos(src: Path, dst: Path, *, per_class: int, size: int) -> int:
    """``dst/{train,val}/<class>/*.jpg`` from ``src/<class>/*.jpg``; returns the image count."""
    from PIL import Image

    n = 0
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        files = sorted((src / cls).glob("*.jpg"))
        for split, part in (("train", files[:per_class]), ("val", files[per_class:][:100])):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in part:
                image = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
                image.save(dst / split / cls / f.name, quality=90)
                n += 1
    return n


def run(args: list[str], out: Path) -> dict:
    """``python train.py ARGS --out-dir OUT``: wall seconds, the recipe line and the result."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "--out-dir", str(out)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    recipe = next((line for line in proc.stderr.splitlines() if ".yaml" in line), "")
    return {"wall": wall, "recipe": recipe, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="+", choices=("synthetic", "photos"))
    p.add_argument("--src", type=Path, help="a CIFAR-10 image folder's train/ (for photos)")
    p.add_argument("--per-class", type=int, default=300, help="training photos per class")
    p.add_argument("--size", type=int, default=96, help="photo side in pixels")
    p.add_argument("--work", type=Path, default=Path("runs/default-recipes"))
    p.add_argument("--quick", action="store_true", help="seconds-long runs that check the script")
    args = p.parse_args(argv)
    rows = []
    for which in args.which:
        if which == "synthetic":
            extra = ["--epochs", "1", "--synthetic-train", "256", "--synthetic-val", "64"]
            cmd = ["--data", "synthetic", *(extra if args.quick else [])]
        else:
            if args.src is None:
                p.error("photos needs --src (a CIFAR-10 image folder's train/)")
            photos = args.work / "photos"
            shutil.rmtree(photos, ignore_errors=True)
            per_class = 20 if args.quick else args.per_class
            write_photos(args.src, photos, per_class=per_class, size=args.size)
            cmd = ["--data", "imagefolder", "--data-dir", str(photos)]
            cmd += ["--cache-dir", str(args.work / "cache")]
            cmd += ["--time-limit", "0.2", "--epochs", "2"] if args.quick else []
        r = run(cmd, args.work / f"run-{which}")
        rows.append((f"python train.py {' '.join(cmd)}", r))
    print(f"machine: {describe_cpu()}")
    print(f"{'command':<60} {'wall s':>7} {'steps':>6} {'top1':>7}  recipe")
    for cmd, r in rows:
        print(f"{cmd[:60]:<60} {r['wall']:>7.1f} {r['steps']:>6} {r['top1']:>7.4f}  {r['recipe']}")
    print(json.dumps([{"command": c, **r} for c, r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
