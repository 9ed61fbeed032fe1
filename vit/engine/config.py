"""The run configuration: :class:`RunConfig`, its validation, YAML files and the command line.

``python train.py --config FILE --key value ...``: the command line wins over the file; every
field is one ``--option`` (underscores become dashes). A bad value is a :class:`ConfigError` that
names the key and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vit.errors import CliParser, ConfigError, did_you_mean

# torch is imported where it is used, so `python train.py --help` answers in a fraction of a second.
if typing.TYPE_CHECKING:
    import torch

    from vit.data.transforms import AugmentPolicy

__all__ = [
    "ConfigError",
    "RunConfig",
    "build_parser",
    "load_config",
    "make_config",
    "parse_args",
    "resolve_device",
    "resolve_threads",
]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything that defines a training run. YAML files and ``--key value`` options set these
    fields (the command line wins over the file); the resolved config is saved as
    ``config.yaml``."""

    task: str = _opt("classify", "what to train: a name in vit.engine.tasks.TASKS")
    data: str = _opt("synthetic", "dataset name; valid names depend on --task")
    data_dir: str = _opt("data", "where the dataset lives (cifar10 downloads into it)")
    cache_dir: str = _opt("", "decoded-image cache; '' = $XDG_CACHE_HOME/vit or ~/.cache/vit")
    val_fraction: float = _opt(0.1, "validation share of train when DIR has no val/ or test/")
    img_size: int = _opt(32, "training resolution (images are resized once when decoded)")
    model: str = _opt("vit_tiny_patch4_32", "a name from vit.models.list_models()")
    model_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "model keyword overrides, e.g. '{depth: 6}'"}
    )
    task_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the task itself (see its docs)"}
    )
    epochs: int = _opt(
        10,
        "epochs; with a --time-limit from a config file, the most the schedule may take (a "
        "--time-limit given on the command line without --epochs lifts this cap)",
    )
    batch_size: int = _opt(128, "images per optimiser step")
    optimizer: Literal["adamw", "muon"] = _opt(
        "adamw",
        "muon: Muon (Jordan et al. 2024; vit.engine.optim) on the blocks' weight matrices, "
        "AdamW on embeddings, head, norms and biases, one lr for both (Muon's updates are scaled "
        "to AdamW's RMS)",
    )
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = _opt(
        0.05, "AdamW decoupled weight decay (not on norms/biases/embeddings)"
    )
    beta2: float = _opt(0.999, "AdamW beta2 (also of Muon's AdamW part)")
    warmup_epochs: float = _opt(1.0, "linear warmup length in epochs")
    layer_decay: float = _opt(
        1.0,
        "fine-tuning: scale block i's lr by layer_decay^(depth+1-i) (BEiT); 1 = off, e.g. 0.75",
    )
    grad_accum_steps: int = _opt(
        1,
        "split each step's batch into this many micro-batches (less memory; the same step "
        "unless the model has BatchNorm, which normalises each micro-batch on its own)",
    )
    init_from: str = _opt(
        "",
        "start from these weights: a vit checkpoint or export folder, a timm or .safetensors "
        "state dict, or timm:NAME (timm's pretrained weights of NAME); position embedding and "
        "patch kernel resampled, head replaced when the classes differ",
    )
    grad_clip: float = _opt(1.0, "clip the gradient norm to this; 0 = off")
    label_smoothing: float = _opt(0.1, "label smoothing (also applied to mixup targets)")
    mixup: float = _opt(0.0, "mixup alpha (Zhang et al. 2018); 0 = off")
    cutmix: float = _opt(0.0, "cutmix alpha (Yun et al. 2019); 0 = off")
    drop_path: float = _opt(0.0, "stochastic depth rate of the last block")
    ema: bool = _opt(False, "keep EMA weights (timm ModelEmaV3); validation then uses them")
    ema_decay: float = _opt(0.999, "EMA decay (warmed up from 0, so short runs work)")
    crop_padding: int = _opt(4, "random crop after zero padding by this many pixels; 0 = off")
    hflip: bool = _opt(True, "random horizontal flip")
    tta_hflip: bool = _opt(
        False, "classify: validate on each image and its mirror image, averaging the softmaxes"
    )
    randaugment_ops: int = _opt(0, "RandAugment-style operations per image; 0 = off")
    randaugment_magnitude: float = _opt(9.0, "RandAugment magnitude, 0-10")
    cutout: int = _opt(0, "cutout square side in pixels; 0 = off")
    synthetic_train: int = _opt(5000, "synthetic data: training images")
    synthetic_val: int = _opt(1000, "synthetic data: validation (and test) images")
    amp: Literal["bf16", "fp16", "off"] = _opt("off", "autocast dtype; fp16 adds a GradScaler")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto = cuda when available, else cpu")
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: bool = _opt(True, "channels-last memory format for images and conv weights")
    workers: int = _opt(0, "DataLoader worker processes (--loader cpu)")
    threads: int = _opt(
        0,
        "CPU threads of torch; 0 = $OMP_NUM_THREADS, else half the cores (at most 8): on a busy "
        "2-core machine torch's all-core default took 176 s where one thread took 39 s",
    )
    loader: Literal["auto", "cpu", "device"] = _opt(
        "auto",
        "cpu: DataLoader + albumentations; device: images and the whole augmentation policy on "
        "the training device (vit.data.DeviceLoader); auto: device on CUDA when the data is an "
        "in-memory image set",
    )
    seed: int = _opt(0, "seed of initialisation, data order, augmentation, dropout")
    out_dir: str = _opt("", "run directory; '' = runs/<task>-<data>")
    resume: str = _opt("", "'auto' (out-dir/last.pt when present) or a checkpoint path")
    overwrite: bool = _opt(
        False, "start over: remove the files of a run already in --out-dir (never with --resume)"
    )
    time_limit: float = _opt(
        0.0,
        "minutes: fit warmup+cosine+final eval into this, counting the time before a resume; "
        "0 = off",
    )
    val_every: int = _opt(
        1, "epochs between validations and checkpoints (the last epoch always validates)"
    )
    save_every: int = _opt(0, "also save last.pt every this many steps; 0 = epoch ends only")
    log_every: int = _opt(50, "steps between training scalars")
    rollout_every: int = _opt(
        1, "epochs between attention-rollout images (at validations); 0 = off"
    )
    rollout_images: int = _opt(
        10, "rollout pictures: one validation image per class, for at most this many classes"
    )
    rollout_head_fusion: Literal["mean", "max", "min"] = _opt("mean", "rollout head fusion")
    rollout_discard_ratio: float = _opt(0.0, "rollout: share of lowest weights dropped")
    rollout_per_layer: bool = _opt(False, "rollout: also log each layer's attention")
    rollout_gradient: bool = _opt(
        False, "rollout: also log the class-specific gradient map (a backward pass more)"
    )

    def augment_policy(self) -> AugmentPolicy:
        """The training augmentation these options ask for."""
        from vit.data.transforms import AugmentPolicy

        return AugmentPolicy(
            crop_padding=self.crop_padding,
            hflip=self.hflip,
            randaugment_ops=self.randaugment_ops,
            randaugment_magnitude=self.randaugment_magnitude,
            cutout=self.cutout,
        )


_POSITIVE = (
    "img_size",
    "grad_accum_steps",
    "layer_decay",
    "epochs",
    "batch_size",
    "lr",
    "val_every",
    "log_every",
    "rollout_images",
    "ema_decay",
)
_NON_NEGATIVE = (
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "grad_clip",
    "mixup",
    "cutmix",
    "drop_path",
    "crop_padding",
    "randaugment_ops",
    "randaugment_magnitude",
    "cutout",
    "workers",
    "threads",
    "time_limit",
    "save_every",
    "rollout_every",
    "rollout_discard_ratio",
    "synthetic_train",
    "synthetic_val",
    "seed",
)
# Upper bounds that keep a typo from asking for absurd memory or time before anything is built.
_AT_MOST = {
    "img_size": 4096,
    "seed": 2**32 - 1,  # numpy's legacy seeding takes 32 bits
    "epochs": 1_000_000,
    "batch_size": 1 << 20,
    "synthetic_train": 10_000_000,
    "synthetic_val": 10_000_000,
    "workers": 256,
    "threads": 1024,
}
_BELOW_ONE = ("label_smoothing", "drop_path", "rollout_discard_ratio", "ema_decay", "beta2")


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return tp.__name__


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping like '{{depth: 6}}', got {value!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{key} keys must be names, got {bad[0]!r} ({type(bad[0]).__name__})")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    hint = did_you_mean(key, known, quote=False)
    prog = CliParser.program("python train.py")
    return ConfigError(f"unknown config key {key!r}{hint} (see {prog} --help)")


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate a flat mapping of config keys (YAML keys, underscores) into a :class:`RunConfig`."""
    fields = _fields()
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str):  # YAML reads `1: 2` or `null: 3` as non-string keys
            raise ConfigError(f"config keys must be names, got {key!r} ({type(key).__name__})")
        if key not in fields:
            raise _unknown_key(key, list(fields))
        checked[key] = _check_type(key, value, fields[key])
    cfg = RunConfig(**checked)
    for key, tp in fields.items():  # NaN passes every comparison below, inf most of them
        if tp is float and not math.isfinite(getattr(cfg, key)):
            raise ConfigError(f"{key} must be a finite number, got {getattr(cfg, key)!r}")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)!r}")
    for key in _BELOW_ONE:
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)!r}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    for key, bound in _AT_MOST.items():
        if getattr(cfg, key) > bound:
            raise ConfigError(f"{key} is at most {bound:,}, got {getattr(cfg, key):,}")
    if cfg.layer_decay > 1:
        raise ConfigError(f"layer_decay must be in (0, 1] (1 = off), got {cfg.layer_decay}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (cfg.batch_size // world) % cfg.grad_accum_steps:
        raise ConfigError(
            f"grad_accum_steps {cfg.grad_accum_steps} must divide the batch of each process "
            f"({cfg.batch_size // world})"
        )
    if cfg.init_from.startswith("timm:"):
        if not cfg.init_from.removeprefix("timm:"):
            raise ConfigError(
                "--init-from timm:NAME needs a timm model name, e.g. timm:vit_tiny_patch16_224"
            )
    elif cfg.init_from and not Path(cfg.init_from).exists():
        raise ConfigError(
            f"--init-from {cfg.init_from}: no such file or folder (timm's pretrained weights: "
            f"--init-from timm:NAME)"
        )
    cfg.augment_policy().check(cfg.img_size)  # before any image is decoded
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / f"{cfg.task}-{cfg.data}")
    from vit.engine.tasks import get_task

    get_task(cfg.task).check_config(cfg)
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (validated later by :func:`make_config`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (the shipped ones are in configs/)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            f"config file {path}: keys must be names, got {bad[0]!r} ({type(bad[0]).__name__})"
        )
    return values


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{depth: 6}}', got {text!r}")
    return value


# The option groups of --help, in docs/training.md's order; every field is in exactly one.
GROUPS: dict[str, tuple[str, ...]] = {
    "data": (
        "task", "data", "data_dir", "cache_dir", "val_fraction", "img_size", "synthetic_train",
        "synthetic_val", "loader", "workers",
    ),
    "model": ("model", "model_args", "task_args", "init_from", "drop_path", "layer_decay"),
    "optimisation": (
        "batch_size", "optimizer", "lr", "min_lr", "weight_decay", "beta2", "grad_clip",
        "grad_accum_steps", "label_smoothing", "ema", "ema_decay",
    ),
    "augmentation": (
        "crop_padding", "hflip", "randaugment_ops", "randaugment_magnitude", "cutout", "mixup",
        "cutmix", "tta_hflip",
    ),
    "schedule": ("epochs", "warmup_epochs", "time_limit", "val_every", "seed"),
    "precision and devices": ("amp", "device", "compile", "channels_last", "threads"),
    "run directory": ("out_dir", "resume", "overwrite", "save_every"),
    "logging": (
        "log_every", "rollout_every", "rollout_images", "rollout_head_fusion",
        "rollout_discard_ratio", "rollout_per_layer", "rollout_gradient",
    ),
}  # fmt: skip
# --task and --data choices, spelled out so --help needs no import of the tasks (and torch);
# tests/test_cli.py checks them against the tasks' own lists.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("classify", "caption"),
    "data": ("synthetic", "cifar10", "imagefolder", "shapes", "flickr8k", "coco"),
}
_DATA_OF_TASK = {"classify": "synthetic, cifar10, imagefolder", "caption": "shapes, flickr8k, coco"}

_RECIPE_HELP = """\
Without --config, a measured recipe is chosen by --task, --data and the device (its values,
then your options, over the defaults below):
  synthetic          configs/synthetic.yaml: top-1 1.00 in ~15 s on 2 CPU cores
  cifar10 on a CPU   configs/cifar10_cpu_30min.yaml: ~80% top-1 in 30 min on 2 cores
  cifar10 on a GPU   configs/cifar10_gpu_10min.yaml: ~88% top-1 in 10 min on an H100
  imagefolder        configs/imagefolder_cpu.yaml: a CPU-sized ViT at 64 px, 5 minutes
  caption, shapes    configs/caption_shapes.yaml: BLEU-4 0.945 in 8 min on 2 CPU cores
--config none: the defaults below alone. Results and commands: docs/benchmarks.md."""


def build_parser(prog: str = "python train.py") -> argparse.ArgumentParser:
    """``--config FILE`` plus one option per :class:`RunConfig` field (``--data-dir``, ...),
    grouped as :data:`GROUPS`."""
    p = CliParser(
        prog=prog,
        usage="%(prog)s [--config FILE|auto|none] [--data NAME] [--OPTION VALUE ...]",
        description="Train a Vision Transformer. Options override the --config file.",
        epilog=_RECIPE_HELP,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config",
        metavar="FILE|auto|none",
        help="YAML file of config keys (see configs/); auto: the measured recipe for --data and "
        "the device (below); none: the built-in defaults (default: auto)",
    )
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    hints = _fields()
    for title, names in GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            f, tp = fields[name], hints[name]
            flag = "--" + name.replace("_", "-")
            text = f.metadata["help"]
            if name == "data":
                text += f" ({'; '.join(f'{t}: {d}' for t, d in _DATA_OF_TASK.items())})"
            kw: dict[str, Any] = {"help": f"{text} (default: {_shown(f.default)})"}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is Literal:
                kw["choices"] = typing.get_args(tp)
            elif typing.get_origin(tp) is dict:
                kw["type"], kw["help"] = _yaml_mapping, text
            else:
                kw["type"] = tp
            if name in CHOICES:  # shown; checked by the task, whose message names the fix
                kw["metavar"] = "{" + ",".join(CHOICES[name]) + "}"
            group.add_argument(flag, dest=name, **kw)
    return p


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if value == "" else str(value)


def parse_args(argv: list[str] | None, notes: list[str] | None = None) -> RunConfig:
    """Command line (and its ``--config`` file, or the recipe :func:`pick_recipe` chooses
    without one) → validated :class:`RunConfig`. ``notes`` receives the lines to show the user:
    which recipe was chosen, and a time limit that lifts the epoch cap.

    A ``--time-limit`` on the command line without ``--epochs`` lifts the cap of the config's
    ``epochs`` (``epochs`` becomes its upper bound): the schedule then fills the limit.
    """
    parser = build_parser(prog=CliParser.program("python train.py"))
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        opts = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        hint = did_you_mean(bad.split("=")[0], opts, quote=False)
        raise ConfigError(f"unknown option {bad!r}{hint} (see {parser.prog} --help)")
    cli = vars(ns)
    notes = notes if notes is not None else []
    source = cli.pop("config", "auto")
    if source == "none":
        values: dict[str, Any] = {}
    elif source == "auto":
        values = {}
        recipe = pick_recipe(
            cli.get("task", "classify"), cli.get("data", "synthetic"), cli.get("device", "auto")
        )
        if recipe is not None:
            path, line = recipe
            values = load_config(path)
            notes.append(f"{line}: {_relative(path)} (--config FILE or --config none to choose)")
    else:
        values = load_config(source)
    if "time_limit" in cli and "epochs" not in cli and cli["time_limit"] > 0:
        cli["epochs"] = _AT_MOST["epochs"]
        notes.append(
            f"--time-limit {cli['time_limit']:g} without --epochs: the schedule fills the time "
            f"limit (pass --epochs N to cap it)"
        )
    return make_config({**values, **cli})


# (task, data, device or None for any) → (recipe file under configs/, the line naming it)
RECIPES: dict[tuple[str, str, str | None], tuple[str, str]] = {
    ("classify", "synthetic", None): ("synthetic.yaml", "{dev}, synthetic data: top-1 1.00, ~15 s"),
    ("classify", "cifar10", "cpu"): ("cifar10_cpu_30min.yaml", "CPU, CIFAR-10: ~80% in 30 min"),
    ("classify", "cifar10", "cuda"): ("cifar10_gpu_10min.yaml", "GPU, CIFAR-10: ~88% in 10 min"),
    ("classify", "imagefolder", None): (
        "imagefolder_cpu.yaml", "{dev}, image folder: a CPU-sized ViT at 64 px, 5 min"
    ),
    ("caption", "shapes", None): ("caption_shapes.yaml", "{dev}, shapes captions: BLEU-4 0.945"),
}  # fmt: skip
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def pick_recipe(task: str, data: str, device: str) -> tuple[Path, str] | None:
    """The measured recipe for ``task`` on ``data`` and ``device`` (``auto``: CUDA when present):
    ``(config file, a line naming it)``, or ``None`` when there is none (or the package was
    installed without its ``configs/`` folder)."""
    if not any(t == task and d == data for t, d, _ in RECIPES):
        return None
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    found = RECIPES.get((task, data, device)) or RECIPES.get((task, data, None))
    if found is None or not (CONFIGS_DIR / found[0]).is_file():
        return None
    name, line = found
    return CONFIGS_DIR / name, line.format(dev="GPU" if device == "cuda" else "CPU")


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_threads(threads: int, local_world_size: int = 1) -> int:
    """``--threads``: ``0`` = ``OMP_NUM_THREADS`` when set, else half the CPU cores this process
    may use (at most 8, at least 1), shared by the processes of one machine under DDP. torch's
    default (every core) is the slowest choice on a busy machine: the quick start took 176 s with
    it and 39 s with one thread on a 2-core machine running other jobs (docs/benchmarks.md)."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:  # the user's (or torchrun's) choice for this process
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // 2) // max(1, local_world_size))


# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but no CUDA device is available; use "
            "--device cpu or --device auto"
        )
    return torch.device(name)
