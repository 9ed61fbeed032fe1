"""vit.train in-process: config validation, schedule, param groups, AMP/device paths, NaN guard,
exact resume after SIGTERM, checkpoints, the rollout hook, evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, flags

from vit import evaluate
from vit.engine.checkpoint import CheckpointError, load_checkpoint
from vit.engine.config import ConfigError, make_config, parse_args, resolve_device
from vit.engine.optim import Muon
from vit.engine.schedule import lr_at
from vit.engine.trainer import Diverged, Trainer
from vit.train import main


def tiny(tmp_path: Path, **overrides: Any):
    return make_config({**TINY, "out_dir": str(tmp_path / "run"), **overrides})


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def test_cli_overrides_config_file_and_saves_resolved_config(tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nepochs: 7\nbatch_size: 64\nmodel_args: {depth: 3}\n")
    cfg = parse_args(["--config", str(cfg_file), "--lr", "0.01", "--no-hflip"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.hflip) == (0.01, 7, 64, False)
    assert cfg.model_args == {"depth": 3} and cfg.out_dir == str(Path("runs/classify-synthetic"))
    out = tmp_path / "run"
    assert main([*flags({**TINY, "out_dir": str(out)}), "--lr", "0.002"]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["model_args"] == TINY["model_args"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lrr", "0.1"], "unknown option '--lrr'; did you mean --lr"),
        (["--lr", "-1"], "lr must be positive"),
        (["--lr", "abc"], "invalid float value: 'abc'"),
        (["--amp", "bf32"], "invalid choice: 'bf32'"),
        (["--data", "cifar100"], "unknown dataset 'cifar100' for task 'classify'"),
        (["--task", "segment"], "unknown task 'segment'"),
        (["--label-smoothing", "1.5"], "label_smoothing must be in [0, 1)"),
        (["--model", "vit_tiny"], "cannot build model 'vit_tiny'"),
        (["--model-args", "{depthh: 3}"], "unknown model option(s): 'depthh'"),
        (["--model-args", "[1]"], "expected a mapping"),
        (["--config", "nope.yaml"], "config file nope.yaml not found"),
        (["--device", "cuda"], "no CUDA device is available"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tmp_path: Path, capsys) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base = flags({**TINY, "out_dir": str(tmp_path / "run")})
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_file_keys_and_types_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("batch_sise: 3\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'batch_sise'; did you mean batch_size"
    ):
        parse_args(["--config", str(f)])
    f.write_text("epochs: 2.5\n")
    with pytest.raises(ConfigError, match=r"epochs must be int, got 2.5"):
        parse_args(["--config", str(f)])
    f.write_text("ema: yes please\n")
    with pytest.raises(ConfigError, match="ema must be bool"):
        parse_args(["--config", str(f)])
    f.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(f)])


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "total_steps": 110}
    lrs = [lr_at(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) == lrs[119]


def test_engine_routes_matrices_to_muon(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, epochs=4, optimizer="muon", lr=0.003))
    names = {id(p): n for n, p in t.model.named_parameters()}
    muon = {
        names[id(p)] for g in t.optimizer.param_groups for p in g["params"] if Muon.uses_muon(g, p)
    }
    assert muon == {
        f"blocks.{i}.{w}.weight"
        for i in range(2)
        for w in ("attn.to_qkv", "attn.to_out", "mlp.fc1", "mlp.fc2")
    }
    first = t.validate()["loss"]
    assert t.fit()["loss"] < first - 0.1  # 2.30 -> 2.13
    assert any("momentum_buffer" in s for s in t.optimizer.state.values())


def test_param_groups_exempt_norms_biases_and_embeddings(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, weight_decay=0.1))
    names = {id(p): n for n, p in t.model.named_parameters()}
    decay = {
        g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in t.optimizer.param_groups
    }
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= decay[0.0]
    assert "blocks.0.attn.to_qkv.weight" in decay[0.1] and "head.weight" in decay[0.1]
    assert not any("norm" in n or n.endswith("bias") for n in decay[0.1])


# ----------------------------------------------------------------------------------------------
# Device and AMP
# ----------------------------------------------------------------------------------------------
def test_device_selection() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, amp="bf16"))
    seen = []
    t.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = next(iter(t.train_loader))
    before = t.model.head.weight.detach().clone()
    stats = t.train_step(batch)
    assert seen == [torch.bfloat16] and math.isfinite(stats["loss"])
    assert t.model.head.weight.dtype == torch.float32  # weights stay fp32
    assert not torch.equal(before, t.model.head.weight)
    assert not t.scaler.is_enabled()


def test_fp16_grad_scaler_skips_steps_with_inf_gradients(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, amp="fp16", grad_clip=0.0, ema=True))
    assert t.scaler.is_enabled()
    batch = next(iter(t.train_loader))
    weights = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    ema = {n: p.detach().clone() for n, p in t.ema.module.named_parameters()}
    scale = t.scaler.get_scale()
    hook = t.model.head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    stats = t.train_step(batch)
    hook.remove()
    assert stats["skipped"] == 1.0 and t.progress.skipped_steps == 1
    assert t.scaler.get_scale() == scale / 2
    assert all(torch.equal(weights[n], p) for n, p in t.model.named_parameters())
    assert all(torch.equal(ema[n], p) for n, p in t.ema.module.named_parameters())
    stats = t.train_step(batch)  # a finite step goes through
    assert stats["skipped"] == 0.0
    assert not torch.equal(weights["head.weight"], t.model.head.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_training_matches_cpu(tmp_path: Path) -> None:
    """An epoch on CUDA (fused AdamW, device loader, losses checked lazily) equals the CPU's."""
    runs = {}
    for device in ("cpu", "cuda"):
        t = Trainer(tiny(tmp_path / device, device=device, loader="device", ema=True))
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides for the comparison
        t.fit()
        runs[device] = {
            **t.model.state_dict(),
            **{f"ema.{k}": v for k, v in t.ema.module.state_dict().items()},
        }
    assert runs["cuda"].keys() == runs["cpu"].keys()
    for k, v in runs["cpu"].items():
        torch.testing.assert_close(
            runs["cuda"][k].cpu(), v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_channels_last_gives_the_same_logits(tmp_path: Path) -> None:
    a = Trainer(tiny(tmp_path, channels_last=True))
    b = Trainer(tiny(tmp_path / "b", channels_last=False))
    assert a.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    batch = next(iter(a.train_loader))
    xa, _ = a.task.prepare_batch(batch, a.device)
    xb, _ = b.task.prepare_batch(batch, b.device)
    assert xa.is_contiguous(memory_format=torch.channels_last) and xb.is_contiguous()
    torch.testing.assert_close(a.model(xa), b.model(xb), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Failure and interruption
# ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from vit.engine.classification import ClassificationTask

    real = ClassificationTask.loss

    def loss(self, model, batch, step):
        out = real(self, model, batch, step)
        return out * math.nan if step == 5 else out

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    out = tmp_path / "run"
    assert main([*flags({**TINY, "out_dir": str(out)}), "--save-every", "2"]) == 1
    assert "the loss became nan at step 5" in capsys.readouterr().err
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    with pytest.raises(Diverged):
        t = Trainer(tiny(tmp_path / "again"))
        t.fit()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {**ckpt["model"], **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigterm_saves_and_resume_is_exact(
    tmp_path: Path, sigterm_at_step, capsys, optimizer: str
) -> None:
    """Mixup/cutmix, randaugment, drop path, patch dropout and EMA all on: every source of
    randomness; with either optimizer's state."""
    from vit.engine.classification import ClassificationTask

    recipe = {
        **TINY,
        "epochs": 2,
        "mixup": 0.8,
        "cutmix": 1.0,
        "randaugment_ops": 2,
        "cutout": 4,
        "drop_path": 0.2,
        "model_args": {**TINY["model_args"], "patch_drop_rate": 0.5},
        "ema": True,
        "ema_decay": 0.9,
        "optimizer": optimizer,
    }
    assert main(flags({**recipe, "out_dir": str(tmp_path / "a")})) == 0
    disarm = sigterm_at_step(ClassificationTask, 11)  # mid-epoch (8 steps per epoch)
    b = flags({**recipe, "out_dir": str(tmp_path / "b")})
    assert main(b) == 128 + signal.SIGTERM
    assert "SIGTERM at step 12" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "b" / "last.pt")["progress"]["batch_in_epoch"] == 4
    disarm()
    assert main([*b, "--resume", "auto"]) == 0
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    # The resumed run's log drops what the killed run wrote after its checkpoint: no duplicates.
    assert _log_entries(tmp_path / "b") == _log_entries(tmp_path / "a")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_sigterm_resume_is_exact(tmp_path: Path, sigterm_at_step, capsys, amp: str) -> None:
    """On CUDA, with autocast (fp16: the GradScaler's state too), the device loader and every
    source of randomness, a SIGTERM + --resume auto run ends where an uninterrupted run ends: as
    close as two uninterrupted runs are to each other (CUDA kernels with atomics are not
    bitwise reproducible)."""
    from vit.engine.classification import ClassificationTask

    recipe = {
        **TINY,
        "epochs": 2,
        "device": "cuda",
        "loader": "device",
        "amp": amp,
        "mixup": 0.8,
        "cutmix": 1.0,
        "randaugment_ops": 2,
        "drop_path": 0.2,
        "model_args": {**TINY["model_args"], "patch_drop_rate": 0.5},
        "ema": True,
        "ema_decay": 0.9,
    }
    for run in ("a", "a2"):
        assert main(flags({**recipe, "out_dir": str(tmp_path / run)})) == 0
    disarm = sigterm_at_step(ClassificationTask, 11)
    b = flags({**recipe, "out_dir": str(tmp_path / "b")})
    assert main(b) == 128 + signal.SIGTERM
    disarm()
    assert main([*b, "--resume", "auto"]) == 0
    wa, wa2, wb = (_weights(tmp_path / r / "last.pt") for r in ("a", "a2", "b"))
    noise = max((wa[k] - wa2[k]).abs().max().item() for k in wa)
    resumed = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"cuda {amp}: resumed vs uninterrupted {resumed:.2e}, run to run {noise:.2e}")
    assert resumed <= max(1e-6, 2 * noise)
    assert _log_entries(tmp_path / "b") == _log_entries(tmp_path / "a")


def _log_entries(run: Path) -> list[tuple[str, int]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"]) for r in map(json.loads, lines)]


# ----------------------------------------------------------------------------------------------
# Checkpoints and run directory
# ----------------------------------------------------------------------------------------------
def test_run_directory_and_checkpoint_contents(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, epochs=2, save_every=3))
    metrics = t.fit()
    out = Path(t.cfg.out_dir)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (out / name).is_file()
    assert list(out.glob("events.out.tfevents.*"))
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain data only
    assert ckpt["progress"]["step"] == 16 and ckpt["task_state"]["classes"][0] == "disk"
    assert ckpt["metrics"] == metrics and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    kinds = [kind for kind, _ in _log_entries(out)]
    assert kinds.count("val") == 2 and kinds.count("train") == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= tags
    assert {"val/loss", "val/top1"} <= tags


def test_resume_refusals(tmp_path: Path, capsys) -> None:
    base = {**TINY, "out_dir": str(tmp_path / "run")}
    assert main(flags(base)) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*flags(base), "--resume", "auto"]) == 0  # finished: nothing left to do
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["top1"] == done["top1"] and again["steps"] == done["steps"]
    assert main(flags(base)) == 2
    assert "already holds a run" in capsys.readouterr().err
    wider = {**base, "model_args": {"embed_dim": 64, "depth": 2, "num_heads": 2}}
    assert main([*flags(wider), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "holds another architecture" in err and "Traceback" not in err
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    assert (
        main(
            [
                *flags({**base, "out_dir": str(tmp_path / "x")}),
                "--resume",
                str(tmp_path / "junk.pt"),
            ]
        )
        == 2
    )
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(tiny(tmp_path, resume=str(tmp_path / "missing.pt")))


def test_refuses_pickles_that_run_code(tmp_path: Path, capsys) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"format": "vit.train/1", "x": Evil()}, tmp_path / "evil.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "evil.pt")]) == 2
    captured = capsys.readouterr()
    assert "would run code" in captured.err and "should-not-run" not in captured.out


def test_mirror_test_time_augmentation_averages_the_two_softmaxes(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, epochs=2, tta_hflip=True))
    t.fit()
    model = t.eval_model().eval()
    correct, nll, n = 0, 0.0, 0
    with torch.no_grad():
        for batch in t.val_loader:
            x, y = t.task.prepare_batch(batch, t.device)
            probs = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
            correct += (probs.argmax(-1) == y).sum().item()
            nll -= probs[torch.arange(len(y)), y].log().sum().item()
            n += len(y)
    metrics = t.validate()
    assert metrics["top1"] == correct / n and metrics["loss"] == pytest.approx(nll / n, rel=1e-5)
    plain = Trainer(dataclasses.replace(t.cfg, tta_hflip=False, resume="auto"))
    assert plain.validate()["loss"] != pytest.approx(metrics["loss"])  # the same weights
    # vit.evaluate follows the run's setting, or the flag.
    last = str(Path(t.cfg.out_dir) / "last.pt")
    assert evaluate.evaluate_checkpoint(last) == pytest.approx(metrics)
    assert evaluate.evaluate_checkpoint(last, tta_hflip=False) == pytest.approx(plain.validate())


def test_evaluate_matches_training_metrics(tmp_path: Path, capsys) -> None:
    cfg = tiny(tmp_path, epochs=2, ema=True)
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(Path(cfg.out_dir) / "last.pt")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The JSON line also holds the confusion matrix, the task's non-scalar record.
    assert line.pop("confusion") == trainer.task.records()["confusion"]
    assert line == pytest.approx(metrics)
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(Path(cfg.out_dir) / "last.pt"),
                "--split",
                "test",
                "--data",
                "cifar10",
            ]
        )
        == 2
    )  # CIFAR-10 is not in ./data here
    assert "CIFAR-10" in capsys.readouterr().err


def test_time_limit_fits_the_schedule(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, epochs=100, time_limit=1.0))
    t.progress.step = 12
    t._fit_schedule(step_time=0.1)  # 60 s budget at 0.1 s/step, 8 steps per epoch
    p = t.progress
    assert 300 < p.total_steps < 580 and p.warmup_steps <= p.total_steps // 5
    t._fit_schedule(step_time=1e-6)
    assert p.total_steps == 100 * 8  # capped by --epochs


def test_time_limit_refits_the_schedule_at_every_epoch_end(tmp_path: Path) -> None:
    # Not only after validations: a machine that slows down midway must still end on time.
    t = Trainer(tiny(tmp_path, epochs=5, val_every=2, time_limit=10.0))
    fits = []
    real = t._fit_schedule

    def fit(step_time: float, epoch_end: float | None = None) -> None:
        fits.append((t.progress.step, step_time > 0, epoch_end))
        real(step_time, epoch_end)

    t._fit_schedule = fit
    t.fit()
    # 8 steps per epoch; the epoch end at step 8 replaces the 12-step fit; none past 90% of 40.
    assert [(step, ok) for step, ok, _ in fits] == [(8, True), (16, True), (24, True), (32, True)]
    ends = [e for *_, e in fits]
    assert ends[0] is None and ends[1] == ends[2] > 0 and ends[3] > 0  # measured at epochs 2, 4
    assert t.progress.total_steps == 40


def test_val_every_validates_and_saves_every_n_epochs_and_at_the_end(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, epochs=5, val_every=2)
    t = Trainer(cfg)
    saves = []
    real = t.save
    t.save = lambda name="last.pt": saves.append((t.progress.epoch, name)) or real(name)
    t.fit()
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in lines if '"val"' in r] == [2, 4, 5]
    assert [e for e, name in saves if name == "last.pt"] == [2, 4, 5]


def test_rollout_hook_contract(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def log_rollout(writer, model, images, display, step, **kw):
        calls.append((writer, model, images, display, step, kw))

    monkeypatch.setitem(
        sys.modules, "vit.rollout.tensorboard", types.SimpleNamespace(log_rollout=log_rollout)
    )
    t = Trainer(
        tiny(
            tmp_path,
            epochs=2,
            ema=True,
            rollout_every=1,
            rollout_images=5,
            rollout_head_fusion="max",
            rollout_per_layer=True,
        )
    )
    t.fit()
    assert [c[4] for c in calls] == [0, 8, 16]  # before training, then at each validation
    writer, model, images, display, _, kw = calls[1]
    assert model is t.ema.module and writer is not None
    assert images.shape == display.shape == (5, 3, 16, 16) and images.device == t.device
    assert display.dtype == torch.float32 and display.min() >= 0 and display.max() <= 1
    assert images.mean().abs() < 1.5 and not torch.equal(images, display)  # normalised
    classes = t.task.state["classes"]
    assert kw == {
        "labels": [0, 1, 2, 3, 4],  # the first image of each class, up to --rollout-images
        "classes": classes,
        "head_fusion": "max",
        "discard_ratio": 0.0,
        "per_layer": True,
        "gradient": False,
    }
    record = json.loads((Path(t.cfg.out_dir) / "rollout_images.json").read_text())
    assert len(record["indices"]) == 5 and torch.equal(calls[1][3], display)
    assert [int(t.val_set[i][1]) for i in record["indices"]] == [0, 1, 2, 3, 4]


def _png_folder(root: Path, n: int, classes=("a", "b")) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0 if c == "a" else 200, 0)).save(
                root / c / f"{i}.png"
            )


def test_imagefolder_validation_split_rules(tmp_path: Path) -> None:
    from vit.data import DataError
    from vit.engine.classification import ClassificationTask

    root = tmp_path / "imgs"
    _png_folder(root / "train", 10)
    cfg = tiny(
        tmp_path,
        data="imagefolder",
        data_dir=str(root),
        img_size=8,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    fresh_val = ClassificationTask(cfg).build_dataset("val")  # as vit.evaluate builds it
    task = ClassificationTask(cfg)
    train, val = task.build_dataset("train"), task.build_dataset("val")

    def images(ds):
        return ds.gather(torch.arange(len(ds)))

    assert (len(train), len(val)) == (16, 4) and torch.equal(images(fresh_val), images(val))
    pixels = {tuple(im.flatten()[:3].tolist()) for im in images(train)}
    assert not pixels & {tuple(im.flatten()[:3].tolist()) for im in images(val)}
    with pytest.raises(DataError, match="no test split"):
        task.build_dataset("test")
    _png_folder(root / "test", 3)  # a held-out folder becomes the validation set
    task = ClassificationTask(cfg)
    assert len(task.build_dataset("train")) == 20 and len(task.build_dataset("val")) == 6
    _png_folder(root / "val", 2, classes=("a", "c"))
    with pytest.raises(DataError, match="same class folders"):
        ClassificationTask(cfg).build_dataset("val")


def test_compiled_state_dict_names_load(tmp_path: Path) -> None:
    """Checkpoints hold plain names; ones saved from a compiled module (``_orig_mod.``) load too."""
    from vit.engine.checkpoint import load_model, save_checkpoint

    cfg = tiny(tmp_path)
    Trainer(cfg).fit()
    ckpt = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    plain = ckpt["model"]
    ckpt["model"] = {f"_orig_mod.{k}": v for k, v in plain.items()}
    ckpt["ema"] = None
    save_checkpoint(ckpt, tmp_path / "compiled.pt")
    model, _ = load_model(tmp_path / "compiled.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())


@pytest.mark.slow
def test_compile_trains_and_saves_plain_names(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, compile=True)
    metrics = Trainer(cfg).fit()
    ckpt = load_checkpoint(Path(cfg.out_dir) / "last.pt")
    assert math.isfinite(metrics["loss"]) and not any("_orig_mod" in k for k in ckpt["model"])


def test_mixup_keeps_label_smoothing_and_is_seeded_by_step(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, mixup=0.8, cutmix=1.0, label_smoothing=0.2))
    mixup = t.task._mixup
    assert mixup.label_smoothing == 0.2 and mixup.num_classes == 10
    batch = t.task.prepare_batch(next(iter(t.train_loader)), t.device)
    t.model.eval()  # no dropout: the loss depends only on the mixing
    torch.nn.init.normal_(t.model.head.weight, std=0.5)  # a zero head predicts uniformly
    x, y = batch
    with torch.no_grad():  # timm's Mixup mixes in place: a fresh copy of the batch per call
        losses = [t.task.loss(t.model, (x.clone(), y), step).item() for step in (3, 3, 4)]
    assert losses[0] == losses[1] != losses[2]
