"""Transformer decoder vs Show, Attend and Tell's LSTM decoder: the same ViT encoder, data, CPU time
budget and machine; one table.

    OMP_NUM_THREADS=1 python benchmarks/caption_decoders.py [--time-limit 15] [--threads 1]
    python benchmarks/caption_decoders.py --quick        # smoke test: tiny data, 0.3 min each

Each decoder is trained by the engine in its own process, one after the other
(``python train.py --config CONFIG --time-limit MINUTES``; configs/caption_shapes.yaml for
``caption_mini_patch8_32``, configs/caption_shapes_lstm.yaml for ``caption_lstm_mini_patch8_32``),
so ``--time-limit`` sizes warmup + cosine, validation and checkpoints included, for both alike.
Then, from each run's ``last.pt`` (the weights at the end of the budget, not the best
validation):

* BLEU-4 and CIDEr-D of greedy captions on the held-out shapes validation scenes
  (``vit.evaluate``'s numbers);
* parameters; training images/s, the median over the engine's logged intervals (metrics.jsonl);
* generation ms per caption: ``generate`` (encoder + greedy decoding, cached state) on a batch of
  64 validation images on the CPU with ``--threads`` threads, median of 5 timed runs / 64.

Run it on an otherwise idle machine: the table shows the 1-minute load average before training.
``--parallel`` trains both at once, each pinned to its own core.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.engine.checkpoint import load_model
from vit.evaluate import evaluate_checkpoint
from vit.models import num_params

ROOT = Path(__file__).resolve().parents[1]
DECODERS = [
    # (decoder, recipe); the recipe names the model
    ("Transformer", "configs/caption_shapes.yaml"),
    ("LSTM + soft attention", "configs/caption_shapes_lstm.yaml"),
]
# --quick: the recipes on a tenth of the scenes, two epochs at most, a 0.3-minute budget, logs
# every 5 steps (the throughput comes from the logs).
QUICK = {
    "time_limit": 0.3,
    "epochs": 2,
    "log_every": 5,
    "task_args": {"max_len": 28, "train_scenes": 2000, "val_scenes": 128, "beam_size": 1},
}
GEN_BATCH, GEN_REPEATS = 64, 5


def start(
    recipe: str, out_dir: Path, time_limit: float, threads: int, quick: bool, core: int | None
) -> subprocess.Popen:
    """Start training ``recipe`` in a fresh engine process (pinned to CPU ``core`` if given)."""
    import yaml

    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / recipe)]
    cmd += ["--time-limit", str(time_limit), "--threads", str(threads), "--out-dir", str(out_dir)]
    if quick:
        task_args = {**QUICK["task_args"]}
        recipe_args = yaml.safe_load((ROOT / recipe).read_text()).get("task_args", {})
        if "attention_penalty" in recipe_args:  # keep the recipe's λ
            task_args["attention_penalty"] = recipe_args["attention_penalty"]
        cmd += ["--epochs", str(QUICK["epochs"]), "--task-args", json.dumps(task_args)]
        cmd += ["--log-every", str(QUICK["log_every"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pin = None if core is None else lambda: os.sched_setaffinity(0, {core})
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, text=True, preexec_fn=pin
    )


def train_all(
    recipes: list[str],
    runs: list[Path],
    time_limit: float,
    threads: int,
    quick: bool,
    parallel: bool,
) -> list[float]:
    """Train every recipe, one after the other or (``parallel``) at once, each process pinned
    to its own core; returns each run's wall-clock seconds."""
    walls = []
    procs: list[tuple[str, subprocess.Popen, float]] = []
    for i, (recipe, run) in enumerate(zip(recipes, runs, strict=True)):
        core = i % (os.cpu_count() or 1) if parallel else None
        procs.append(
            (recipe, start(recipe, run, time_limit, threads, quick, core), time.monotonic())
        )
        if not parallel:
            walls.append(_wait(*procs.pop()))
    return walls + [_wait(*p) for p in procs]


def _wait(recipe: str, proc: subprocess.Popen, t0: float) -> float:
    if proc.wait() != 0:
        raise SystemExit(f"training {recipe} failed (exit {proc.returncode}); see its log above")
    return time.monotonic() - t0


def _logged_seconds(run: Path) -> float:
    """The seconds of the last record of a run's metrics.jsonl (since its process started)."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["seconds"]


def images_per_s(run: Path) -> float:
    """Median of the engine's logged training throughput (images/s) over the run."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["images_per_s"] for x in lines if '"kind": "train"' in x]
    if not rates:
        raise SystemExit(f"{run}/metrics.jsonl has no training records; lower log_every")
    return statistics.median(rates)


@torch.no_grad()
def generation_ms(checkpoint: Path, images: torch.Tensor) -> float:
    """Milliseconds per caption: ``generate`` (greedy) on ``images``, median of timed runs."""
    model, _ = load_model(checkpoint)  # eval mode, CPU
    model.generate(images)  # warm-up
    times = []
    for _ in range(GEN_REPEATS):
        t0 = time.perf_counter()
        model.generate(images)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(images) * 1e3


def validation_images(checkpoint: Path, n: int) -> torch.Tensor:
    """The first ``n`` held-out validation scenes, normalised as the run trained."""
    from vit.engine.captioning import CaptionTask
    from vit.engine.config import make_config

    ckpt = torch.load(checkpoint, weights_only=True)
    task = CaptionTask(make_config({**ckpt["config"], "resume": ""}), ckpt["task_state"])
    val = task.build_dataset("val")  # the vocabulary comes from the checkpoint's task state
    images = torch.stack([val[i][0] for i in range(min(n, len(val)))])
    return task.preprocess.normalize(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--time-limit", type=float, help="minutes of training per decoder (15; --quick: 0.3)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads, training and timing (1)")
    p.add_argument("--out-dir", default="", help="runs/caption-decoders[-quick] by default")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data and budget")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no training: the table of the finished runs in --out-dir",
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train the decoders at once, each pinned to its own core (needs a core per decoder "
        "and --threads 1; halves the wall time on an otherwise idle machine)",
    )
    args = p.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = QUICK["time_limit"] if args.quick else 15.0
    if args.time_limit <= 0 or args.threads < 1:
        print("error: --time-limit and --threads must be positive", file=sys.stderr)
        return 2
    out = Path(args.out_dir or f"runs/caption-decoders{'-quick' if args.quick else ''}").resolve()
    runs = [out / Path(recipe).stem for _, recipe in DECODERS]
    taken = [str(r) for r in runs if r.exists()]
    if args.report_only:
        missing = [str(r / "last.pt") for r in runs if not (r / "last.pt").is_file()]
        if missing:
            print(f"error: no finished runs: {', '.join(missing)}", file=sys.stderr)
            return 2
    elif taken:
        print(f"error: {', '.join(taken)} exist(s); pass another --out-dir", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0]
    recipes = [recipe for _, recipe in DECODERS]
    if args.report_only:  # the runs' own clock: the last logged record's seconds
        walls = [_logged_seconds(run) for run in runs]
    else:
        print(f"== {args.time_limit:g} min per decoder", file=sys.stderr, flush=True)
        walls = train_all(recipes, runs, args.time_limit, args.threads, args.quick, args.parallel)
    rows = []
    for (decoder, _), run, wall in zip(DECODERS, runs, walls, strict=True):
        last = run / "last.pt"
        metrics = evaluate_checkpoint(str(last), split="val", device="cpu")
        model, ckpt = load_model(last)
        images = validation_images(last, GEN_BATCH)
        rows.append(
            {
                "decoder": decoder,
                "model": ckpt["config"]["model"],
                "params": num_params(model),
                "steps": ckpt["progress"]["step"],
                "wall_min": round(wall / 60, 2),
                "load_before": round(load, 2),
                "train_images_per_s": round(images_per_s(run), 1),
                "bleu4": metrics["bleu4"],
                "cider_d": metrics["cider"],
                "val_n": metrics["n"],
                "gen_ms_per_caption": round(generation_ms(last, images), 3),
                "out_dir": str(run),
            }
        )

    print(
        f"\nshapes, {rows[0]['val_n']} held-out validation scenes, greedy captions; "
        f"{args.time_limit:g} min of training each; {describe_cpu()}, {args.threads} thread(s); "
        f"torch {torch.__version__}\n"
    )
    print(
        "| decoder | model | params | steps | train images/s | BLEU-4 | CIDEr-D "
        "| generation ms/caption (batch 64) | load before |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['decoder']} | `{r['model']}` | {r['params'] / 1e6:.3f} M | {r['steps']} "
            f"| {r['train_images_per_s']:.0f} | {r['bleu4']:.4f} | {r['cider_d']:.3f} "
            f"| {r['gen_ms_per_caption']:.2f} | {r['load_before']:.2f} |"
        )
    print(json.dumps({"time_limit_min": args.time_limit, "quick": args.quick, "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
