"""Attention modules for convolutional feature maps, each in its paper's formulation.

Every module maps (B, C, H, W) -> (B, C, H, W) and is built by name from :data:`CONV_ATTENTION`
(:func:`create_conv_attention`). The non-local block, DANet's position attention and the
asymmetric pyramid non-local block are the Transformer's attention over H·W positions, so they call
:func:`vit.layers.scaled_dot_product_attention` instead of a second softmax(q·kᵀ)·v.

Reduction ratios default to the papers' values; a constructor with a ``reduction`` raises
``ValueError`` when ``channels`` does not divide by it, rather than silently rounding the hidden
width (the Raises sections below list only the other checks).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from vit.layers.attention import scaled_dot_product_attention

__all__ = [
    "BAM",
    "CBAM",
    "CONV_ATTENTION",
    "AsymmetricPyramidNonLocal",
    "ChannelAttentionModule",
    "DualAttention",
    "EfficientChannelAttention",
    "GlobalContextBlock",
    "GlobalSecondOrderPooling",
    "NonLocalBlock",
    "PositionAttentionModule",
    "SelectiveKernel",
    "SqueezeExcitation",
    "create_conv_attention",
    "eca_kernel_size",
]


def _reduced(channels: int, reduction: int, module: str) -> int:
    """``channels // reduction``, refusing a ratio that does not divide the channel count."""
    if channels < 1 or reduction < 1:
        raise ValueError(f"{module}: channels and reduction must be positive integers")
    if channels % reduction != 0:
        fits = max(d for d in range(1, reduction + 1) if channels % d == 0)
        raise ValueError(
            f"{module}: channels={channels} is not divisible by reduction={reduction}; pass a "
            f"reduction that divides it (e.g. reduction={fits})"
        )
    return channels // reduction


def _bottleneck(
    channels: int, hidden: int, norm: Callable[[int], nn.Module] | None = None
) -> list[nn.Module]:
    """The channel MLP ``C → hidden → C`` with a ReLU (and ``norm(hidden)`` before it) of SE, CBAM,
    BAM and GC, as layers for an ``nn.Sequential``: the linear layers are its entries 0 and 2 (3
    with a norm), the parameter names the authors' checkpoints and timm use."""
    hidden_norm = [] if norm is None else [norm(hidden)]
    return [nn.Linear(channels, hidden), *hidden_norm, nn.ReLU(), nn.Linear(hidden, channels)]


def _to_tokens(x: Tensor) -> Tensor:
    return rearrange(x, "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, H·W, C), row-major positions


# ----------------------------------------------------------------------------------------------
# Channel gates
# ----------------------------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018, "Squeeze-and-Excitation Networks", Sec. 3).

    Squeeze: ``z_c`` = mean of channel c over H×W (eq. 2). Excitation: ``s = σ(W₂ δ(W₁ z))`` with
    ``W₁: C → C/r``, ``δ`` = ReLU, ``W₂: C/r → C`` (eq. 3). Output ``s_c · x_c`` (eq. 4). The fully
    connected layers carry biases, as in the authors' released models.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = _reduced(channels, reduction, "SqueezeExcitation")
        self.excite = nn.Sequential(*_bottleneck(channels, hidden), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        gates = self.excite(reduce(x, "b c h w -> b c", "mean"))  # (B, C)
        return x * rearrange(gates, "b c -> b c 1 1")


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size ``k = |log₂(C)/γ + b/γ|_odd`` (Wang et al. 2020, Sec. 3), with
    ``|t|_odd`` taken as the authors' code does: truncate, then round an even value up."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al. 2020, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks", Sec. 3).

    Global average pooling, then a 1-D convolution of size ``k`` across neighbouring channels
    (one kernel shared by all channels, no bias), a sigmoid, and channel-wise rescaling. ``k``
    defaults to :func:`eca_kernel_size` (γ=2, b=1).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``kernel_size`` is given and is not a positive odd integer.
    """

    def __init__(
        self,
        channels: int,
        *,
        gamma: float = 2.0,
        b: float = 1.0,
        kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd integer, got {k}")
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = reduce(x, "b c h w -> b 1 c", "mean")  # channels as a 1-D signal
        gates = self.conv(pooled).sigmoid()  # (B, 1, C)
        return x * rearrange(gates, "b 1 c -> b c 1 1")


class GlobalSecondOrderPooling(nn.Module):
    """GSoP-Net1 channel attention (Gao et al. 2019, "Global Second-order Pooling Convolutional
    Networks", Sec. 3, Fig. 2).

    A 1×1 convolution (+BN, ReLU) reduces C to ``c`` channels; their covariance over the H·W
    positions, ``Σ = X Ī Xᵀ`` with ``Ī = (1/M)(I − 11ᵀ/M)``, is a c×c matrix; after a row-wise
    batch normalisation, a row-wise convolution (a grouped convolution, one group per row) turns
    each row into ``row_expansion`` = 4 numbers; a 1×1 convolution maps the 4c-vector to C weights,
    and a sigmoid gives the channel gates that multiply the input. Follows the authors' code: no
    activation between the row-wise and the final convolution, and none on the input (their block
    applies a ReLU first because it attends to a pre-activation residual branch).

    ``reduced_channels`` defaults to the paper's 128, or to C when C < 128 (no reduction).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``reduced_channels`` or ``row_expansion`` is not positive.
    """

    def __init__(
        self, channels: int, *, reduced_channels: int | None = None, row_expansion: int = 4
    ) -> None:
        super().__init__()
        c = min(128, channels) if reduced_channels is None else reduced_channels
        if c < 1 or row_expansion < 1:
            raise ValueError(
                f"GSoP: reduced_channels and row_expansion must be positive, got {c} and "
                f"{row_expansion}"
            )
        self.to_reduced = nn.Sequential(
            nn.Conv2d(channels, c, kernel_size=1), nn.BatchNorm2d(c), nn.ReLU()
        )
        self.row_norm = nn.BatchNorm2d(c)  # one statistic per covariance row
        self.row_conv = nn.Conv2d(c, row_expansion * c, kernel_size=(c, 1), groups=c)
        self.to_gates = nn.Conv2d(row_expansion * c, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        feats = rearrange(self.to_reduced(x), "b c h w -> b c (h w)")
        centred = feats - feats.mean(dim=-1, keepdim=True)
        cov = torch.einsum("bin,bjn->bij", centred, centred) / feats.shape[-1]  # (B, c, c)
        rows = self.row_norm(rearrange(cov, "b i j -> b i j 1"))  # rows as channels
        gates = self.to_gates(self.row_conv(rows)).sigmoid()  # (B, C, 1, 1)
        return x * gates


# ----------------------------------------------------------------------------------------------
# Channel and spatial gates
# ----------------------------------------------------------------------------------------------
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018, "CBAM: Convolutional Block Attention
    Module", Sec. 3).

    Channel attention ``M_c = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` with one shared MLP
    ``C → C/r → C`` and a ReLU (eq. 2); then spatial attention on ``F' = M_c ⊗ F``:
    ``M_s = σ(f⁷ˣ⁷([AvgPool(F'); MaxPool(F')]))``, pooling across channels (eq. 3); output
    ``M_s ⊗ F'`` (eq. 1). The 7×7 convolution has a bias and no batch norm, as eq. 3 is written (the
    authors' code follows it with a BN, which at inference is an affine map a biased conv absorbs).

    The spatial map (B, 1, H, W) is available from :meth:`spatial_attention`, or from every
    forward through ``recorder`` (a callable, e.g. ``list.append``; ``None`` records nothing).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``spatial_kernel`` is even.
    """

    def __init__(self, channels: int, *, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = _reduced(channels, reduction, "CBAM")
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"CBAM spatial_kernel must be odd, got {spatial_kernel}")
        self.channel_mlp = nn.Sequential(*_bottleneck(channels, hidden))
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.recorder: Callable[[Tensor], None] | None = None

    def channel_attention(self, x: Tensor) -> Tensor:
        """``M_c(x)``, (B, C, 1, 1)."""
        avg = self.channel_mlp(reduce(x, "b c h w -> b c", "mean"))
        peak = self.channel_mlp(reduce(x, "b c h w -> b c", "max"))
        return rearrange((avg + peak).sigmoid(), "b c -> b c 1 1")

    def _spatial_map(self, refined: Tensor) -> Tensor:
        pooled = torch.cat(
            [
                reduce(refined, "b c h w -> b 1 h w", "mean"),
                reduce(refined, "b c h w -> b 1 h w", "max"),
            ],
            dim=1,
        )  # (B, 2, H, W): [avg; max] in eq. 3's order
        return self.spatial_conv(pooled).sigmoid()  # (B, 1, H, W)

    def spatial_attention(self, x: Tensor) -> Tensor:
        """The spatial map ``M_s(M_c(x) ⊗ x)`` this module applies to input ``x``, (B, 1, H, W)."""
        return self._spatial_map(x * self.channel_attention(x))

    def forward(self, x: Tensor) -> Tensor:
        refined = x * self.channel_attention(x)
        spatial = self._spatial_map(refined)
        if self.recorder is not None:
            self.recorder(spatial)
        return refined * spatial


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al. 2018, "BAM: Bottleneck Attention Module", Sec. 3).

    ``F' = F + F ⊗ σ(M_c(F) + M_s(F))`` with the (B, C, 1, 1) channel branch
    ``M_c = BN(MLP(AvgPool(F)))``, MLP ``C → C/r → C``, and the (B, 1, H, W) spatial branch
    ``M_s = BN(f₃¹ˣ¹(f₂³ˣ³(f₁³ˣ³(f₀¹ˣ¹(F)))))``: a 1×1 reduction to C/r, two 3×3
    convolutions with dilation d=4, and a 1×1 convolution to one map. Hidden layers are
    layer → BN → ReLU as in the authors' code; the BN that ends each branch is the paper's (the
    released code omits it and multiplies the branches instead of adding them; this follows the
    paper's sum).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        hidden = _reduced(channels, reduction, "BAM")

        def dilated() -> list[nn.Module]:
            conv = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
            return [conv, nn.BatchNorm2d(hidden), nn.ReLU()]

        self.channel_gate = nn.Sequential(
            *_bottleneck(channels, hidden, nn.BatchNorm1d), nn.BatchNorm1d(channels)
        )
        self.spatial_gate = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            *dilated(),
            *dilated(),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.BatchNorm2d(1),
        )

    def forward(self, x: Tensor) -> Tensor:
        channel = self.channel_gate(reduce(x, "b c h w -> b c", "mean"))  # (B, C)
        spatial = self.spatial_gate(x)  # (B, 1, H, W)
        return x + x * torch.sigmoid(rearrange(channel, "b c -> b c 1 1") + spatial)


class SelectiveKernel(nn.Module):
    """Selective Kernel convolution (Li et al. 2019, "Selective Kernel Networks", Sec. 3.1).

    Split: M branches, each a 3×3 grouped convolution (G groups) → BN → ReLU, branch m dilated by
    ``dilations[m]`` (dilation 2 stands in for the 5×5 kernel). Fuse: ``U = Σ_m U_m``,
    ``s = GAP(U)``, ``z = δ(B(W s))`` with ``W: C → d``, ``d = max(C/r, L)``. Select: softmax
    across branches of ``A_m z`` per channel, ``V = Σ_m a_m ⊗ U_m``. The fully
    connected layers have no bias, as in the paper's equations.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``channels`` is not divisible by ``groups``; ``dilations`` is empty.
    """

    def __init__(
        self,
        channels: int,
        *,
        dilations: Sequence[int] = (1, 2),
        groups: int = 32,
        reduction: int = 16,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        if len(dilations) == 0:
            raise ValueError("SelectiveKernel needs at least one branch (dilations)")
        if channels % groups != 0:
            raise ValueError(
                f"SelectiveKernel: channels={channels} is not divisible by groups={groups}; use "
                f"a channel count that is a multiple of {groups} or pass groups=..."
            )
        hidden = max(channels // reduction, min_hidden)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=groups, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )
            for d in dilations
        )
        self.fuse = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()
        )
        self.to_select = nn.Linear(hidden, len(dilations) * channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        branches = torch.stack([branch(x) for branch in self.branches], dim=1)  # (B, M, C, H, W)
        summary = reduce(branches.sum(dim=1), "b c h w -> b c", "mean")  # s = GAP(Σ_m U_m)
        logits = rearrange(
            self.to_select(self.fuse(summary)), "b (m c) -> b m c 1 1", m=len(self.branches)
        )
        return (logits.softmax(dim=1) * branches).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Self-attention over positions
# ----------------------------------------------------------------------------------------------
class _PositionAttention(nn.Module):
    """Attention over the H·W positions with 1×1 convolutions ``to_q``, ``to_k`` (to
    ``channels // reduction``) and ``to_v`` (to ``value_channels``, default the same) and plain
    dot-product scores (``scale=1.0``): what the non-local block and DANet's position attention
    share."""

    def __init__(self, channels: int, reduction: int, value_channels: int | None = None) -> None:
        super().__init__()
        inner = _reduced(channels, reduction, type(self).__name__)
        self.to_q = nn.Conv2d(channels, inner, kernel_size=1)
        self.to_k = nn.Conv2d(channels, inner, kernel_size=1)
        self.to_v = nn.Conv2d(channels, value_channels or inner, kernel_size=1)

    def attend(self, x: Tensor) -> Tensor:
        """``Σ_j softmax_j(q_i · k_j) v_j`` for every position i, on the grid: (B, C_v, H, W)."""
        q, k, v = (_to_tokens(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out, _ = scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H·W, C_v)
        return rearrange(out, "b (h w) c -> b c h w", h=x.shape[2])


class NonLocalBlock(_PositionAttention):
    """Non-local block, embedded Gaussian (Wang et al. 2018, "Non-local Neural Networks",
    Sec. 3.2-3.3).

    ``y_i = Σ_j softmax_j(θ(x_i)ᵀ φ(x_j)) g(x_j)`` (eqs. 1, 3) with 1×1 convolutions θ, φ, g to
    C/2 channels; ``z_i = BN(W_z y_i) + x_i`` (eq. 6). The BN's scale starts at zero (Sec. 4), so
    the block starts as the identity.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 2) -> None:
        super().__init__(channels, reduction)  # θ, φ, g: to_q, to_k, to_v
        self.to_out = nn.Conv2d(self.to_v.out_channels, channels, kernel_size=1)  # W_z
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        # The embedded Gaussian is exp(θᵀφ) without a 1/sqrt(d) factor: attend's scale=1.0.
        return x + self.norm(self.to_out(self.attend(x)))  # y: (B, C/2, H, W)


class PositionAttentionModule(_PositionAttention):
    """DANet's position attention module (Fu et al. 2019, "Dual Attention Network for Scene
    Segmentation", Sec. 3.2, eqs. 1-2).

    ``E_j = α Σ_i s_ji D_i + A_j``, ``s_ji = softmax_i(B_i · C_j)``: queries and keys are 1×1
    convolutions to C/8 channels, values a 1×1 convolution to C; ``α`` starts at 0.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 8) -> None:
        super().__init__(channels, reduction, value_channels=channels)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        # Eq. 1 scores are plain dot products, no 1/sqrt(d) factor: attend's scale=1.0.
        return x + self.alpha * self.attend(x)


class ChannelAttentionModule(nn.Module):
    """DANet's channel attention module (Fu et al. 2019, Sec. 3.3, eqs. 3-4).

    ``E_j = β Σ_i x_ji A_i + A_j`` over the C channel maps ``A_i`` (flattened to H·W), with no
    projections; ``β`` starts at 0. The weights are the softmax of ``max_i(e_ji) − e_ji`` for the
    energy ``e_ji = A_j · A_i``, as in the authors' released code. The row maximum is a constant
    shift inside each row's softmax, so these weights equal ``softmax_i(−A_j · A_i)``: the released
    module favours dissimilar channels, whereas eq. 3 as printed has ``exp(A_i · A_j)``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        maps = rearrange(x, "b c h w -> b c (h w)")
        energy = torch.einsum("bjn,bin->bji", maps, maps)  # (B, C, C)
        weights = (energy.amax(dim=-1, keepdim=True) - energy).softmax(dim=-1)
        out = torch.einsum("bji,bin->bjn", weights, maps)  # (B, C, H·W)
        return x + self.beta * rearrange(out, "b c (h w) -> b c h w", h=x.shape[2])


class DualAttention(nn.Module):
    """DANet's dual attention (Fu et al. 2019, Sec. 3.4): the position and the channel attention
    modules run in parallel on the same input and their outputs are summed element-wise.

    The paper's segmentation head puts a convolution before and after each module; this block is
    the two modules alone, so at initialisation (α = β = 0) it returns ``2x``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 8) -> None:
        super().__init__()
        self.position = PositionAttentionModule(channels, reduction=reduction)
        self.channel = ChannelAttentionModule()

    def forward(self, x: Tensor) -> Tensor:
        return self.position(x) + self.channel(x)


class AsymmetricPyramidNonLocal(nn.Module):
    """Asymmetric Pyramid Non-local Block, APNB (Zhu et al. 2019, "Asymmetric Non-local Neural
    Networks for Semantic Segmentation", Sec. 3.2).

    Every position queries S anchors instead of all H·W positions: keys and values are sampled by
    pyramid pooling (adaptive average pooling to 1², 3², 6², 8², S = 110). Query and key share one
    1×1 convolution → BN → ReLU to C/2 channels (as in the authors' code); values are a 1×1
    convolution to C/2; the scores are scaled by 1/sqrt(key_channels) (the authors' code). The
    context goes through a zero-initialised 1×1 convolution ``W_o``, is concatenated with the
    input, and a 1×1 convolution → BN → ReLU → dropout fuses the 2C channels back to C.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``channels`` is odd and ``key_channels``/``value_channels`` are not given;
            ``pool_sizes`` is empty.
    """

    def __init__(
        self,
        channels: int,
        *,
        key_channels: int | None = None,
        value_channels: int | None = None,
        pool_sizes: Sequence[int] = (1, 3, 6, 8),
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        if len(pool_sizes) == 0:
            raise ValueError("AsymmetricPyramidNonLocal needs at least one pool size")
        key_channels = key_channels or _reduced(channels, 2, "AsymmetricPyramidNonLocal")
        value_channels = value_channels or _reduced(channels, 2, "AsymmetricPyramidNonLocal")
        self.pool_sizes = tuple(pool_sizes)
        self.to_qk = nn.Sequential(
            nn.Conv2d(channels, key_channels, kernel_size=1),
            nn.BatchNorm2d(key_channels),
            nn.ReLU(),
        )
        self.to_v = nn.Conv2d(channels, value_channels, kernel_size=1)
        self.to_out = nn.Conv2d(value_channels, channels, kernel_size=1)
        nn.init.zeros_(self.to_out.weight)
        # By name: the attribute .bias is typed Optional, and this convolution has one.
        nn.init.zeros_(self.get_parameter("to_out.bias"))
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * channels, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout2d(dropout),
        )

    def _anchors(self, feats: Tensor) -> Tensor:
        """Pyramid-pooled samples of ``feats``: (B, C', H, W) -> (B, S, C')."""
        return torch.cat([_to_tokens(F.adaptive_avg_pool2d(feats, s)) for s in self.pool_sizes], 1)

    def forward(self, x: Tensor) -> Tensor:
        qk = self.to_qk(x)
        q = _to_tokens(qk)  # (B, H·W, C_k)
        k = self._anchors(qk)  # (B, S, C_k)
        v = self._anchors(self.to_v(x))  # (B, S, C_v)
        context, _ = scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C_k)
        context = self.to_out(rearrange(context, "b (h w) c -> b c h w", h=x.shape[2]))
        return self.fuse(torch.cat([context, x], dim=1))


class GlobalContextBlock(nn.Module):
    """Global context block (Cao et al. 2019, "GCNet: Non-local Networks Meet Squeeze-Excitation
    Networks and Beyond", Sec. 4).

    ``z_i = x_i + W_v2 ReLU(LN(W_v1 Σ_j α_j x_j))``, ``α_j = softmax_j(W_k x_j)``: one query-free
    attention map (a 1×1 convolution to one channel, softmax over positions) pools a context
    vector, a bottleneck ``C → C/r → C`` with LayerNorm transforms it (r = 16), and it is added to
    every position. As in the authors' code, ``W_k`` is Kaiming-initialised and the last layer
    starts at zero, so the block starts as the identity; LayerNorm eps 1e-5.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = _reduced(channels, reduction, "GlobalContextBlock")
        self.to_logits = nn.Conv2d(channels, 1, kernel_size=1)  # W_k
        self.transform = nn.Sequential(*_bottleneck(channels, hidden, nn.LayerNorm))
        nn.init.kaiming_normal_(self.to_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.get_parameter("to_logits.bias"))
        last = cast(nn.Linear, self.transform[-1])  # _bottleneck ends with a Linear
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        weights = rearrange(self.to_logits(x), "b 1 h w -> b (h w)").softmax(dim=-1)
        context = torch.einsum("bn,bcn->bc", weights, rearrange(x, "b c h w -> b c (h w)"))
        return x + rearrange(self.transform(context), "b c -> b c 1 1")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
CONV_ATTENTION: dict[str, type[nn.Module]] = {
    "se": SqueezeExcitation,
    "sk": SelectiveKernel,
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
    "bam": BAM,
    "nonlocal": NonLocalBlock,
    "danet": DualAttention,
    "apnb": AsymmetricPyramidNonLocal,
    "gc": GlobalContextBlock,
    "gsop": GlobalSecondOrderPooling,
}


def create_conv_attention(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention module registered as ``name`` for ``channels`` input channels.

    Keyword arguments go to the module's constructor (e.g. ``reduction=8``).

    Raises:
        ValueError: ``name`` is not in :data:`CONV_ATTENTION` (the message suggests the closest
            names).
    """
    if name not in CONV_ATTENTION:
        close = difflib.get_close_matches(name, CONV_ATTENTION, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown conv attention {name!r}{hint} (known: {', '.join(sorted(CONV_ATTENTION))})"
        )
    return CONV_ATTENTION[name](channels, **kwargs)
