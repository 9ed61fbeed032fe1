"""vit.models: the classifier's stages, variants, factory errors and import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from vit.layers import DropPath, LayerScale
from vit.models import (
    VisionTransformer,
    ViTConfig,
    create_model,
    list_models,
    register_variant,
)

TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=16)  # 4x4 = 16 patches


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_required_variants_and_sizes() -> None:
    names = list_models()
    for size in ("tiny", "small", "base"):
        assert f"vit_{size}_patch4_32" in names and f"vit_{size}_patch16_224" in names
    assert list_models("vit_*_patch4_32") == [
        "vit_base_patch4_32",
        "vit_small_patch4_32",
        "vit_tiny_patch4_32",
    ]
    with torch.device("meta"):  # no memory or initialisation cost for the full-size models
        small = create_model("vit_small_patch4_32")
        tiny_224 = create_model("vit_tiny_patch16_224")
    cfg = small.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.patch_size) == (
        384,
        12,
        6,
        32,
        4,
    )
    assert tiny_224.config.num_classes == 1000 and tiny_224.patch_embed.num_patches == 196
    assert sum(p.numel() for p in small.parameters()) == 21_342_346  # the README's 21.34 M
    with pytest.raises(ValueError, match="already registered"):
        register_variant("vit_tiny_patch4_32")(lambda **kw: nn.Identity())


def test_stages_shapes_and_overrides() -> None:
    model = create_model("vit_tiny_patch4_32", num_classes=7, **TINY).eval()
    assert len(model.blocks) == 2 and model.config.embed_dim == 32  # overrides win
    x = torch.randn(3, 3, 16, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 32)
    assert model(x).shape == (3, 7)
    torch.testing.assert_close(model.forward_head(tokens), model(x))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert model.grid_size == (4, 4)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    headless = create_model("vit_tiny_patch4_32", num_classes=0, **TINY)
    assert isinstance(headless.head, nn.Identity) and headless(x).shape == (3, 32)


def test_forward_features_is_the_written_out_pipeline() -> None:
    model = create_model("vit_tiny_patch4_32", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    patches = model.patch_embed(x)
    h = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + model.pos_embed
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model.forward_features(x), model.norm(h))


@pytest.mark.parametrize("overrides", [{}, dict(fc_norm=True, layer_scale_init=0.1)])
def test_forward_equals_head_of_features(overrides: dict) -> None:
    # forward() runs the last block for the class token only; logits and gradients must be
    # those of the full computation.
    model = create_model("vit_tiny_patch4_32", **TINY, **overrides).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    x = torch.randn(3, 3, 16, 16)
    params = list(model.parameters())
    fast = model(x)
    full = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    cotangent = torch.randn(fast.shape)
    g_fast = torch.autograd.grad(fast, params, cotangent)
    g_full = torch.autograd.grad(full, params, cotangent)
    for name_p, a, b in zip(dict(model.named_parameters()), g_fast, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name_p)

    # While attention is recorded (rollout), every block runs for every token.
    recorded: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.recorder = recorded.append
    torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)
    assert [tuple(w.shape) for w in recorded] == [(3, 2, 17, 17)] * 2


def test_mean_pooling_and_fc_norm() -> None:
    model = create_model("vit_tiny_patch4_32", pool="mean", **TINY).eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 16, 32)
    x = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(1))

    # timm's layout: the final LayerNorm after pooling; a class token kept but not pooled.
    fc = create_model("vit_tiny_patch4_32", pool="mean", class_token=True, fc_norm=True, **TINY)
    fc.eval()
    tokens = fc.forward_features(x)
    assert isinstance(fc.norm, nn.Identity) and tokens.shape == (2, 17, 32)
    torch.testing.assert_close(
        fc.forward_head(tokens, pre_logits=True), fc.fc_norm(tokens[:, 1:].mean(1))
    )


@pytest.mark.parametrize("pos_embed", ["sincos2d", "sinusoidal"])
def test_fixed_position_encodings_are_buffers(pos_embed: str) -> None:
    model = create_model("vit_tiny_patch4_32", pos_embed=pos_embed, **TINY)
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()  # recomputed, not stored in checkpoints
    assert model.pos_embed[0, 0].abs().max() == 0  # the class token gets no position
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pool="cls"),
        dict(pool="mean", layer_scale_init=1e-2, drop_path_rate=0.2),
        dict(pool="mean", class_token=True, fc_norm=True, drop_rate=0.1, qkv_bias=False),
    ],
    ids=["cls", "mean+layerscale+droppath", "mean+fc_norm+cls_token"],
)
def test_every_parameter_gets_a_gradient(overrides: dict) -> None:
    model = create_model("vit_tiny_patch4_32", **{**TINY, **overrides}).train()
    nn.init.normal_(model.head.weight, std=0.1)  # a zero head would pass no gradient back
    if overrides.get("layer_scale_init"):
        assert any(isinstance(m, LayerScale) for m in model.modules())
    if overrides.get("drop_path_rate"):
        assert any(isinstance(m, DropPath) for m in model.modules())
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    # The class token is unused by mean pooling, but attention still mixes it into the patches.


def test_drop_path_rates_increase_with_depth() -> None:
    model = create_model("vit_tiny_patch4_32", **{**TINY, "depth": 3}, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "p", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.15, 0.3])


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    model = create_model("vit_tiny_patch4_32", drop_rate=0.5, drop_path_rate=0.5, **TINY)
    nn.init.normal_(model.head.weight)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_patch_dropout_keeps_a_random_subset_in_training_only() -> None:
    model = create_model("vit_tiny_patch4_32", patch_drop_rate=0.25, **TINY)
    plain = create_model("vit_tiny_patch4_32", **TINY)
    plain.load_state_dict(model.state_dict())  # no parameters of its own
    nn.init.normal_(model.head.weight), plain.head.weight.data.copy_(model.head.weight)
    x = torch.randn(4, 3, 16, 16)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)  # evaluation sees everything

    model.train()
    embedded = model.pos_embed + torch.cat(
        [model.cls_token.expand(4, -1, -1), model.patch_embed(x)], dim=1
    )
    tokens = model._embed(x)  # the class token and 12 of the 16 patches, each with its position
    assert tokens.shape == (4, 1 + 12, 32)
    torch.testing.assert_close(tokens[:, 0], embedded[:, 0], atol=0, rtol=0)
    kept = []
    for b in range(4):
        match = (tokens[b, 1:, None] == embedded[b, None, 1:]).all(-1)  # (12, 16)
        assert (match.sum(1) == 1).all(), "every kept token is one of the sample's own patches"
        kept.append(frozenset(match.nonzero()[:, 1].tolist()))
    assert all(len(k) == 12 for k in kept) and len(set(kept)) > 1  # distinct per sample
    assert not torch.allclose(model(x), plain.train()(x))


def test_bad_images_are_refused() -> None:
    model = create_model("vit_tiny_patch4_32", **TINY)
    with pytest.raises(ValueError, match=r"3 input channels, got 1.*in_chans=1"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*unsqueeze"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="16x16 images, got 32x32"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model([[0.0]])


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="image size 30 is not divisible by patch size 4"):
        create_model("vit_tiny_patch4_32", img_size=30)
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        create_model("vit_tiny_patch4_32", embed_dim=100)
    with pytest.raises(ValueError, match="pool='cls' needs class_token=True"):
        ViTConfig(pool="cls", class_token=False)
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        ViTConfig(drop_path_rate=1.5)
    with pytest.raises(ValueError, match="patch_drop_rate must be in"):
        ViTConfig(patch_drop_rate=1.0)
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch4_23'.*vit_tiny_patch4_32"):
        create_model("vit_tiny_patch4_23")
    with pytest.raises(TypeError, match=r"'drop_path'.*did you mean 'drop_path_rate'"):
        create_model("vit_tiny_patch4_32", drop_path=0.1)
    with pytest.raises(TypeError, match="unknown model option"):
        VisionTransformer(ViTConfig(), embed_size=3)


def test_captions_import_without_the_engine() -> None:
    """The tokenizer, datasets and BLEU/CIDEr-D load without the training engine."""
    code = (
        "import sys, vit.captions, vit.captions.metrics, vit.captions.tokenizer; "
        "print(sorted(m for m in sys.modules if m.startswith(('vit.engine', 'vit.train', "
        "'tensorboard'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
