"""Time to accuracy: train a recipe under a time budget and print its validation curve.

    python benchmarks/time_to_accuracy.py --config configs/cifar10_cpu_30min.yaml
    python benchmarks/time_to_accuracy.py --config configs/cifar10_cpu_30min.yaml --baseline-timm
    python benchmarks/time_to_accuracy.py --config configs/cifar10_gpu_10min.yaml --time-limit 10
    torchrun --standalone --nproc_per_node 2 benchmarks/time_to_accuracy.py --config ...  # DDP

Any further ``--key value`` options go to the engine (``python train.py --help``) and win over
the config file. The run goes through vit.train's engine, ``--time-limit`` sizing warmup + cosine to
the budget (validation and checkpoints included), so the recipe and the baseline are measured the
same way. ``--baseline-timm`` trains the issue's reference instead: timm's VisionTransformer
(dim 128, depth 6, heads 4, mlp ratio 2, patch 4), crop + flip, AdamW lr 2e-3 wd 0.05, label
smoothing 0.1, batch 128, on the data, device and budget of the config file.

Prints the curve (epoch, seconds, images, val top-1, val loss), then a summary: parameters,
images/s, the share of training wall time spent waiting for data (``data wait``, from the engine's
logs) and, timed separately with the device synchronised, the loader alone per batch as a share of
a training step (``loader/step``: on a GPU it also counts augmentation kernels the host does not
wait for). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import describe_cpu
from vit.data import DataError
from vit.engine.config import RunConfig, build_parser, load_config, make_config
from vit.engine.trainer import Diverged, Interrupted, Trainer
from vit.errors import CheckpointError, ConfigError

# The timm reference; data, device, loader, logging and the budget come from the config
# file (DATA_KEYS), everything else from here.
BASELINE_TIMM = {
    "model": "timm:vit_tiny_patch16_224",
    "model_args": {"embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 4},
    "batch_size": 128,
    "lr": 2e-3,
    "min_lr": 1e-5,
    "weight_decay": 0.05,
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
    "crop_padding": 4,
    "hflip": True,
    "randaugment_ops": 0,
    "cutout": 0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "drop_path": 0.0,
    "ema": False,
    "grad_clip": 0.0,  # a plain recipe: no clipping
    "amp": "off",
    "rollout_every": 0,  # rollout reads our attention modules only
}
DATA_KEYS = (
    "task",
    "data",
    "data_dir",
    "cache_dir",
    "val_fraction",
    "img_size",
    "device",
    "loader",
    "workers",
    "channels_last",
    "epochs",
    "seed",
    "log_every",
)


def machine() -> str:
    """A short description of where this ran."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"{describe_cpu()}, no GPU, {torch.get_num_threads()} thread(s) per process"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_seconds_per_batch(trainer: Trainer, batches: int = 20) -> float:
    """The training loader alone, per batch, with the device synchronised (epoch 0's order)."""
    loader, device = trainer.train_loader, trainer.device
    loader.batch_sampler.set_epoch(0)
    it = iter(loader)
    next(it)  # start-up (workers, the epoch's permutation)
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        if next(it, None) is None:
            break
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / max(1, n)


def _config(args: argparse.Namespace, rest: list[str]) -> RunConfig:
    """The engine's config: the recipe file (or the baseline on the file's data), then the
    command line's engine options."""
    given = vars(build_parser().parse_args(rest))  # only the options actually given
    given["time_limit"] = args.time_limit
    if args.out_dir:
        given["out_dir"] = args.out_dir
    values = load_config(args.config)
    if args.baseline_timm:
        recipe_dir = values.get("out_dir") or f"runs/classify-{values.get('data', 'synthetic')}"
        values = {k: v for k, v in values.items() if k in DATA_KEYS}
        values.update(BASELINE_TIMM, out_dir=f"{recipe_dir}-baseline-timm")
    return make_config({**values, **given})


def _leave_process_group(*, agreed: bool) -> None:
    """Under torchrun: wait for the other ranks (rank 0 reports first), then leave the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if agreed:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other --key value options are passed to the engine (python train.py --help).",
    )
    p.add_argument("--config", required=True, help="a recipe in configs/")
    p.add_argument("--time-limit", type=float, default=30.0, help="minutes (default 30)")
    p.add_argument("--baseline-timm", action="store_true", help="train the timm reference")
    p.add_argument("--out-dir", default="", help="run directory (default: the recipe's)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = _config(args, rest)
        trainer = Trainer(cfg)
        final = trainer.fit()
    except (ConfigError, DataError, CheckpointError) as e:
        _leave_process_group(agreed=False)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Diverged, Interrupted) as e:
        _leave_process_group(agreed=True)
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Interrupted) else 1
    try:
        return report(args, cfg, trainer, final) if trainer.is_main else 0
    finally:
        _leave_process_group(agreed=True)


def report(args: argparse.Namespace, cfg: RunConfig, trainer: Trainer, final: dict) -> int:
    """Print the curve and the summary of a finished run (rank 0 under torchrun)."""
    seconds = time.monotonic() - trainer.t_start
    lines = Path(cfg.out_dir, "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    val = [r for r in records if r["kind"] == "val"]
    train = [r for r in records if r["kind"] == "train"]
    n_params = sum(t.numel() for t in trainer.model.parameters())
    if not train:
        print("error: no training log records; lower --log-every", file=sys.stderr)
        return 2
    ips = sum(r["images_per_s"] for r in train) / len(train)
    wait = sum(r["data_wait"] for r in train) / len(train)
    step_s = cfg.batch_size / ips
    loader_s = loader_seconds_per_batch(trainer)

    print(f"\n{'epoch':>5} {'seconds':>8} {'images':>9} {'val top-1':>9} {'val loss':>8}")
    for r in val:
        print(
            f"{r['epoch']:>5} {r['seconds']:>8.0f} {r['step'] * cfg.batch_size:>9} "
            f"{r['top1']:>9.4f} {r['loss']:>8.4f}"
        )
    name = cfg.model + (" (timm reference)" if args.baseline_timm else "")
    print(
        f"\nmodel {name} {cfg.model_args}, {n_params / 1e6:.2f}M parameters, amp {cfg.amp}, "
        f"loader {'device' if trainer.device_loader else 'cpu'}\n"
        f"machine {machine()}, {trainer.world_size} process(es)\n"
        f"budget {cfg.time_limit:g} min, wall {seconds / 60:.1f} min, "
        f"{trainer.progress.step} steps ({trainer.progress.step / trainer.steps_per_epoch:.1f} "
        f"epochs), {ips:.0f} images/s\n"
        f"data wait {wait:.1%} of training time; loader alone {loader_s * 1e3:.1f} ms/batch = "
        f"{loader_s / step_s:.1%} of a {step_s * 1e3:.0f} ms step\n"
        f"final val top-1 {final['top1']:.4f} (best {trainer.progress.best:.4f})"
    )
    summary = {
        "model": cfg.model,
        "baseline_timm": args.baseline_timm,
        "params": n_params,
        "budget_min": cfg.time_limit,
        "wall_min": round(seconds / 60, 2),
        "machine": machine(),
        "processes": trainer.world_size,
        "epochs": round(trainer.progress.step / trainer.steps_per_epoch, 2),
        "images_per_s": round(ips, 1),
        "data_wait": round(wait, 4),
        "loader_share_of_step": round(loader_s / step_s, 4),
        "top1": final["top1"],
        "best_top1": trainer.progress.best,
        "curve": [[r["epoch"], r["seconds"], r["top1"]] for r in val],
        "out_dir": cfg.out_dir,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
