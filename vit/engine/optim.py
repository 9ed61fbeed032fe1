"""Muon with an AdamW part, as one optimizer (what ``--optimizer muon`` trains with).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces the update of a
hidden weight matrix by its nearest semi-orthogonal matrix (Newton-Schulz iterations on the
Nesterov momentum), scaled to the RMS of an AdamW update (``0.2·sqrt(max(rows, cols))``, Liu et al.
2025, "Muon is Scalable for LLM Training"), so one learning rate serves both parts. timm's
``Muon`` does the same, but runs the iterations in bfloat16 everywhere, which a CPU without bf16
matrix units emulates: for the CPU recipe's 0.8M-parameter ViT on one AVX2 core, 1,068 ms a step
against 62 ms here and 6 ms for AdamW alone (``benchmarks/optimizer_step.py``).
Here the iterations (timm's ``zeropower_via_newtonschulz``) run in float32 on the CPU and
bfloat16 on CUDA. Under data parallelism (``process_group``) each rank orthogonalises a share of
the matrices and broadcasts the results (Jordan's distributed Muon all-gathers them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from timm.optim.muon import zeropower_via_newtonschulz
from torch import Tensor, nn

if TYPE_CHECKING:
    from vit.engine.config import RunConfig

__all__ = ["Muon", "build_optimizer"]

# Keller Jordan's quintic Newton-Schulz coefficients (five iterations).
NS_COEFFICIENTS = [(3.4445, -4.7750, 2.0315)]


class Muon(torch.optim.Optimizer):
    """Muon for the matrices of groups without ``use_fallback=True`` (weights of two or more
    dimensions whose first is not 1; a convolution is flattened to ``(out, in·k·k)``), AdamW for
    everything else: the fallback groups (timm's ``param_groups_weight_decay(...,
    fallback_list=...)`` marks them) and 1-D parameters. Weight decay is decoupled in both.

    ``process_group``: the data-parallel ranks whose gradients are already averaged (DDP's).
    Every rank keeps every momentum buffer (so any rank's state dict is complete), each
    orthogonalises its share of the matrices (balanced by their Newton-Schulz FLOPs) and
    broadcasts it, so every rank gets every update: the same step as one process, split. ``None``:
    everything in this process.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        ns_steps: int = 5,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=betas,
            eps=eps,
            ns_steps=ns_steps,
            use_fallback=False,
        )
        super().__init__(params, defaults)
        self.process_group = process_group

    @staticmethod
    def uses_muon(group: dict[str, Any], p: Tensor) -> bool:
        return not group["use_fallback"] and p.ndim >= 2 and p.shape[0] > 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon: list[tuple[Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.uses_muon(group, p):
                    muon.append((p, group))
                else:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    self._adamw(p, self.state[p], group)
        if muon:
            self._muon(muon)
        return loss

    def _muon(self, params: list[tuple[Tensor, dict[str, Any]]]) -> None:
        updates = [self._nesterov(p, self.state[p], group["momentum"]) for p, group in params]
        world, rank = 1, 0
        if self.process_group is not None:
            world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        shares = split_by_cost([u.shape for u in updates], world)
        ortho: list[Tensor | None] = [None] * len(params)
        for i in shares[rank]:
            dtype = torch.float32 if updates[i].device.type == "cpu" else torch.bfloat16
            steps = params[i][1]["ns_steps"]
            ortho[i] = zeropower_via_newtonschulz(updates[i], steps, NS_COEFFICIENTS, dtype=dtype)
        if world > 1:
            self._exchange(ortho, updates, shares, rank)
        for (p, group), update, o in zip(params, updates, ortho, strict=True):
            scale = 0.2 * max(update.shape) ** 0.5
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o.reshape(p.shape).to(p.dtype), alpha=-group["lr"] * scale)

    def _exchange(
        self,
        ortho: list[Tensor | None],
        updates: list[Tensor],
        shares: list[list[int]],
        rank: int,
    ) -> None:
        """Fill in the other ranks' shares of ``ortho``: each rank broadcasts its share,
        flattened into one float32 buffer (on the 2-core CPU's gloo, two broadcasts of 1.6 MB took
        2.9 ms, one all-gather of the same buffers 15 ms)."""
        for r, share in enumerate(shares):
            if not share:
                continue
            sizes = [updates[i].numel() for i in share]
            if r == rank:
                buffer = torch.cat([ortho[i].flatten().float() for i in share])
            else:
                buffer = updates[0].new_empty(sum(sizes), dtype=torch.float32)
            dist.broadcast(buffer, dist.get_global_rank(self.process_group, r), self.process_group)
            for i, part in zip(share, buffer.split(sizes), strict=True):
                ortho[i] = part.view(updates[i].shape)

    @staticmethod
    def _nesterov(p: Tensor, state: dict[str, Any], momentum: float) -> Tensor:
        """Update the momentum buffer; the Nesterov update as a matrix ``(rows, rest)``."""
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        return p.grad.lerp(buf, momentum).reshape(p.shape[0], -1)

    @staticmethod
    def _adamw(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (b1, b2), grad = group["betas"], p.grad
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** state["step"])).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** state["step"]))


def split_by_cost(shapes: Sequence[torch.Size], world: int) -> list[list[int]]:
    """Indices of the matrices each of ``world`` ranks orthogonalises: largest first, each to the
    least-loaded rank (ties to the lowest), by a Newton-Schulz iteration's FLOPs for ``m <= n``,
    ``4·m²·n + 2·m³``. The same shapes give the same split on every rank."""

    def cost(shape: torch.Size) -> int:
        m, n = sorted(shape)
        return 4 * m * m * n + 2 * m**3

    shares: list[list[int]] = [[] for _ in range(world)]
    loads = [0] * world
    for i in sorted(range(len(shapes)), key=lambda i: -cost(shapes[i])):
        r = loads.index(min(loads))
        shares[r].append(i)
        loads[r] += cost(shapes[i])
    for share in shares:
        share.sort()
    return shares


def build_optimizer(
    model: nn.Module, cfg: RunConfig, *, distributed: bool = False
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over timm's parameter groups (no weight decay on norms, biases and the
    model's ``no_weight_decay()``), at ``cfg.lr``; the scheduler sets each step's lr.
    ``distributed``: the default process group's ranks hold DDP-averaged gradients."""
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    # Muon orthogonalises the updates of hidden weight matrices only: the input and output
    # layers stay with AdamW (Jordan et al. 2024), as do 1-D parameters.
    fallback = ("*patch_embed.*", "*token_embed.*", "head.*") if cfg.optimizer == "muon" else ()
    if cfg.layer_decay < 1:
        # Fine-tuning: block i of L learns at lr·layer_decay^(L+1-i), the stem the slowest
        # (BEiT, Bao et al. 2022, Sec. 2.3); each group's "lr_scale" multiplies the scheduled lr.
        groups = param_groups_layer_decay(
            model,
            cfg.weight_decay,
            no_weight_decay_list=nwd,
            fallback_list=fallback,
            layer_decay=cfg.layer_decay,
        )
    else:
        groups = param_groups_weight_decay(
            model, cfg.weight_decay, no_weight_decay_list=nwd, fallback_list=fallback
        )
    betas = (0.9, cfg.beta2)
    if cfg.optimizer == "muon":
        # Under DDP the ranks split the Newton-Schulz iterations (vit.engine.optim.Muon).
        group = torch.distributed.group.WORLD if distributed else None
        return Muon(groups, lr=cfg.lr, betas=betas, process_group=group)
    # On CUDA one fused kernel updates every parameter (the foreach default launches several
    # per group); the results agree to rounding.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)
