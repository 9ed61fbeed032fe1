"""The Compact Convolutional Transformer options of ViTConfig (convolutional tokenizer, sequence
pooling), the cct_* variants, rollout on them and a short training run."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from vit.layers.conv_attention import CBAM
from vit.layers.conv_stem import ConvTokenizer, SequencePool
from vit.models import ViTConfig, create_model, list_models, num_params
from vit.rollout import (
    attention_rollout,
    capture_attention,
    rollout_maps,
    rollout_to_maps,
    tokenizer_attention_maps,
)
from vit.rollout.tensorboard import log_rollout

# 16-px images through two tokenizer stages (16 → 8 → 4): a 4x4 grid of 16 tokens.
TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, conv_channels=32)

# Hassani et al. 2021, Tab. 1 / the authors' README, 10 classes.
PAPER_PARAMS = {
    "cct_2_3x2_32": 0.284e6,
    "cct_4_3x2_32": 0.482e6,
    "cct_6_3x1_32_sine": 3.168e6,  # the README's CCT-6/3x1 count is that of the sine variant
    "cct_6_3x2_32": 3.327e6,
    "cct_7_3x1_32": 3.760e6,
    "cct_7_3x2_32": 3.853e6,
}


def tiny_cct(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return create_model("cct_2_3x2_32", **{**TINY, **overrides}).eval()


def test_parameter_counts_match_the_paper() -> None:
    assert {n.removesuffix("_sine") for n in list_models("cct_*")} == {
        n.removesuffix("_sine") for n in PAPER_PARAMS
    }
    with torch.device("meta"):
        counts = {name: num_params(create_model(name)) for name in PAPER_PARAMS}
    for name, paper in PAPER_PARAMS.items():
        assert abs(counts[name] - paper) / paper < 0.01, (name, counts[name], paper)
    assert counts["cct_7_3x1_32"] == 3_760_139
    assert counts["cct_2_3x2_32"] == 283_723


def test_cct_7_3x1_geometry_and_options() -> None:
    with torch.device("meta"):
        model = create_model("cct_7_3x1_32")
    cfg = model.config
    assert (cfg.tokenizer, cfg.pool, cfg.class_token, cfg.qkv_bias) == ("conv", "seq", False, False)
    assert model.grid_size == (16, 16) and cfg.grid_size == 16
    assert isinstance(model.patch_embed, ConvTokenizer) and isinstance(model.seq_pool, SequencePool)
    assert model.pos_embed.shape == (1, 256, 256) and model.cls_token is None
    assert model.patch_embed.grid_size(32) == model.grid_size
    assert model.blocks[0].attn.attn_drop == 0.1 and model.blocks[-1].drop_path1.p == pytest.approx(
        0.1
    )
    with torch.device("meta"):
        hybrid = create_model("cct_7_3x1_32", conv_attention="cbam")
    assert isinstance(hybrid.patch_embed.conv_layers[0][3], CBAM)


@pytest.mark.parametrize(
    ("pool", "prefix"), [("cls", 1), ("mean", 0), ("seq", 0)], ids=["cls", "mean", "seq"]
)
def test_forward_shapes_and_stages_for_each_pool(pool: str, prefix: int) -> None:
    model = tiny_cct(pool=pool, num_classes=7)
    x = torch.randn(3, 3, 16, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, prefix + 16, 32)
    logits = model(x)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(model.forward_head(tokens), logits, atol=1e-5, rtol=1e-5)
    pooled = model.forward_head(tokens, pre_logits=True)
    expected = {
        "cls": lambda t: t[:, 0],
        "mean": lambda t: t.mean(1),
        "seq": lambda t: model.seq_pool(t),
    }[pool](tokens)
    torch.testing.assert_close(pooled, expected)
    # The pipeline written out: tokenizer, [class token], positions, blocks, final norm.
    h = model.patch_embed(x)
    if prefix:
        h = torch.cat([model.cls_token.expand(3, -1, -1), h], dim=1)
    h = model.blocks(h + model.pos_embed)
    torch.testing.assert_close(tokens, model.norm(h))
    # The parameters it has (timm's model tests refuse an entry that names none).
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} - (
        set() if prefix else {"cls_token"}
    )


def test_seq_pooling_is_a_softmax_weighted_sum() -> None:
    model = tiny_cct()
    tokens = model.forward_features(torch.randn(2, 3, 16, 16))
    pooled, weights = model.seq_pool.forward_with_weights(tokens)
    scores = tokens @ model.seq_pool.attention_pool.weight[0] + model.seq_pool.attention_pool.bias
    torch.testing.assert_close(weights, scores.softmax(dim=-1))
    torch.testing.assert_close(pooled, torch.einsum("bn,bnd->bd", weights, tokens))


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(conv_attention="cbam"), dict(pool="cls"), dict(conv_layers=1, pool="mean")],
    ids=["seq", "cbam", "cls", "1stage-mean"],
)
def test_every_parameter_gets_a_gradient(overrides: dict) -> None:
    model = tiny_cct(**overrides).train()
    nn.init.normal_(model.head.weight, std=0.1)  # a zero head would pass no gradient back
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if name == "seq_pool.attention_pool.bias":
            # A shift of every score leaves the softmax unchanged: its gradient is exactly 0. CCT
            # has the parameter (it counts in the paper's 3.76M), so it is kept.
            assert p.grad.abs().max() < 1e-6
            continue
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_state_dict_round_trip_and_keys() -> None:
    model = tiny_cct(conv_attention="cbam")
    nn.init.normal_(model.head.weight)  # a zero head gives every model the same logits
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "patch_embed.conv_layers.0.0.weight" in state  # CCT's tokenizer key, under patch_embed
    assert "seq_pool.attention_pool.weight" in state and "cls_token" not in state
    torch.manual_seed(1)
    fresh = create_model("cct_2_3x2_32", **TINY, conv_attention="cbam").eval()
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(fresh(x), model(x))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), model(x))


def test_plain_vit_keys_are_unchanged() -> None:
    model = create_model("vit_tiny_patch4_32", depth=1)
    keys = set(model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"} <= keys
    assert not any(k.startswith("seq_pool") for k in keys) and model.seq_pool is None


def test_input_checks_and_bad_options() -> None:
    model = tiny_cct()
    with pytest.raises(ValueError, match="16x16 images, got 32x32"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"3 input channels, got 1"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"conv_attention 'cbm'.*did you mean 'cbam'"):
        ViTConfig(tokenizer="conv", conv_attention="cbm")
    with pytest.raises(ValueError, match="conv_attention needs tokenizer='conv'"):
        ViTConfig(conv_attention="cbam")
    with pytest.raises(ValueError, match="tokenizer must be 'patch' or 'conv'"):
        ViTConfig(tokenizer="convolution")
    with pytest.raises(ValueError, match="pool must be one of 'cls', 'mean', 'seq', 'none'"):
        ViTConfig(pool="max")
    # The conv tokenizer takes any image size; the patch size no longer has to divide it.
    assert ViTConfig(tokenizer="conv", img_size=30, conv_layers=2, pool="seq").grid_size == 8


@pytest.mark.parametrize("pos_embed", ["sinusoidal", "sincos2d"])
def test_fixed_positions_fit_the_token_grid(pos_embed: str) -> None:
    model = tiny_cct(pos_embed=pos_embed)
    assert "pos_embed" not in model.state_dict() and model.pos_embed.shape == (1, 16, 32)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def hand_rollout_map(attentions, pool_weights) -> np.ndarray:
    """Abnar & Zuidema (2020) with sequence pooling as the last mixing step, written plainly."""
    batch, _, n, _ = attentions[0].shape
    out = []
    for b in range(batch):
        joint = np.eye(n)
        for a in attentions:
            fused = a[b].double().numpy().mean(axis=0) + np.eye(n)
            fused /= fused.sum(axis=1, keepdims=True)
            joint = fused @ joint
        relevance = pool_weights[b].double().numpy() @ joint  # Σ_i w_i · joint[i, :]
        out.append((relevance - relevance.min()) / (relevance.max() - relevance.min()))
    return np.stack(out).reshape(batch, 4, 4)


def test_rollout_on_cct_equals_a_hand_computation_with_the_pool_weights() -> None:
    model = tiny_cct()
    nn.init.normal_(model.seq_pool.attention_pool.weight, std=1.0)  # clearly non-uniform weights
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), capture_attention(model) as attentions:
        logits = model(x)
    torch.testing.assert_close(logits, model(x))  # recording changes nothing
    assert [tuple(a.shape) for a in attentions] == [(2, 2, 16, 16)] * 2  # no class token
    assert [tuple(w.shape) for w in attentions.pool_weights] == [(2, 16)]
    assert model.seq_pool.recorder is None  # switched off again
    weights = attentions.pool_weights[0]
    _, expected_weights = model.seq_pool.forward_with_weights(model.forward_features(x))
    torch.testing.assert_close(weights, expected_weights)

    maps = rollout_maps(model, x, image_size=model.grid_size)  # on the 4x4 token grid
    assert maps.shape == (2, 4, 4)
    expected = hand_rollout_map(list(attentions), weights)
    np.testing.assert_allclose(maps.double().numpy(), expected, atol=1e-5)
    # The pooling weights matter: the mean of the rows would give another map.
    mean_map = rollout_to_maps(
        attention_rollout(attentions, class_token=False), 4, class_token=False
    )
    assert not torch.allclose(maps, mean_map, atol=1e-3)


def test_seq_map_follows_the_pool_weights() -> None:
    # With no token mixing (identity joint), the map is the pooling weights on the grid.
    joint = torch.eye(16).expand(1, 16, 16)
    weights = torch.zeros(1, 16)
    weights[0, 5] = 1.0
    maps = rollout_to_maps(joint, (4, 4), class_token=False, pool="seq", pool_weights=weights)
    assert maps[0].argmax().item() == 5 and maps[0, 1, 1] == 1.0 and maps.sum() == 1.0
    with pytest.raises(ValueError, match=r"pool='seq' needs the sequence pooling's weights"):
        rollout_to_maps(joint, (4, 4), class_token=False, pool="seq")


def test_tokenizer_attention_map_is_cbams_spatial_map_on_the_token_grid() -> None:
    model = tiny_cct(conv_attention="cbam")
    x = torch.randn(2, 3, 16, 16)
    maps = tokenizer_attention_maps(model, x)
    assert maps.shape == (2, *model.grid_size)
    stages = model.patch_embed.conv_layers
    with torch.no_grad():
        h = stages[1][:3](stages[0](x))  # the last stage's conv → ReLU → max-pool
        torch.testing.assert_close(maps, stages[1][3].spatial_attention(h)[:, 0])
        first = tokenizer_attention_maps(model, x, stage=0)
        torch.testing.assert_close(first, stages[0][3].spatial_attention(stages[0][:3](x))[:, 0])
    assert first.shape == (2, 8, 8)
    assert all(m.recorder is None for m in model.modules() if isinstance(m, CBAM))
    with pytest.raises(ValueError, match="conv_attention='cbam'"):
        tokenizer_attention_maps(tiny_cct(), x)
    with pytest.raises(ValueError, match="stage must be in"):
        tokenizer_attention_maps(model, x, stage=2)


class _Writer:
    def __init__(self) -> None:
        self.images: dict[str, tuple[torch.Tensor, int]] = {}

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images[tag] = (img, step)


def test_log_rollout_adds_the_tokenizer_panel() -> None:
    from vit.rollout.render import layout_size

    model = tiny_cct(conv_attention="cbam").train()
    writer = _Writer()
    log_rollout(writer, model, torch.randn(3, 3, 16, 16), torch.rand(3, 3, 16, 16), 5)
    assert model.training
    assert set(writer.images) == {"rollout/maps", "rollout/tokenizer"}
    maps, tokenizer = writer.images["rollout/maps"][0], writer.images["rollout/tokenizer"][0]
    assert not np.array_equal(maps, tokenizer)
    for picture, step in writer.images.values():
        assert step == 5 and picture.shape == (*layout_size(3, 3, 128)[::-1], 3)
    plain = _Writer()
    log_rollout(plain, tiny_cct(), torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16), 1)
    assert set(plain.images) == {"rollout/maps"}


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
def test_short_training_run_and_rollout_cli(tmp_path) -> None:
    from PIL import Image

    from vit.rollout.__main__ import main as rollout_main
    from vit.train import main

    out = tmp_path / "run"
    args = ["--data", "synthetic", "--model", "cct_2_3x2_32", "--img-size", "16"]
    args += ["--synthetic-train", "64", "--synthetic-val", "16", "--epochs", "1"]
    args += ["--batch-size", "32", "--device", "cpu", "--threads", "1", "--rollout-every", "0"]
    args += ["--model-args", "{conv_attention: cbam, conv_channels: 32}", "--out-dir", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("kind") == "val"]
    assert val and val[-1]["n"] == 16 and 0.0 <= val[-1]["top1"] <= 1.0

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    maps = tmp_path / "maps"
    argv = ["--checkpoint", str(out / "last.pt"), "--images", str(image)]
    assert rollout_main([*argv, "--out-dir", str(maps), "--device", "cpu"]) == 0
    assert (maps / "a_rollout-mean-discard0.png").is_file()
    assert (maps / "a_rollout-mean-discard0_tokenizer.png").is_file()


def test_hybrid_cpu_recipe_is_the_plain_one_with_a_cct() -> None:
    from pathlib import Path

    import yaml

    from vit.engine.config import load_config, make_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    plain = yaml.safe_load((configs / "cifar10_cpu_30min.yaml").read_text())
    hybrid = yaml.safe_load((configs / "cifar10_cpu_30min_hybrid.yaml").read_text())
    assert "data_dir" not in hybrid
    model_keys = {"model", "model_args", "drop_path", "out_dir", "data_dir"}
    assert {k: v for k, v in plain.items() if k not in model_keys} == {
        k: v for k, v in hybrid.items() if k not in model_keys
    }
    cfg = make_config(load_config(str(configs / "cifar10_cpu_30min_hybrid.yaml")))
    model = create_model(cfg.model, num_classes=10, img_size=32, **cfg.model_args)
    assert num_params(model) == 283_723 and model.config.pool == "seq"


def test_benchmark_smoke_run_prints_the_table(capsys, monkeypatch) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipe's path is relative to the checkout
    monkeypatch.syspath_prepend(str(root))
    from benchmarks.conv_attention import main as bench

    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--threads", "1", "--models", "cct_2_3x2_32", "--attention", "none"]
        assert bench([*argv, "cbam"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 2  # header, the recipe's ViT and timm's, two CCT rows
    assert rows[1].startswith("| vit_tiny_patch4_32 | (recipe's ViT) | 0.811M |")
    assert rows[-1].startswith("| cct_2_3x2_32 | cbam |")
    assert bench(["--models", "vit_tiny_patch4_32"]) == 2
