"""The README works as written: it is short, its Python blocks run, its cheap commands run (every
entry point's ``--help``, the quick start on a tiny budget and the commands that read its run),
and its links, like those of CHANGELOG.md and docs/, resolve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 260
ENTRY_POINTS = (
    "python train.py",
    "python -m vit.train",
    "python -m vit.evaluate",
    "python -m vit.rollout",
    "python -m vit.caption",
    "python -m vit.predict",
    "python -m vit.export",
    "vit-train",
    "vit-evaluate",
    "vit-rollout",
    "vit-caption",
    "vit-predict",
    "vit-export",
)
QUICK_START_TRAIN = "python train.py --config configs/synthetic.yaml"
QUICK_START_RUN = "runs/synthetic/best.pt"
# Appended to the quick-start training command: the same config on a budget of seconds.
TINY_BUDGET = "--epochs 1 --synthetic-train 256 --synthetic-val 64 --rollout-images 2"


def fenced_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks of a Markdown text."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def section(text: str, heading: str) -> str:
    """The text under a ``## heading``, up to the next one."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line, maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = fenced_blocks(TEXT, "python")
HELP_COMMANDS = [c for c in shell_commands(TEXT) if c.endswith(" --help")]
# Each block runs in a fresh namespace of one interpreter: a block that relies on another block's
# names fails as it would on its own, and torch is imported once.
BLOCK_RUNNER = """
import json, sys, traceback
errors = []
for path in sys.argv[1:]:
    try:
        exec(compile(open(path, encoding="utf-8").read(), path, "exec"), {"__name__": "__main__"})
        errors.append("")
    except BaseException:
        errors.append(traceback.format_exc())
print(json.dumps(errors))
"""


def run(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A README command through bash (globs, ``VAR=value`` prefixes), with this checkout's ``vit``
    first on the import path and this interpreter's ``python`` and scripts first on PATH; one
    thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["COLUMNS"] = "100"  # argparse wraps --help to the terminal's width
    env["OMP_NUM_THREADS"] = "1"  # the checks run side by side; threads would contend
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _failure(command: str, proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`{command}` exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    )


def _python_blocks(tmp: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Runs the README's Python blocks in an empty directory; one traceback ('' = ran) each."""
    names = []
    for i, block in enumerate(PYTHON_BLOCKS):
        names.append(f"block{i}.py")
        (tmp / names[-1]).write_text(block, encoding="utf-8")
    (tmp / "runner.py").write_text(BLOCK_RUNNER, encoding="utf-8")
    proc = run("python runner.py " + " ".join(names), cwd=tmp)
    errors = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else []
    return proc, errors


def _quick_start(tmp: Path) -> tuple[Path, list[tuple[str, subprocess.CompletedProcess[str]]]]:
    """The quick start's training on a tiny budget, then every README command that reads its
    run, each as written, from a directory holding the checkout's files; stops at a failure."""
    for name in ("train.py", "configs", "docs"):
        (tmp / name).symlink_to(ROOT / name)
    quick_start = shell_commands(section(TEXT, "Quick start"))
    train = [c for c in quick_start if c.startswith(QUICK_START_TRAIN)]
    readers = [c for c in shell_commands(TEXT) if QUICK_START_RUN in c]
    done = []
    for command in [f"{c} {TINY_BUDGET}" for c in train] + readers:
        done.append((command, run(command, tmp, timeout=180)))
        if done[-1][1].returncode != 0:
            break
    return tmp, done


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every check that runs a process, started together: they are independent, and each spends
    most of its time importing torch. Keys: "blocks", "quick_start" and each ``--help`` command."""
    with ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 1))) as pool:
        quick = pool.submit(_quick_start, tmp_path_factory.mktemp("quick_start"))
        blocks = pool.submit(_python_blocks, tmp_path_factory.mktemp("blocks"))
        helps = {c: pool.submit(run, c, ROOT, 60) for c in HELP_COMMANDS}
        return {
            "quick_start": quick.result(),
            "blocks": blocks.result(),
            **{c: f.result() for c, f in helps.items()},
        }


def test_readme_is_short() -> None:
    lines = len(TEXT.splitlines())
    assert lines <= MAX_LINES, (
        f"README.md has {lines} lines (at most {MAX_LINES}): it is the user's door; reference "
        f"text goes to docs/, measurements to docs/benchmarks.md, history to CHANGELOG.md"
    )


def test_readme_has_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 3  # models, rollout, captioning


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index: int, ran: dict[str, Any]) -> None:
    """Each block runs on its own, offline, on the CPU, in an empty directory."""
    proc, errors = ran["blocks"]
    assert proc.returncode == 0, _failure("the README's python blocks", proc)
    assert not errors[index], f"README python block {index}:\n{errors[index]}"


def test_readme_lists_help_of_every_entry_point() -> None:
    assert sorted(c.removesuffix(" --help") for c in HELP_COMMANDS) == sorted(ENTRY_POINTS)


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_command(command: str, ran: dict[str, Any]) -> None:
    proc = ran[command]
    assert proc.returncode == 0, _failure(command, proc)
    assert proc.stdout.startswith("usage:"), _failure(command, proc)


def test_python_m_vit_train_is_train_py(ran: dict[str, Any]) -> None:
    """``python -m vit.train`` is the same command as ``python train.py``: the same options."""
    module, script = ran["python -m vit.train --help"], ran["python train.py --help"]
    assert "options:" in script.stdout, _failure("python train.py --help", script)
    assert "options:" in module.stdout, _failure("python -m vit.train --help", module)
    options = script.stdout[script.stdout.index("options:") :]
    assert module.stdout[module.stdout.index("options:") :] == options


def test_quick_start_and_the_commands_on_its_run(ran: dict[str, Any]) -> None:
    tmp, done = ran["quick_start"]
    assert done[0][0] == f"{QUICK_START_TRAIN} {TINY_BUDGET}"
    for command, proc in done:
        assert proc.returncode == 0, _failure(command, proc)
    evaluates = [proc for c, proc in done if c.startswith("python -m vit.evaluate")]
    rollouts = [proc for c, proc in done if c.startswith("python -m vit.rollout")]
    assert evaluates and rollouts
    # The evaluate line the README shows (shortened: "..." stands for more classes) has the keys
    # evaluate prints, in its order.
    line = re.search(r"^```\n(\{.*\})\n```", TEXT, flags=re.M).group(1)
    shown = re.findall(r'"([\w/]+)":', line)
    for proc in evaluates:
        printed = json.loads(proc.stdout.strip().splitlines()[-1])
        keys = [k for k in printed if not k.startswith("top1/") or k in shown]
        assert keys == shown, (list(printed), shown)
        assert printed["n"] == 64  # --synthetic-val of TINY_BUDGET
    examples = sorted((ROOT / "docs" / "rollout_examples").glob("*.png"))
    maps = sorted((tmp / "maps").glob("*_rollout-mean-discard0.png"))
    assert [p.name for p in maps] == [f"{p.stem}_rollout-mean-discard0.png" for p in examples]


def _prose(path: Path) -> str:
    """A Markdown file without its code blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


MARKDOWN = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    """Links to files of the repository, and their #anchors, exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", _prose(resolved), flags=re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"
