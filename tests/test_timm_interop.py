"""vit.timm_interop: from_timm parity, refusals, the timm registry, the loading boundary."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from vit.models import VisionTransformer, create_model, from_timm
from vit.timm_interop import TIMM_PREFIX, convert_timm_state_dict, load_pretrained

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomise(model: nn.Module) -> nn.Module:
    # Fresh inits have zero biases, unit norms and a constant layer scale; noise on every
    # parameter makes a mapping mistake (a swapped or transposed tensor) show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _timm(kind: str) -> nn.Module:
    if kind == "create_tiny_224_token":  # timm's own variant, shallower
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    if kind == "create_small_avg_layerscale":
        return timm.create_model(
            "vit_small_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            depth=1,
            global_pool="avg",
            class_token=False,
            init_values=1e-2,
            num_classes=5,
        )
    configs = {
        "token_patch4": dict(img_size=32, patch_size=4, num_classes=10, **SMALL),
        "token_fc_norm_3ch1": dict(
            img_size=16, patch_size=2, in_chans=1, num_classes=3, fc_norm=True, **SMALL
        ),
        "avg_with_cls_no_fc_norm": dict(
            img_size=16, patch_size=4, global_pool="avg", fc_norm=False, num_classes=4, **SMALL
        ),
        "avg_fc_norm_headless": dict(
            img_size=24,
            patch_size=8,
            global_pool="avg",
            class_token=False,
            num_classes=0,
            embed_dim=48,
            depth=3,
            num_heads=4,
            mlp_ratio=2.0,
            qkv_bias=False,
        ),
    }
    return TimmViT(**configs[kind])


KINDS = [
    "create_tiny_224_token",
    "create_small_avg_layerscale",
    "token_patch4",
    "token_fc_norm_3ch1",
    "avg_with_cls_no_fc_norm",
    "avg_fc_norm_headless",
]


@pytest.mark.parametrize("kind", KINDS)
def test_from_timm_matches_timm(kind: str) -> None:
    theirs = _randomise(_timm(kind))
    ours = from_timm(theirs)
    assert isinstance(ours, VisionTransformer) and not ours.training
    size = theirs.patch_embed.img_size[0]
    x = torch.randn(2, theirs.patch_embed.proj.in_channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.forward_features(x), theirs.forward_features(x), atol=1e-5, rtol=1e-5
        )
    assert ours.config.num_classes == theirs.num_classes
    assert ours.config.depth == len(theirs.blocks)


def test_from_timm_keeps_training_options() -> None:
    theirs = TimmViT(
        img_size=16, patch_size=4, drop_rate=0.1, pos_drop_rate=0.1, attn_drop_rate=0.05,
        proj_drop_rate=0.02, drop_path_rate=0.2, init_values=0.5, **SMALL,
    )  # fmt: skip
    cfg = from_timm(theirs).config
    assert (cfg.drop_rate, cfg.attn_drop_rate, cfg.proj_drop_rate) == (0.1, 0.05, 0.02)
    assert cfg.drop_path_rate == pytest.approx(0.2) and cfg.layer_scale_init == 0.5
    assert from_timm(theirs.train()).training


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_patch_dropout_draws_the_tokens_timm_draws(global_pool: str) -> None:
    # In training, under the same seed, our patch dropout keeps the same tokens as timm's: same
    # logits and the same gradients. In evaluation both see every token. In float64: the float32
    # gradients (up to ~50 here) differ by a few ulps between kernels, and by how much depends on
    # the tensors' memory alignment, i.e. on what ran before (AVX2 reductions); a different token
    # draw would differ by orders of magnitude more.
    theirs = _randomise(
        TimmViT(img_size=16, patch_size=4, patch_drop_rate=0.5, global_pool=global_pool, **SMALL)
    ).double()
    ours = from_timm(theirs)
    assert ours.config.patch_drop_rate == 0.5
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        torch.manual_seed(1)
        expected = theirs(x)
        torch.manual_seed(1)
        got = ours(x)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    theirs.train(), ours.train()
    torch.manual_seed(2)
    g_theirs = torch.autograd.grad(theirs(x).square().sum(), theirs.patch_embed.proj.weight)
    torch.manual_seed(2)
    g_ours = torch.autograd.grad(ours(x).square().sum(), ours.patch_embed.proj.weight)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(reg_tokens=4), "register tokens"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(global_pool="map"), "attention pooling"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(dynamic_img_size=True), "dynamic_img_size"),
        (dict(act_layer="relu"), "act_layer"),
        (dict(act_layer="gelu_tanh"), "act_layer"),
        (dict(final_norm=False), "final_norm=False"),
        (dict(img_size=(16, 32)), "img_size"),
        (dict(drop_rate=0.1), "pos_drop_rate"),
    ],
)
def test_from_timm_refuses_unsupported_options(option: dict, message: str) -> None:
    theirs = TimmViT(**{"img_size": 16, "patch_size": 4, **SMALL, **option})
    with pytest.raises(ValueError, match="does not implement") as info:
        from_timm(theirs)
    assert message in str(info.value)


def test_from_timm_refuses_other_models() -> None:
    with pytest.raises(TypeError, match=r"timm\.models\.vision_transformer\.VisionTransformer"):
        from_timm(nn.Linear(2, 2))


def test_timm_create_model_builds_our_variants() -> None:
    assert "vitpkg_vit_tiny_patch4_32" in timm.list_models("vitpkg_*")
    assert "vitpkg_cct_7_3x1_32" in timm.list_models("vitpkg_*")
    assert not timm.list_models("vitpkg_caption*")  # captioners are not classifiers
    model = timm.create_model("vitpkg_vit_tiny_patch4_32", num_classes=10)
    assert isinstance(model, VisionTransformer)
    assert model.config == create_model("vit_tiny_patch4_32", num_classes=10).config
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)

    model = timm.create_model(
        "vitpkg_vit_tiny_patch4_32",
        global_pool="avg",
        drop_path_rate=0.1,
        init_values=1e-3,
        depth=2,
        img_size=16,
    )
    cfg = model.config
    assert (cfg.pool, cfg.drop_path_rate, cfg.layer_scale_init, cfg.img_size) == (
        "mean",
        0.1,
        1e-3,
        16,
    )
    # As in timm, global_pool changes the pooling only: the variant's class token stays.
    assert cfg.class_token and model.global_pool == "avg"
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # the registered (source) config
    assert model.pretrained_cfg["architecture"] == "vitpkg_vit_tiny_patch4_32"
    # timm's transforms normalise with the statistics of the data each variant is sized for.
    cifar = timm.data.resolve_data_config(model=model)
    assert cifar["mean"] == (0.4914, 0.4822, 0.4465) and cifar["std"] == (0.2470, 0.2435, 0.2616)
    imagenet = timm.data.resolve_data_config(
        model=timm.create_model("vitpkg_vit_tiny_patch16_224", depth=1)
    )
    assert imagenet["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert imagenet["std"] == timm.data.IMAGENET_DEFAULT_STD
    with pytest.raises(RuntimeError, match="No pretrained weights exist for vitpkg_vit_tiny"):
        timm.create_model("vitpkg_vit_tiny_patch4_32", pretrained=True)
    with pytest.raises(ValueError, match="global_pool='map' is not supported"):
        timm.create_model("vitpkg_vit_tiny_patch4_32", global_pool="map")
    with pytest.raises(ValueError, match=r"pool='cls' needs class_token=True"):
        timm.create_model("vitpkg_cct_2_3x2_32", global_pool="token")
    with pytest.raises(TypeError, match="unknown model option"):
        timm.create_model("vitpkg_vit_tiny_patch4_32", qk_norm=True)
    with pytest.raises(ValueError, match="square"):
        timm.create_model("vitpkg_vit_tiny_patch4_32", img_size=(32, 16))


def test_timm_pretrained_file_overlay_adapts_timm_weights(tmp_path) -> None:
    # timm's pretrained=True path with a local file: a timm 224/16 ViT's weights (1000 classes,
    # declared by the overlay) into a 32-px model with 10 classes, through the same adaptation as
    # load_pretrained (position embedding 14x14 -> 8x8, patch kernel 16 -> 4); timm drops the
    # head of the other class count.
    state = _imagenet_state()
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    theirs = timm.create_model(
        "vitpkg_vit_tiny_patch4_32",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=1000),
        num_classes=10,
        **SMALL,
    )
    expected = create_model("vit_tiny_patch4_32", num_classes=10, **SMALL)
    load_pretrained(expected, state)
    got = theirs.state_dict()
    for key, value in expected.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)
    assert theirs.pretrained_cfg["file"] == str(path)


def test_reset_classifier_and_global_pool() -> None:
    model = create_model("vit_tiny_patch4_32", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert model.get_classifier() is model.head and model.head_hidden_size == 32
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5) and model.global_pool == "token"
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), tokens[:, 0])  # the pooled class token
    model.reset_classifier(0, "avg")
    torch.testing.assert_close(model(x), tokens[:, 1:].mean(1))
    model.reset_classifier(0, "")
    torch.testing.assert_close(model(x), tokens)  # no pooling: every token
    with pytest.raises(ValueError, match="cannot be added"):
        model.reset_classifier(0, "seq")
    cct = create_model("cct_2_3x2_32")
    with pytest.raises(ValueError, match="needs a class token"):
        cct.reset_classifier(3, "token")
    cct.reset_classifier(3)
    assert cct.seq_pool is not None and cct.global_pool == "seq"
    cct.reset_classifier(0, "")
    assert cct.seq_pool is None  # removed with its pooling: it would get no gradient
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert create_model("cct_2_3x2_32_sine").no_weight_decay() == set()  # fixed positions


# CCT-2 too: timm's test_model_forward_intermediates skips its two blocks (.ci/timm_tests).
@pytest.mark.parametrize(
    ("name", "depth"), [("vit_tiny_patch4_32", 3), ("cct_7_3x1_32", 3), ("cct_2_3x2_32", 2)]
)
def test_forward_intermediates_are_the_blocks_outputs(name: str, depth: int) -> None:
    model = _randomise(create_model(name, depth=depth))
    recorded: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: recorded.append(o)) for b in model.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        for hook in hooks:
            hook.remove()
        final, nchw = model.forward_intermediates(x)
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NLC")[1]
        early, last = model.forward_intermediates(x, indices=1, stop_early=True)
        with_prefix = model.forward_intermediates(
            x, indices=[1], return_prefix_tokens=True, intermediates_only=True
        )
    p, (rows, cols) = model.num_prefix_tokens, model.grid_size
    assert len(nchw) == len(nlc) == len(recorded) == depth
    torch.testing.assert_close(final, features, atol=0, rtol=0)
    for i, block_out in enumerate(recorded):
        torch.testing.assert_close(nlc[i], block_out[:, p:], atol=0, rtol=0)
        grid = block_out[:, p:].reshape(2, rows, cols, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(nchw[i], grid, atol=0, rtol=0)
    torch.testing.assert_close(normed[0], model.norm(recorded[0])[:, p:], atol=0, rtol=0)
    torch.testing.assert_close(normed[1], model.norm(recorded[-1])[:, p:], atol=0, rtol=0)
    assert len(last) == 1 and torch.equal(last[0], nchw[-1])
    torch.testing.assert_close(early, features, atol=0, rtol=0)
    torch.testing.assert_close(with_prefix[0][1], recorded[1][:, :p], atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[depth])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize(
    ("name", "reduction"),
    [("vit_tiny_patch4_32", 4), ("cct_7_3x1_32", 2), ("cct_7_3x2_32", 4)],
)
def test_features_only_maps_have_the_declared_shapes(name: str, reduction: int) -> None:
    features = timm.create_model(f"{TIMM_PREFIX}{name}", features_only=True, out_indices=(0, -1))
    info = features.feature_info
    width = create_model(name).embed_dim
    assert info.channels() == [width, width] and info.reduction() == [reduction, reduction]
    assert info.module_name()[0] == "blocks.0"
    maps = features(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, 32 // r, 32 // r) for c, r in zip(info.channels(), info.reduction(), strict=True)
    ]
    # Pruned to what the features need: no blocks past the last index, no norm, no head.
    depth = create_model(name).config.depth
    assert len(features.model.blocks) == depth and isinstance(features.model.head, nn.Identity)
    first = timm.create_model(f"{TIMM_PREFIX}{name}", features_only=True, out_indices=(0,))
    assert len(first.model.blocks) == 1


def _grads(model: nn.Module, x: torch.Tensor, checkpointing: bool) -> tuple[dict, int, int]:
    """Parameter gradients of a fixed loss (same seed: the same dropout draws), the elements
    autograd saved for the backward pass, and how often block 0 ran."""
    model.set_grad_checkpointing(checkpointing)
    saved, calls = [], []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    hook = model.blocks[0].register_forward_pre_hook(lambda m, i: calls.append(1))
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().sum().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads, sum(saved), len(calls)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(pool="mean"), dict(drop_path_rate=0.3, patch_drop_rate=0.25)],
    ids=["class-token", "mean", "stochastic"],
)
def test_grad_checkpointing_gives_the_same_gradients(overrides: dict) -> None:
    model = _randomise(create_model("vit_tiny_patch4_32", **SMALL, **overrides)).train()
    x = torch.randn(2, 3, 32, 32)
    expected, saved_plain, calls_plain = _grads(model, x, checkpointing=False)
    got, saved, calls = _grads(model, x, checkpointing=True)
    # Real checkpointing: each block runs again in the backward pass (from its saved input, with
    # the same random draws), and autograd keeps far fewer activations.
    assert (calls_plain, calls) == (1, 2)
    assert saved < saved_plain / 2
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_convert_state_dict_renames_and_unwraps() -> None:
    state = {
        "module.blocks.0.attn.qkv.weight": torch.zeros(1),
        "_orig_mod.norm.bias": torch.ones(1),
    }
    assert set(convert_timm_state_dict(state)) == {"blocks.0.attn.to_qkv.weight", "norm.bias"}


def _imagenet_state(**overrides) -> dict[str, torch.Tensor]:
    """A randomised timm 224/16 ViT state dict with 1000 classes (what a pretrained file holds)."""
    theirs = TimmViT(**{"img_size": 224, "patch_size": 16, **SMALL, **overrides})
    return _randomise(theirs).state_dict()


def test_load_pretrained_224_to_32(caplog: pytest.LogCaptureFixture) -> None:
    state = _imagenet_state()
    model = create_model("vit_tiny_patch4_32", num_classes=10, **SMALL)
    head_before = model.head.weight.clone()
    with caplog.at_level(logging.WARNING, logger="vit.models._builder"):
        report = load_pretrained(model, state)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    # Independent check of the grid layout: row-major 14x14 tokens, bicubic, antialiased.
    grid = state["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], grid.permute(0, 2, 3, 1).reshape(1, 64, 32))
    torch.testing.assert_close(model.pos_embed[:, :1], state["pos_embed"][:, :1])
    assert model.patch_embed.proj.weight.shape == (32, 3, 4, 4)
    torch.testing.assert_close(
        model.blocks[1].attn.to_qkv.weight, state["blocks.1.attn.qkv.weight"]
    )
    torch.testing.assert_close(model.head.weight, head_before)  # the 1000-class head was dropped
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert any("dropped the checkpoint's head (1000, 32)" in n for n in report.notes)
    assert any("14x14 to a 8x8" in n for n in report.notes)
    assert "dropped the checkpoint's head" in caplog.text
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resampled_constant_stays_constant_and_same_grid_is_identity() -> None:
    state = _imagenet_state(num_classes=10)
    state["pos_embed"][:, 1:] = torch.linspace(-1, 1, 32)  # the same vector at every position
    model = create_model("vit_tiny_patch4_32", **SMALL)
    load_pretrained(model, state)
    torch.testing.assert_close(model.pos_embed[0, 1:], torch.linspace(-1, 1, 32).expand(64, 32))

    # Same grid: no resampling, and the loaded model reproduces the source's logits.
    theirs = _randomise(TimmViT(img_size=32, patch_size=4, num_classes=10, **SMALL))
    report = load_pretrained(model, theirs.state_dict())
    torch.testing.assert_close(model.pos_embed, theirs.pos_embed, atol=0, rtol=0)
    assert report.notes == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(
        resample_abs_pos_embed(theirs.pos_embed, new_size=[8, 8], old_size=[8, 8]),
        theirs.pos_embed,
    )


def test_load_pretrained_into_a_model_without_class_token() -> None:
    state = _imagenet_state(num_classes=0)
    model = create_model("vit_tiny_patch4_32", pool="mean", fc_norm=False, **SMALL)
    report = load_pretrained(model, state)
    assert model.pos_embed.shape == (1, 64, 32)
    assert any("class token" in n for n in report.notes)
    assert any("no head" in n for n in report.notes)


def test_load_pretrained_files_and_our_own_checkpoints(tmp_path) -> None:
    source = create_model("vit_tiny_patch4_32", **SMALL)
    _randomise(source)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # a training checkpoint
    target = create_model("vit_tiny_patch4_32", **SMALL)
    assert load_pretrained(target, str(path)).notes == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = create_model("vit_tiny_patch4_32", **SMALL)
    load_pretrained(target, tmp_path / "w.safetensors")
    assert torch.equal(target.head.weight, source.head.weight)


def test_load_pretrained_refuses_what_does_not_fit() -> None:
    state = _imagenet_state()
    deeper = create_model("vit_tiny_patch4_32", embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: blocks\.2\..*depth"):
        load_pretrained(deeper, state)
    report = load_pretrained(deeper, state, strict=False)
    assert "blocks.2.attn.to_qkv.weight" in report.missing_keys
    torch.testing.assert_close(deeper.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])

    wider = create_model("vit_tiny_patch4_32", embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(wider, state)
    fc_norm = create_model(
        "vit_tiny_patch4_32", pool="mean", class_token=True, fc_norm=True, **SMALL
    )
    with pytest.raises(ValueError, match="fc_norm=False"):
        load_pretrained(fc_norm, state)
    no_cls = {k: v[:, 1:] if k == "pos_embed" else v for k, v in state.items() if k != "cls_token"}
    with pytest.raises(ValueError, match="no class token"):
        load_pretrained(create_model("vit_tiny_patch4_32", **SMALL), no_cls)
    with pytest.raises(TypeError, match="state dict"):
        load_pretrained(create_model("vit_tiny_patch4_32", **SMALL), [1, 2])
    with pytest.raises(ValueError, match="no checkpoint file"):
        load_pretrained(create_model("vit_tiny_patch4_32", **SMALL), "/nonexistent/w.pt")
