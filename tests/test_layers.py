"""vit.layers: attention paths agree, masks and caches behave, encodings follow their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vit.layers import (
    Attention,
    CrossAttention,
    DecoderBlock,
    DropPath,
    EncoderBlock,
    FeedForward,
    LayerScale,
    PatchEmbedding,
    causal_mask,
    scaled_dot_product_attention,
    sincos_2d_position_encoding,
    sinusoidal_position_encoding,
)

B, L, S, D, H = 2, 5, 7, 16, 4


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    # A fixed random cotangent checks the whole Jacobian-vector product, not only a sum.
    cotangent = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(1))
    return list(torch.autograd.grad(outputs, inputs, cotangent))


def _with_weights(attn: torch.nn.Module, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit path: the output and the softmax weights it records."""
    recorded: list[torch.Tensor] = []
    attn.recorder = recorded.append
    try:
        out = attn(*args, **kw)
    finally:
        attn.recorder = None
    (weights,) = recorded
    return out, weights


def _both_paths(attn: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None, **kw):
    inputs = [x, *([context] if context is not None else []), *attn.parameters()]
    args = (x,) if context is None else (x, context)
    fused = attn(*args, **kw)
    explicit, weights = _with_weights(attn, *args, **kw)
    return fused, explicit, weights, _grads(fused, inputs), _grads(explicit, inputs)


def _random_bool_mask(q_len: int, k_len: int) -> torch.Tensor:
    mask = torch.rand(q_len, k_len) > 0.5
    mask[:, 0] = True  # every query keeps at least one key (an all-masked row is NaN)
    return mask


SELF_MASKS = {
    "none": {},
    "bool": {"attn_mask": _random_bool_mask(L, L)},
    "additive": {"attn_mask": torch.randn(L, L)},
    "additive_batched": {"attn_mask": torch.randn(B, H, L, L)},
    "key_padding": {"key_padding_mask": torch.tensor([[False] * L, [False] * 3 + [True] * 2])},
    "bool_and_padding": {
        "attn_mask": _random_bool_mask(L, L),
        "key_padding_mask": torch.tensor([[False] * L, [False] + [True] * (L - 1)]),
    },
    "causal": {"is_causal": True},
    "causal_additive_padding": {
        "is_causal": True,
        "attn_mask": torch.randn(L, L),
        "key_padding_mask": torch.tensor([[False] * L, [False] * 4 + [True]]),
    },
}


@pytest.mark.parametrize("mask_kind", list(SELF_MASKS))
def test_fused_equals_explicit_self_attention(mask_kind: str) -> None:
    attn = Attention(D, num_heads=H)
    x = torch.randn(B, L, D, requires_grad=True)
    fused, explicit, weights, g_fused, g_explicit = _both_paths(
        attn, x, None, **SELF_MASKS[mask_kind]
    )
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert weights.shape == (B, H, L, L)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, L))


@pytest.mark.parametrize("padding", [False, True])
def test_fused_equals_explicit_cross_attention(padding: bool) -> None:
    attn = CrossAttention(D, num_heads=H, context_dim=12)
    x = torch.randn(B, L, D, requires_grad=True)
    memory = torch.randn(B, S, 12, requires_grad=True)
    kw = {"key_padding_mask": torch.arange(S).expand(B, S) >= torch.tensor([[S], [3]])}
    fused, explicit, weights, g_fused, g_explicit = _both_paths(
        attn, x, memory, **(kw if padding else {})
    )
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert weights.shape == (B, H, L, S)
    if padding:  # the second sample's padded memory positions get no attention
        assert weights[1, :, :, 3:].abs().max() == 0


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_functional_matches_torch_sdpa(mask_kind: str) -> None:
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8), torch.randn(B, H, S, 6)
    mask = {"none": None, "bool": _random_bool_mask(L, S), "additive": torch.randn(L, S)}[mask_kind]
    for scale in (None, 0.3):
        out, weights = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights @ v, out)


def test_scale_is_inverse_sqrt_head_dim() -> None:
    q, k, v = torch.randn(1, 1, L, 8), torch.randn(1, 1, S, 8), torch.randn(1, 1, S, 8)
    _, weights = scaled_dot_product_attention(q, k, v)
    manual = [
        [math.exp(float(q[0, 0, i] @ k[0, 0, j]) / math.sqrt(8)) for j in range(S)]
        for i in range(L)
    ]
    manual = torch.tensor([[w / sum(row) for w in row] for row in manual])
    torch.testing.assert_close(weights[0, 0], manual)

    # The module scales by the head width (D / heads), not the model width.
    attn = Attention(D, num_heads=H).eval()
    assert attn.scale == pytest.approx((D // H) ** -0.5)
    x = torch.randn(1, L, D)
    q, k, v = rearrange(attn.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=H)
    heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v
    expected = attn.to_out(rearrange(heads, "b h n d -> b n (h d)"))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)
    wrong = attn.to_out(
        rearrange(
            torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v, "b h n d -> b n (h d)"
        )
    )
    assert not torch.allclose(attn(x), wrong, atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "key_padding"])
def test_num_queries_gives_the_first_rows(mask_kind: str) -> None:
    attn = Attention(D, num_heads=H).eval()
    x = torch.randn(B, L, D)
    kw = SELF_MASKS[mask_kind]
    full, full_weights = _with_weights(attn, x, **kw)
    rows = {k: v[:2] if k == "attn_mask" else v for k, v in kw.items()}  # 2 query rows
    fused = attn(x, num_queries=2, **rows)
    explicit, weights = _with_weights(attn, x, num_queries=2, **rows)
    torch.testing.assert_close(fused, full[:, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, full[:, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, full_weights[:, :, :2])
    with pytest.raises(ValueError, match="num_queries"):
        attn(x, num_queries=1, is_causal=True)

    block = EncoderBlock(D, num_heads=H, layer_scale_init=0.5).eval()
    torch.testing.assert_close(block(x, num_queries=1), block(x)[:, :1], atol=1e-5, rtol=1e-5)


def test_causal_mask_layout() -> None:
    assert causal_mask(3, 3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # With a cache the 2 queries are positions 2 and 3 of 4.
    assert causal_mask(2, 4).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_attention_ignores_the_future(need_weights: bool) -> None:
    attn = Attention(D, num_heads=H).eval()
    x = torch.randn(B, L, D)
    t = 3
    x2 = x.clone()
    x2[:, t] += 5.0  # perturb a later token
    if need_weights:
        (out1, w), (out2, _) = (
            _with_weights(attn, x, is_causal=True),
            _with_weights(attn, x2, is_causal=True),
        )
        assert w.triu(diagonal=1).abs().max() == 0
    else:
        out1, out2 = attn(x, is_causal=True), attn(x2, is_causal=True)
    torch.testing.assert_close(out1[:, :t], out2[:, :t], atol=0, rtol=0)
    assert not torch.allclose(out1[:, t:], out2[:, t:])


def test_decoder_block_ignores_the_future_and_cache_matches_full_sequence() -> None:
    block = DecoderBlock(D, num_heads=H, context_dim=12).eval()
    x, memory = torch.randn(B, L, D), torch.randn(B, S, 12)
    full = block(x, memory)
    x2 = x.clone()
    x2[:, -1] = torch.randn(B, D)
    torch.testing.assert_close(block(x2, memory)[:, :-1], full[:, :-1], atol=0, rtol=0)

    cache: dict = {}
    steps = [block(x[:, i : i + 1], memory, cache=cache) for i in range(L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache["self"]["k"].shape == (B, H, L, D // H)
    assert cache["cross"]["k"].shape == (B, H, S, D // H)


def test_self_attention_cache_matches_full_sequence() -> None:
    attn = Attention(D, num_heads=H).eval()
    x = torch.randn(B, L, D)
    full = attn(x, is_causal=True)
    cache: dict = {}
    first = attn(x[:, :2], is_causal=True, cache=cache)  # a prompt, then one token at a time
    rest = [attn(x[:, i : i + 1], is_causal=True, cache=cache) for i in range(2, L)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sinusoidal_encoding_matches_the_paper() -> None:
    length, dim = 12, 10
    pe = sinusoidal_position_encoding(length, dim)
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_position_encoding(4, 7)


def test_sincos_2d_encoding() -> None:
    gh, gw, dim = 3, 4, 16
    pe = sincos_2d_position_encoding(gh, gw, dim)
    assert pe.shape == (gh * gw, dim)
    quarter = dim // 4
    for r in range(gh):
        for c in range(gw):  # MoCo v3: [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], row-major tokens
            omega = [10000 ** (-k / quarter) for k in range(quarter)]
            expected = (
                [math.sin(c * w) for w in omega]
                + [math.cos(c * w) for w in omega]
                + [math.sin(r * w) for w in omega]
                + [math.cos(r * w) for w in omega]
            )
            torch.testing.assert_close(pe[r * gw + c], torch.tensor(expected), atol=1e-6, rtol=0)
    # Relative positions: the similarity of two encodings depends only on their offset.
    grid = pe.view(gh, gw, dim)
    assert torch.dot(grid[0, 0], grid[1, 2]).item() == pytest.approx(
        torch.dot(grid[1, 1], grid[2, 3]).item(), abs=1e-5
    )
    assert len({tuple(row.tolist()) for row in pe}) == gh * gw  # every position is distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_encoding(2, 2, 6)


def test_patch_embedding_is_a_linear_map_of_flattened_patches() -> None:
    embed = PatchEmbedding(img_size=8, patch_size=4, in_chans=3, dim=D)
    x = torch.randn(B, 3, 8, 8)
    patches = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=4, p2=4)
    weight = rearrange(embed.proj.weight, "d c p1 p2 -> d (c p1 p2)")
    torch.testing.assert_close(embed(x), patches @ weight.T + embed.proj.bias, atol=1e-5, rtol=1e-5)
    assert embed.num_patches == 4 and embed.grid_size == (2, 2)


def test_feed_forward_is_linear_gelu_linear() -> None:
    ff = FeedForward(D, hidden_dim=3 * D)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(ff(x), ff.fc2(F.gelu(ff.fc1(x))))


def test_drop_path() -> None:
    x = torch.randn(4000, 3, 5) + 2.0
    drop = DropPath(0.25)
    drop.eval()
    assert drop(x) is x
    drop.train()
    out = drop(x)
    kept = (out != 0).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # whole samples are dropped, never parts of one
    torch.testing.assert_close(out[kept], x[kept] / 0.75)  # survivors rescaled by 1/(1-p)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert DropPath(0.0).train()(x) is x
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop path probability"):
            DropPath(bad)


def test_layer_scale_and_encoder_block_options() -> None:
    ls = LayerScale(D, init_value=0.1)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(ls(x), x * 0.1)
    assert ls.gamma.requires_grad

    plain = EncoderBlock(D, num_heads=H)
    assert isinstance(plain.ls1, torch.nn.Identity) and isinstance(
        plain.drop_path1, torch.nn.Identity
    )
    scaled = EncoderBlock(D, num_heads=H, layer_scale_init=1e-4, drop_path=0.1).eval()
    assert isinstance(scaled.ls1, LayerScale) and isinstance(scaled.drop_path2, DropPath)
    # x + ls1(attn(...)) + ...: a tiny layer scale keeps the block close to the identity.
    assert (scaled(x) - x).abs().max() < 1e-2
    expected = x + scaled.ls1(scaled.attn(scaled.norm1(x)))
    expected = expected + scaled.ls2(scaled.mlp(scaled.norm2(expected)))
    torch.testing.assert_close(scaled(x), expected)


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        PatchEmbedding(img_size=30, patch_size=4)
    attn = Attention(D, num_heads=H)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        attn(torch.randn(B, L, D), key_padding_mask=torch.zeros(B, L))
    with pytest.raises(TypeError, match="context"):
        CrossAttention(D, num_heads=H)(torch.randn(B, L, D))
