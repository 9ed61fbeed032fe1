"""The docs' "Use with timm" section works as written: each of its Python blocks runs on its own, in
a directory holding what the section says it holds (the quick start's run, on a tiny budget, and
its export folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
SECTION = "Use with timm"
# The README's quick start (configs/synthetic.yaml) on a budget of seconds.
TRAIN = (
    "train.py --config configs/synthetic.yaml --epochs 1 --synthetic-train 256 --synthetic-val 64 "
    "--rollout-images 2 --threads 1"
)


def section_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks under ``## heading``, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"{DOC.name} has no '## {heading}' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)


BLOCKS = section_blocks(DOC.read_text(encoding="utf-8"), SECTION)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/synthetic/best.pt and export/, as after the quick start and its export command."""
    tmp = tmp_path_factory.mktemp("use_with_timm")
    for name in ("train.py", "configs"):
        (tmp / name).symlink_to(ROOT / name)
    export = ["-m", "vit.export", "--checkpoint", "runs/synthetic/best.pt", "--out-dir", "export"]
    for args in (TRAIN.split(), export):
        done = _run(args, tmp)
        assert done.returncode == 0, done.stderr[-2000:]
    return tmp


def test_the_section_has_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index: int, workdir: Path) -> None:
    path = workdir / f"block{index}.py"
    path.write_text(BLOCKS[index], encoding="utf-8")
    done = _run([path.name], workdir)
    assert done.returncode == 0, f"block {index}:\n{done.stderr[-3000:]}"
