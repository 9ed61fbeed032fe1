"""Attention rollout: the math against a plain reference, capture on/off, planted attention (the
pictures, the TensorBoard hook and the command line: tests/test_rollout_pictures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import vit.layers.attention
from vit.models import create_model
from vit.rollout import (
    attention_rollout,
    capture_attention,
    gradient_rollout,
    rollout_maps,
    rollout_to_maps,
)

TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=16)  # 4x4 patch grid, 17 tokens


def tiny_model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch4_32", **{**TINY, **overrides}).eval()


def random_attentions(blocks=3, batch=2, heads=3, tokens=10, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1) for _ in range(blocks)
    ]


def reference_rollout(attentions, head_fusion, discard_ratio, start_layer, class_token=True):
    """Abnar & Zuidema (2020) written plainly, one image and one entry at a time."""
    atts = [a.double().numpy() for a in attentions]
    batch, _, n, _ = atts[0].shape
    out = np.zeros((batch, n, n))
    for b in range(batch):
        joint = np.eye(n)
        for a in atts[start_layer:]:
            fused = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](a[b], axis=0)
            first = 1 if class_token else 0
            entries = [(fused[i, j], i, j) for i in range(n) for j in range(first, n)]
            for _, i, j in sorted(entries)[: int(len(entries) * discard_ratio)]:
                fused[i, j] = 0.0
            fused = fused + np.eye(n)
            for i in range(n):
                fused[i] = fused[i] / fused[i].sum()
            joint = fused @ joint
        out[b] = joint
    return out


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize(("discard_ratio", "start_layer"), [(0.0, 0), (0.6, 0), (0.3, 1)])
def test_rollout_matches_plain_implementation(head_fusion, discard_ratio, start_layer):
    attentions = random_attentions()
    ours = attention_rollout(attentions, head_fusion, discard_ratio, start_layer)
    ref = reference_rollout(attentions, head_fusion, discard_ratio, start_layer)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_mean_pooling_with_a_class_token_averages_the_patch_rows():
    joint = attention_rollout(random_attentions(tokens=17, seed=3))
    ours = rollout_to_maps(joint, 4, pool="mean")
    expected = joint[:, 1:, 1:].mean(dim=1).reshape(2, 4, 4)
    expected = (expected - expected.amin((1, 2), keepdim=True)) / (
        expected.amax((1, 2), keepdim=True) - expected.amin((1, 2), keepdim=True)
    )
    torch.testing.assert_close(ours, expected)


def test_rollout_without_class_token_may_discard_any_column():
    attentions = random_attentions(seed=1)
    ours = attention_rollout(attentions, "mean", 0.5, class_token=False)
    ref = reference_rollout(attentions, "mean", 0.5, 0, class_token=False)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref, reference_rollout(attentions, "mean", 0.5, 0, class_token=True))


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_joint_rows_sum_to_one(head_fusion):
    joint = attention_rollout(random_attentions(blocks=6, seed=2), head_fusion, 0.9)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 10))
    assert (joint >= 0).all()


def test_uniform_attention_gives_uniform_map():
    n = 1 + 16
    uniform = [torch.full((2, 3, n, n), 1.0 / n) for _ in range(4)]
    joint = attention_rollout(uniform)
    cls_row = joint[:, 0, 1:]
    torch.testing.assert_close(cls_row, torch.full_like(cls_row, cls_row[0, 0].item()))
    maps = rollout_to_maps(joint, 4, 16)
    assert maps.shape == (2, 16, 16)
    assert maps.max() == maps.min()  # nothing to highlight: a flat map


def test_bad_arguments_are_refused():
    att = random_attentions()
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(att, "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(att, discard_ratio=1.0)
    with pytest.raises(ValueError, match="start_layer"):
        attention_rollout(att, start_layer=3)
    with pytest.raises(ValueError, match="capture_attention"):
        attention_rollout([])
    with pytest.raises(TypeError, match="list"):
        attention_rollout(att[0])
    with pytest.raises(ValueError, match="patch grid"):
        rollout_to_maps(attention_rollout(att), 4)
    with pytest.raises(ValueError, match="pool"):
        rollout_to_maps(attention_rollout(att), 3, class_token=False, pool="cls")
    with pytest.raises(ValueError, match="EncoderBlock"), capture_attention(nn.Linear(2, 2)):
        pass


def planted(monkeypatch, patch: int) -> None:
    """Every query of every block attends only to patch ``patch`` (token 1 + patch with a class
    token): the module's explicit path returns, and records, these weights."""
    explicit = vit.layers.scaled_dot_product_attention

    def fake(q, k, v, mask=None, scale=None, dropout_p=0.0):
        _, weights = explicit(q, k, v, mask, scale, dropout_p)
        token = patch + (k.shape[2] - 16)  # 16 patches; the rest are prefix tokens
        weights = torch.zeros_like(weights)
        weights[..., token] = 1.0
        return weights @ v, weights

    monkeypatch.setattr(vit.layers.attention, "scaled_dot_product_attention", fake)


@pytest.mark.parametrize(
    "layout",
    [dict(pool="cls"), dict(pool="mean"), dict(pool="mean", class_token=True)],
    ids=["cls", "mean", "mean-with-class-token"],
)
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_planted_attention_peaks_on_that_patch(monkeypatch, layout, discard_ratio):
    patch = 6  # row 1, column 2 of the 4x4 grid: pixels y 4..7, x 8..11
    planted(monkeypatch, patch)
    model = tiny_model(**layout)
    images = torch.randn(2, 3, 16, 16)
    maps = rollout_maps(model, images, discard_ratio=discard_ratio, image_size=4)  # patch grid
    assert maps.flatten(1).argmax(1).tolist() == [patch, patch]
    full = rollout_maps(model, images, discard_ratio=discard_ratio)  # upsampled to 16x16
    for m in full:
        y, x = divmod(m.argmax().item(), 16)
        assert 4 <= y < 8 and 8 <= x < 12


def test_capture_off_is_untouched_and_on_gives_the_same_outputs(monkeypatch):
    model = tiny_model()
    images = torch.randn(3, 3, 16, 16)
    calls = []
    explicit = vit.layers.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return explicit(*args, **kwargs)

    monkeypatch.setattr(vit.layers.attention, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        before = model(images)
        assert calls == []  # fused path: no weights computed
        with capture_attention(model) as attentions:
            during = model(images)
        assert len(calls) == 2 and len(attentions) == 2
        assert attentions[0].shape == (3, 2, 17, 17)
        after = model(images)
    assert len(calls) == 2 and len(attentions) == 2  # nothing stored after the context
    assert torch.equal(before, after)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-6)
    assert all(block.attn.recorder is None for block in model.blocks)


def test_capture_is_removed_after_an_exception():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model):
        raise RuntimeError("boom")
    assert all(block.attn.recorder is None for block in model.blocks)


def test_capture_through_compile_and_dataparallel_wrappers():
    model = tiny_model()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), capture_attention(model) as direct:
        model(images)
    for wrapped in (torch.compile(model, backend="eager"), nn.DataParallel(model)):
        with torch.no_grad(), capture_attention(wrapped) as attentions:
            wrapped(images)
        assert len(attentions) == 2
        for a, b in zip(attentions, direct, strict=True):
            torch.testing.assert_close(a, b)
        assert all(block.attn.recorder is None for block in model.blocks)


def test_capture_through_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        with torch.no_grad(), capture_attention(ddp) as attentions:
            ddp(torch.randn(2, 3, 16, 16))
        assert len(attentions) == 2
    finally:
        dist.destroy_process_group()


def test_gradient_rollout_matches_hand_computation():
    model = tiny_model(num_classes=3)
    with torch.no_grad():  # a non-zero head, so the gradients are not all zero
        model.head.weight.normal_()
    images = torch.randn(2, 3, 16, 16)
    relevance = gradient_rollout(model, images, target=1)
    assert relevance.shape == (2, 17, 17)
    assert all(p.grad is None for p in model.parameters())

    with capture_attention(model) as attentions:
        logits = model(images)
    for a in attentions:
        a.retain_grad()
    logits[:, 1].sum().backward()
    r = torch.eye(17).repeat(2, 1, 1)
    for a in attentions:
        cam = (a.grad * a).clamp(min=0).mean(dim=1)
        r = r + cam @ r
    torch.testing.assert_close(relevance, r.detach())
    assert not torch.allclose(relevance, torch.eye(17).expand(2, 17, 17))


def test_capture_on_from_timm_model_equals_timm_attention():
    import timm

    from vit.models import from_timm

    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2
    ).eval()
    theirs = []
    for block in reference.blocks:  # timm's explicit path passes the softmax through attn_drop
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda mod, inp, out: theirs.append(out))
    ours = from_timm(reference).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference(images)
        with capture_attention(ours) as attentions:
            ours(images)
    assert len(attentions) == len(theirs) == 2
    for a, b in zip(attentions, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
