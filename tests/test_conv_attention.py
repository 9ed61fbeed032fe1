"""Tests for vit.layers.conv_attention and vit.layers.conv_stem.

Parity: SE, ECA, CBAM, SK, GC and the non-local block against timm's modules with copied weights
(timm configured to the paper's form where it has the option; remaining differences are named in
each test). BAM, DANet, APNB and GSoP against their papers' equations written out element by
element. Then gradients and shapes for every registered module, the registry, and CCT's tokenizer
and sequence pooling.
"""

from __future__ import annotations

import math

import pytest
import timm.layers
import torch
from timm.layers.cbam import CbamModule
from torch import Tensor, nn

from vit.layers import EncoderBlock
from vit.layers.conv_attention import (
    BAM,
    CBAM,
    CONV_ATTENTION,
    AsymmetricPyramidNonLocal,
    DualAttention,
    EfficientChannelAttention,
    GlobalContextBlock,
    GlobalSecondOrderPooling,
    NonLocalBlock,
    SelectiveKernel,
    SqueezeExcitation,
    create_conv_attention,
    eca_kernel_size,
)
from vit.layers.conv_stem import ConvTokenizer, SequencePool

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and batch-norm statistics, so zero initialisations (residual gates, BN
    scales) hide nothing and every term of a formula contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def _load_mapped(ours: nn.Module, theirs: nn.Module, prefixes: dict[str, str]) -> None:
    """Copy ``theirs``' state into ``ours``, renaming prefixes or whole keys (ours → theirs) and
    reshaping 1×1 convolution kernels to linear weights. Every entry of ``ours`` must be covered."""
    src = theirs.state_dict()
    mapped = {}
    for key, value in ours.state_dict().items():
        owner = next(p for p in prefixes if key == p or key.startswith(p + "."))
        mapped[key] = src[prefixes[owner] + key[len(owner) :]].reshape(value.shape)
    ours.load_state_dict(mapped)


def _assert_same(ours: nn.Module, theirs: nn.Module, x: Tensor, modes=(False, True)) -> None:
    """Same output in eval mode (running statistics) and train mode (batch statistics). Train mode
    runs in float64: batch statistics over B=2 amplify float32 rounding past the tolerance."""
    for training in modes:
        dtype = torch.float64 if training else torch.float32
        ours.train(training).to(dtype)
        theirs.train(training).to(dtype)
        torch.testing.assert_close(ours(x.to(dtype)), theirs(x.to(dtype)), **TOL)
    ours.float()
    theirs.float()


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 64, 6, 7, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# Parity with timm
# ----------------------------------------------------------------------------------------------
def test_se_matches_timm(x: Tensor) -> None:
    # timm rounds the hidden width up to a multiple of 8 (64/16 -> 8); the paper's is C/r = 4.
    theirs = _randomise(timm.layers.SEModule(64, rd_channels=64 // 16))
    ours = SqueezeExcitation(64)
    _load_mapped(ours, theirs, {"excite.0": "fc1", "excite.2": "fc2"})
    _assert_same(ours, theirs, x)


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_eca_matches_timm(channels: int) -> None:
    x = torch.randn(2, channels, 3, 4)
    theirs = _randomise(timm.layers.EcaModule(channels))
    ours = EfficientChannelAttention(channels)
    assert ours.conv.kernel_size == theirs.conv.kernel_size == (eca_kernel_size(channels),)
    _load_mapped(ours, theirs, {"conv": "conv"})
    _assert_same(ours, theirs, x)


def test_eca_kernel_size_follows_the_paper() -> None:
    # k = |(log2 C + 1) / 2|_odd: the sizes the paper's ResNet stages get.
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]
    # timm clamps k to at least 3; the formula gives 1 for C < 8.
    assert eca_kernel_size(4) == 1
    assert timm.layers.EcaModule(4).conv.kernel_size == (3,)


def test_cbam_matches_timm(x: Tensor) -> None:
    # timm's (and the authors') spatial branch is conv (no bias) -> BN; the paper's eq. 3 is one
    # convolution. A BN with mean 0, variance 1 - eps and scale 1 is exactly "+ bias" in eval mode,
    # which is how timm is configured here; the channel MLP gets its biases back (mlp_bias=True).
    theirs = _randomise(CbamModule(64, rd_channels=64 // 16, mlp_bias=True))
    bn = theirs.spatial.conv.bn
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    ours = CBAM(64)
    _load_mapped(
        ours,
        theirs,
        {
            "channel_mlp.0": "channel.fc1",
            "channel_mlp.2": "channel.fc2",
            "spatial_conv.weight": "spatial.conv.conv.weight",
            "spatial_conv.bias": "spatial.conv.bn.bias",
        },
    )
    _assert_same(ours, theirs, x, modes=(False,))

    # The spatial map, recorded or asked for, is the one applied to the channel-refined input.
    maps: list[Tensor] = []
    ours.recorder = maps.append
    ours(x)
    assert len(maps) == 1 and maps[0].shape == (2, 1, 6, 7)
    torch.testing.assert_close(maps[0], ours.spatial_attention(x))
    torch.testing.assert_close(theirs.channel(x) * maps[0], theirs(x), **TOL)


def test_sk_matches_timm(x: Tensor) -> None:
    # timm's defaults split the input channels across the branches and round d to a multiple of 8;
    # the paper's branches see all C channels (split_input=False) and d = max(C/r, L) = 32.
    theirs = _randomise(
        timm.layers.SelectiveKernel(64, groups=32, split_input=False, rd_channels=max(64 // 16, 32))
    )
    ours = SelectiveKernel(64)
    _load_mapped(
        ours,
        theirs,
        {
            "branches.0.0": "paths.0.conv",
            "branches.0.1": "paths.0.bn",
            "branches.1.0": "paths.1.conv",
            "branches.1.1": "paths.1.bn",
            "fuse.0": "attn.fc_reduce",
            "fuse.1": "attn.bn",
            "to_select": "attn.fc_select",
        },
    )
    assert [b[0].dilation for b in ours.branches] == [p.conv.dilation for p in theirs.paths]
    _assert_same(ours, theirs, x)


def test_gc_matches_timm(x: Tensor) -> None:
    # timm's default is the multiplicative variant with ratio 1/8; the paper's GC block adds the
    # transformed context (fuse_add) with r = 16. timm's LayerNorm eps is 1e-6, the authors' 1e-5.
    theirs = _randomise(
        timm.layers.GlobalContext(64, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)
    )
    theirs.mlp_add.norm.eps = 1e-5
    ours = GlobalContextBlock(64)
    _load_mapped(
        ours,
        theirs,
        {
            "to_logits": "conv_attn",
            "transform.0": "mlp_add.fc1",
            "transform.1": "mlp_add.norm",
            "transform.3": "mlp_add.fc2",
        },
    )
    _assert_same(ours, theirs, x)


def test_nonlocal_matches_timm(x: Tensor) -> None:
    # timm scales the scores by 1/sqrt(C) (the block's width) and uses C/8 inner channels; the
    # embedded Gaussian has no scaling (use_scale=False) and C/2 inner channels.
    theirs = _randomise(timm.layers.NonLocalAttn(64, use_scale=False, rd_channels=64 // 2))
    ours = NonLocalBlock(64)
    _load_mapped(
        ours,
        theirs,
        {"to_q": "t", "to_k": "p", "to_v": "g", "to_out": "z", "norm": "norm"},
    )
    _assert_same(ours, theirs, x)


@pytest.mark.parametrize("name", ["nonlocal", "gc"])
def test_residual_blocks_start_as_identity(name: str, x: Tensor) -> None:
    block = create_conv_attention(name, 64).eval()
    torch.testing.assert_close(block(x), x)


# ----------------------------------------------------------------------------------------------
# The papers' equations, element by element (float64, small inputs)
# ----------------------------------------------------------------------------------------------
B_, C_, H_, W_ = 2, 8, 5, 5


def _small_input() -> Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(B_, C_, H_, W_, generator=gen, dtype=torch.float64)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _relu(v: float) -> float:
    return max(v, 0.0)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _bn(bn: nn.Module, channel: int, v: float) -> float:
    """Batch norm in eval mode for one value of ``channel``."""
    mean, var = bn.running_mean[channel].item(), bn.running_var[channel].item()
    scale, shift = bn.weight[channel].item(), bn.bias[channel].item()
    return (v - mean) / math.sqrt(var + bn.eps) * scale + shift


def _pointwise(conv: nn.Module, maps: list[list[list[float]]]) -> list[list[list[float]]]:
    """1×1 convolution of maps[c][i][j]."""
    w, b = conv.weight[:, :, 0, 0].tolist(), conv.bias.tolist()
    rows, cols = len(maps[0]), len(maps[0][0])
    return [
        [
            [b[o] + sum(w[o][c] * maps[c][i][j] for c in range(len(maps))) for j in range(cols)]
            for i in range(rows)
        ]
        for o in range(len(w))
    ]


def _dilated3x3(conv: nn.Conv2d, maps: list[list[list[float]]]) -> list[list[list[float]]]:
    """3×3 convolution with dilation d and zero padding d (same size) of maps[c][i][j]."""
    d = conv.dilation[0]
    w, b = conv.weight.tolist(), conv.bias.tolist()
    rows, cols = len(maps[0]), len(maps[0][0])
    out = []
    for o in range(len(w)):
        plane = []
        for i in range(rows):
            line = []
            for j in range(cols):
                acc = b[o]
                for c in range(len(maps)):
                    for u in range(3):
                        for v in range(3):
                            ii, jj = i + (u - 1) * d, j + (v - 1) * d
                            if 0 <= ii < rows and 0 <= jj < cols:
                                acc += w[o][c][u][v] * maps[c][ii][jj]
                line.append(acc)
            plane.append(line)
        out.append(plane)
    return out


def _map_planes(f, planes, bn=None):
    return [
        [[f(_bn(bn, c, v) if bn is not None else v) for v in row] for row in plane]
        for c, plane in enumerate(planes)
    ]


def test_bam_matches_its_equations() -> None:
    # F' = F + F ⊗ σ(M_c(F) + M_s(F)); M_c = BN(MLP(AvgPool F)); M_s = BN(1x1(3x3_d(3x3_d(1x1 F)))).
    # r = 4 here because C = 8 (the default r = 16 needs C >= 16).
    x = _small_input()
    bam = _randomise(BAM(C_, reduction=4)).double().eval()
    cg, sg = bam.channel_gate, bam.spatial_gate
    identity = lambda v: v  # noqa: E731
    expected = torch.empty_like(x)
    for b in range(B_):
        f = x[b].tolist()
        avg = [sum(sum(row) for row in f[c]) / (H_ * W_) for c in range(C_)]
        w0, b0 = cg[0].weight.tolist(), cg[0].bias.tolist()
        w1, b1 = cg[3].weight.tolist(), cg[3].bias.tolist()
        hidden = [
            _relu(_bn(cg[1], k, b0[k] + sum(w0[k][c] * avg[c] for c in range(C_))))
            for k in range(len(w0))
        ]
        m_c = [
            _bn(cg[4], c, b1[c] + sum(w1[c][k] * hidden[k] for k in range(len(hidden))))
            for c in range(C_)
        ]
        s = _map_planes(_relu, _pointwise(sg[0], f), sg[1])
        s = _map_planes(_relu, _dilated3x3(sg[3], s), sg[4])
        s = _map_planes(_relu, _dilated3x3(sg[6], s), sg[7])
        m_s = _map_planes(identity, _pointwise(sg[9], s), sg[10])[0]
        for c in range(C_):
            for i in range(H_):
                for j in range(W_):
                    gate = _sigmoid(m_c[c] + m_s[i][j])
                    expected[b, c, i, j] = f[c][i][j] + f[c][i][j] * gate
    torch.testing.assert_close(bam(x), expected, **TOL)


def test_danet_matches_its_equations() -> None:
    # Position (eqs. 1-2): E_j = α Σ_i softmax_i(q_j·k_i) v_i + A_j.
    # Channel (eqs. 3-4, the released form): E_j = β Σ_i softmax_i(max_i' e_ji' − e_ji) A_i + A_j,
    # e_ji = A_j·A_i. Output: their sum.
    x = _small_input()
    danet = _randomise(DualAttention(C_, reduction=4)).double().eval()
    pam, cam = danet.position, danet.channel
    n_pos = H_ * W_
    alpha, beta = pam.alpha.item(), cam.beta.item()
    expected = torch.empty_like(x)
    for b in range(B_):
        f = x[b].tolist()
        flat = [[f[c][n // W_][n % W_] for n in range(n_pos)] for c in range(C_)]  # A[c][n]
        q, k, v = (
            [[p[n // W_][n % W_] for n in range(n_pos)] for p in _pointwise(proj, f)]
            for proj in (pam.to_q, pam.to_k, pam.to_v)
        )
        position = [[0.0] * n_pos for _ in range(C_)]
        for j in range(n_pos):
            scores = [sum(q[d][j] * k[d][i] for d in range(len(q))) for i in range(n_pos)]
            s = _softmax(scores)
            for c in range(C_):
                position[c][j] = alpha * sum(s[i] * v[c][i] for i in range(n_pos)) + flat[c][j]
        channel = [[0.0] * n_pos for _ in range(C_)]
        for j in range(C_):
            energy = [sum(flat[j][n] * flat[i][n] for n in range(n_pos)) for i in range(C_)]
            weights = _softmax([max(energy) - e for e in energy])
            for n in range(n_pos):
                channel[j][n] = beta * sum(weights[i] * flat[i][n] for i in range(C_)) + flat[j][n]
        for c in range(C_):
            for n in range(n_pos):
                expected[b, c, n // W_, n % W_] = position[c][n] + channel[c][n]
    torch.testing.assert_close(danet(x), expected, **TOL)


def _adaptive_avg(plane: list[list[float]], size: int) -> list[float]:
    """Adaptive average pooling of one plane to size×size, row-major: output cell (oi, oj) averages
    rows floor(oi·H/s)..ceil((oi+1)·H/s) − 1 and the same for columns."""
    rows, cols = len(plane), len(plane[0])
    out = []
    for oi in range(size):
        r0, r1 = (oi * rows) // size, -((-(oi + 1) * rows) // size)
        for oj in range(size):
            c0, c1 = (oj * cols) // size, -((-(oj + 1) * cols) // size)
            cells = [plane[i][j] for i in range(r0, r1) for j in range(c0, c1)]
            out.append(sum(cells) / len(cells))
    return out


def test_apnb_matches_its_equations() -> None:
    # Q = K-source = ReLU(BN(1x1 x)), V = 1x1 x; K, V sampled by pyramid pooling (1, 3, 6, 8);
    # O = W_o(softmax(Q·Kᵀ / sqrt(C_k)) V); out = ReLU(BN(1x1 [O; x])).
    x = _small_input()
    apnb = _randomise(AsymmetricPyramidNonLocal(C_)).double().eval()
    n_pos, sizes = H_ * W_, apnb.pool_sizes
    assert sum(s * s for s in sizes) == 110
    expected = torch.empty_like(x)
    for b in range(B_):
        f = x[b].tolist()
        qk = _map_planes(_relu, _pointwise(apnb.to_qk[0], f), apnb.to_qk[1])
        val = _pointwise(apnb.to_v, f)
        key_anchors = [[a for s in sizes for a in _adaptive_avg(p, s)] for p in qk]  # [C_k][S]
        value_anchors = [[a for s in sizes for a in _adaptive_avg(p, s)] for p in val]  # [C_v][S]
        n_anchors, c_k = len(key_anchors[0]), len(qk)
        context = [[[0.0] * W_ for _ in range(H_)] for _ in range(len(val))]
        for n in range(n_pos):
            i, j = divmod(n, W_)
            scores = [
                sum(qk[d][i][j] * key_anchors[d][a] for d in range(c_k)) / math.sqrt(c_k)
                for a in range(n_anchors)
            ]
            w = _softmax(scores)
            for c in range(len(val)):
                context[c][i][j] = sum(w[a] * value_anchors[c][a] for a in range(n_anchors))
        fused_in = _pointwise(apnb.to_out, context) + f  # concatenation [O; x]
        out = _map_planes(_relu, _pointwise(apnb.fuse[0], fused_in), apnb.fuse[1])
        expected[b] = torch.tensor(out, dtype=torch.float64)
    torch.testing.assert_close(apnb(x), expected, **TOL)


def test_gsop_matches_its_equations() -> None:
    # X = ReLU(BN(1x1 x)) with c channels; Σ_ij = (1/M) Σ_n (X_in − μ_i)(X_jn − μ_j);
    # row-wise conv: out_o = b_o + Σ_j w_o,j BN_row(Σ)_{⌊o/4⌋, j}; gates = σ(1x1(out)); x ⊗ gates.
    x = _small_input()
    gsop = _randomise(GlobalSecondOrderPooling(C_, reduced_channels=4)).double().eval()
    n_pos = H_ * W_
    row_w, row_b = gsop.row_conv.weight[:, 0, :, 0].tolist(), gsop.row_conv.bias.tolist()
    gate_w, gate_b = gsop.to_gates.weight[:, :, 0, 0].tolist(), gsop.to_gates.bias.tolist()
    expansion = len(row_w) // 4
    expected = torch.empty_like(x)
    for b in range(B_):
        f = x[b].tolist()
        red = _map_planes(_relu, _pointwise(gsop.to_reduced[0], f), gsop.to_reduced[1])
        feats = [[p[n // W_][n % W_] for n in range(n_pos)] for p in red]
        c = len(feats)
        mu = [sum(row) / n_pos for row in feats]
        cov = [
            [
                sum((feats[i][n] - mu[i]) * (feats[j][n] - mu[j]) for n in range(n_pos)) / n_pos
                for j in range(c)
            ]
            for i in range(c)
        ]
        rows = [[_bn(gsop.row_norm, i, cov[i][j]) for j in range(c)] for i in range(c)]
        row_out = [
            row_b[o] + sum(row_w[o][j] * rows[o // expansion][j] for j in range(c))
            for o in range(len(row_w))
        ]
        gates = [
            _sigmoid(gate_b[k] + sum(gate_w[k][o] * row_out[o] for o in range(len(row_out))))
            for k in range(C_)
        ]
        for k in range(C_):
            expected[b, k] = x[b, k] * gates[k]
    torch.testing.assert_close(gsop(x), expected, **TOL)


# ----------------------------------------------------------------------------------------------
# Every registered module: gradients, shapes, registry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONV_ATTENTION))
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    torch.manual_seed(0)
    module = create_conv_attention(name, 64).train()
    x = torch.randn(2, 64, 6, 10, requires_grad=True)  # H != W catches swapped reshapes
    out = module(x)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}.{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_registry_names_every_module() -> None:
    assert set(CONV_ATTENTION) == {
        "se", "sk", "eca", "cbam", "bam", "nonlocal", "danet", "apnb", "gc", "gsop",
    }  # fmt: skip
    assert isinstance(create_conv_attention("se", 32, reduction=8), SqueezeExcitation)
    assert create_conv_attention("se", 32, reduction=8).excite[0].out_features == 4


def test_registry_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'cbam'"):
        create_conv_attention("cbma", 64)
    with pytest.raises(ValueError, match=r"did you mean 'nonlocal'"):
        create_conv_attention("non_local", 64)
    with pytest.raises(ValueError, match=r"unknown conv attention 'xyzzy' \(known: apnb, bam"):
        create_conv_attention("xyzzy", 64)


def test_constructors_refuse_channels_the_ratios_do_not_divide() -> None:
    with pytest.raises(ValueError, match="not divisible by reduction=16"):
        SqueezeExcitation(60)
    with pytest.raises(ValueError, match="not divisible by groups=32"):
        SelectiveKernel(48)
    with pytest.raises(ValueError, match="must be odd"):
        CBAM(64, spatial_kernel=6)


# ----------------------------------------------------------------------------------------------
# CCT tokenizer and sequence pooling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "layers", "dim", "img", "tokens"),
    [
        (3, 1, 1, 1, 256, 32, 256),  # CCT-7/3x1 (CIFAR): 32 -> 32 -> pool 16
        (3, 1, 1, 2, 128, 32, 64),  # CCT-2/3x2: 32 -> 16 -> 8
        (7, 2, 3, 2, 384, 224, 196),  # CCT-14/7x2 (ImageNet): 224 -> 112 -> 56 -> 28 -> 14
    ],
)
def test_tokenizer_token_count(kernel, stride, padding, layers, dim, img, tokens) -> None:
    tok = ConvTokenizer(
        embed_dim=dim, num_layers=layers, kernel_size=kernel, stride=stride, padding=padding
    )
    assert tok.num_tokens(img) == tokens
    with torch.no_grad():
        out = tok(torch.randn(1, 3, img, img))
    assert out.shape == (1, tokens, dim)
    assert tok.grid_size((img, img + 8)) == tuple(
        tok.conv_layers(torch.zeros(1, 3, img, img + 8)).shape[2:]
    )


def _cct_parameters(*, dim: int, conv_layers: int, depth: int, heads: int, mlp_ratio: float) -> int:
    """CCT on CIFAR-10 (32-pixel images, learnable positional embedding, SeqPool), with CCT's
    encoder layer shapes (qkv without bias)."""
    tok = ConvTokenizer(embed_dim=dim, num_layers=conv_layers)
    blocks = nn.ModuleList(
        EncoderBlock(dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=False)
        for _ in range(depth)
    )
    head = nn.ModuleList([nn.LayerNorm(dim), SequencePool(dim), nn.Linear(dim, 10)])
    count = sum(p.numel() for m in (tok, blocks, head) for p in m.parameters())
    return count + tok.num_tokens(32) * dim


def test_tokenizer_gives_cct_parameter_counts() -> None:
    assert sum(p.numel() for p in ConvTokenizer(embed_dim=256, num_layers=1).parameters()) == 6912
    assert sum(p.numel() for p in ConvTokenizer(embed_dim=128, num_layers=2).parameters()) == 75456
    cct_7 = _cct_parameters(dim=256, conv_layers=1, depth=7, heads=4, mlp_ratio=2)
    cct_2 = _cct_parameters(dim=128, conv_layers=2, depth=2, heads=2, mlp_ratio=1)
    assert (cct_7, cct_2) == (3_760_139, 283_723)  # the paper's 3.76M and 0.28M


def test_tokenizer_layout_and_init_follow_cct() -> None:
    tok = ConvTokenizer(embed_dim=256, num_layers=2)
    assert set(tok.state_dict()) == {"conv_layers.0.0.weight", "conv_layers.1.0.weight"}
    first = tok.conv_layers[0][0].weight  # (64, 3, 3, 3): fan_in 27
    assert first.shape == (64, 3, 3, 3)
    assert abs(first.std().item() / math.sqrt(2 / 27) - 1) < 0.15  # Kaiming normal, gain sqrt(2)
    with pytest.raises(ValueError, match="did you mean 'cbam'"):
        ConvTokenizer(embed_dim=64, num_layers=1, attention="cbm")


@pytest.mark.parametrize("name", sorted(CONV_ATTENTION))
def test_tokenizer_with_attention(name: str) -> None:
    tok = ConvTokenizer(embed_dim=64, num_layers=2, hidden_channels=32, attention=name)
    assert all(isinstance(stage[3], CONV_ATTENTION[name]) for stage in tok.conv_layers)
    assert tok(torch.randn(2, 3, 16, 16)).shape == (2, tok.num_tokens(16), 64) == (2, 16, 64)


def test_sequence_pool_weights_and_weighted_sum() -> None:
    torch.manual_seed(0)
    pool = SequencePool(16)
    nn.init.normal_(pool.attention_pool.weight)  # scores far from uniform
    x = torch.randn(3, 10, 16)
    recorded: list[Tensor] = []
    pool.recorder = recorded.append
    pooled, weights = pool.forward_with_weights(x)
    assert pooled.shape == (3, 16) and weights.shape == (3, 10)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3))
    scores = x @ pool.attention_pool.weight[0] + pool.attention_pool.bias  # (B, N)
    torch.testing.assert_close(weights, scores.softmax(dim=-1))
    explicit = torch.stack([sum(weights[b, n] * x[b, n] for n in range(10)) for b in range(3)])
    torch.testing.assert_close(pooled, explicit)
    assert recorded[0] is weights
    torch.testing.assert_close(pool(x), pooled)
