"""A timm ``VisionTransformer`` as ours: :func:`from_timm` reads its configuration from its modules
and copies its weights (same logits in eval mode); configurations we cannot express are refused by
name. timm is imported only when called (the caller already holds a timm model)."""

from __future__ import annotations

from typing import cast

from torch import nn

from vit.models._builder import convert_timm_state_dict
from vit.models.vision_transformer import VisionTransformer, ViTConfig

__all__ = ["config_from_timm", "from_timm"]


def config_from_timm(model: nn.Module) -> ViTConfig:
    """Read the :class:`ViTConfig` of a timm ``VisionTransformer`` from its modules.

    Raises ``TypeError`` for anything but a timm ``VisionTransformer`` and ``ValueError`` naming
    every option we do not implement (register tokens, ``no_embed_class``, ``pre_norm``,
    ``qk_norm``, attention pooling, ``dynamic_img_size``, non-GELU activations, ...).
    """
    from timm.layers import DropPath as TimmDropPath
    from timm.layers import LayerScale as TimmLayerScale
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models import vision_transformer as timm_vit

    if not isinstance(model, timm_vit.VisionTransformer):
        raise TypeError(
            f"from_timm expects a timm.models.vision_transformer.VisionTransformer, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    problems: list[str] = []

    def refuse(condition: bool, option: str) -> None:
        if condition:
            problems.append(option)

    pe = model.patch_embed
    refuse(type(pe) is not TimmPatchEmbed, f"embed_layer={type(pe).__name__}")
    refuse(model.num_reg_tokens > 0, f"register tokens (reg_tokens={model.num_reg_tokens})")
    refuse(model.no_embed_class, "no_embed_class=True")
    refuse(model.pos_embed is None, "pos_embed='none'")
    refuse(not isinstance(model.norm_pre, nn.Identity), "pre_norm=True")
    refuse(model.dynamic_img_size, "dynamic_img_size=True")
    refuse(getattr(pe, "dynamic_img_pad", False), "dynamic_img_pad=True")
    refuse(not getattr(pe, "strict_img_size", True), "strict_img_size=False")
    refuse(not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity), "embed_norm_layer")
    refuse(pe.proj.bias is None, "a patch embedding without bias")
    refuse(model.attn_pool is not None, f"attention pooling (global_pool={model.global_pool!r})")
    refuse(
        model.attn_pool is None and model.global_pool not in ("token", "avg"),
        f"global_pool={model.global_pool!r} (only 'token' and 'avg')",
    )
    refuse(
        model.global_pool == "avg" and model.pool_include_prefix and model.cls_token is not None,
        "pool_include_prefix=True",
    )
    refuse(pe.img_size is None or pe.img_size[0] != pe.img_size[1], f"img_size={pe.img_size}")
    refuse(pe.patch_size[0] != pe.patch_size[1], f"patch_size={pe.patch_size}")
    has_norm = not isinstance(model.norm, nn.Identity)
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    refuse(not has_norm and not has_fc_norm, "final_norm=False")
    refuse(
        model.pos_drop.p != model.head_drop.p,
        f"pos_drop_rate={model.pos_drop.p} != drop_rate={model.head_drop.p} (one drop_rate "
        f"serves both here)",
    )

    norms = [
        m
        for name, m in model.named_modules()
        if "norm" in name.rsplit(".", 1)[-1] and not isinstance(m, nn.Identity)
    ]
    eps = {m.eps for m in norms if isinstance(m, nn.LayerNorm)}
    refuse(
        any(not isinstance(m, nn.LayerNorm) or not m.elementwise_affine for m in norms),
        "a norm_layer other than LayerNorm",
    )
    refuse(len(eps) > 1, f"LayerNorms with different eps {sorted(eps)}")

    dim = model.embed_dim
    block_problems: set[str] = set()
    for blk in model.blocks:
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(blk) is not timm_vit.Block or type(attn) is not timm_vit.Attention:
            block_problems.add(f"block_fn={type(blk).__name__} / attn_layer={type(attn).__name__}")
            continue
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            block_problems.add("qk_norm=True")
        if not isinstance(attn.norm, nn.Identity):
            block_problems.add("scale_attn_norm=True")
        if getattr(attn, "gate", None) is not None:
            block_problems.add("gated attention")
        if attn.attn_dim != dim:
            block_problems.add(f"attn_head_dim giving width {attn.attn_dim} != embed_dim {dim}")
        if attn.proj.bias is None:
            block_problems.add("proj_bias=False")
        if type(mlp) is not TimmMlp:
            block_problems.add(f"mlp_layer={type(mlp).__name__}")
            continue
        if not isinstance(mlp.norm, nn.Identity):
            block_problems.add("scale_mlp_norm=True")
        if mlp.fc1.bias is None or mlp.fc2.bias is None:
            block_problems.add("an MLP without bias")
        if type(mlp.act) is not nn.GELU or mlp.act.approximate != "none":
            block_problems.add(f"act_layer={mlp.act!r} (only exact nn.GELU)")
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, nn.Identity | TimmLayerScale):
                block_problems.add(f"layer scale {type(ls).__name__}")
    problems.extend(sorted(block_problems))
    if problems:
        raise ValueError(
            "this timm VisionTransformer uses option(s) vit.VisionTransformer does not implement: "
            + "; ".join(problems)
            + ". Build the timm model without them, or keep using timm for it."
        )

    # Every block passed the checks above: a timm Block with timm's Attention and Mlp (whose fc1
    # is a Linear: the VisionTransformer never builds a convolutional Mlp).
    first = cast(timm_vit.Block, model.blocks[0])
    first_attn = cast(timm_vit.Attention, first.attn)
    hidden = cast(nn.Linear, cast(TimmMlp, first.mlp).fc1).out_features
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # int() truncation in the block must give back `hidden`
        raise ValueError(f"cannot express an MLP width of {hidden} for width {dim} as mlp_ratio")
    last = model.blocks[-1]
    return ViTConfig(
        img_size=int(pe.img_size[0]),
        patch_size=int(pe.patch_size[0]),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=first_attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=first_attn.qkv.bias is not None,
        pool="cls" if model.global_pool == "token" else "mean",
        pos_embed="learned",
        class_token=model.cls_token is not None,
        fc_norm=has_fc_norm,
        drop_rate=model.head_drop.p,
        proj_drop_rate=first_attn.proj_drop.p,
        attn_drop_rate=first_attn.attn_drop.p,
        drop_path_rate=(
            last.drop_path1.drop_prob if isinstance(last.drop_path1, TimmDropPath) else 0.0
        ),
        patch_drop_rate=getattr(model.patch_drop, "prob", 0.0),
        layer_scale_init=(
            float(first.ls1.init_values) if isinstance(first.ls1, TimmLayerScale) else None
        ),
        norm_eps=eps.pop() if eps else 1e-6,
    )


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """Build our :class:`VisionTransformer` from a timm ``VisionTransformer``: same configuration,
    same weights, same device, dtype and train/eval mode (hence, in eval mode, the same logits)."""
    config = config_from_timm(timm_model)
    model = VisionTransformer(config)
    model.load_state_dict(convert_timm_state_dict(timm_model.state_dict()), strict=True)
    reference = next(timm_model.parameters())
    return model.to(device=reference.device, dtype=reference.dtype).train(timm_model.training)


# ----------------------------------------------------------------------------------------------
# Loading boundary
# ----------------------------------------------------------------------------------------------
