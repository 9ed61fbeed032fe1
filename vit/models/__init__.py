"""Models: the Vision Transformer classifier, the image captioners (Transformer and Show, Attend and
Tell LSTM decoders), named variants, the factory.

``import vit.models`` stays light: no tensorboard, albumentations or training engine.
"""

from __future__ import annotations

from torch import nn

from vit.models import cct as _cct  # noqa: F401  (registers the cct_* variants)
from vit.models._registry import VARIANTS, create_model, list_models, num_params, register_variant
from vit.models.captioning import CaptionConfig, CaptioningTransformer
from vit.models.pretrained import from_pretrained, save_pretrained
from vit.models.show_attend_tell import CaptioningLSTM, LSTMCaptionConfig
from vit.models.vision_transformer import VisionTransformer, ViTConfig

__all__ = [
    "VARIANTS",
    "CaptionConfig",
    "CaptioningLSTM",
    "CaptioningTransformer",
    "LSTMCaptionConfig",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "from_pretrained",
    "from_timm",
    "list_models",
    "num_params",
    "register_variant",
    "save_pretrained",
]


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """Build our :class:`VisionTransformer` from a timm ``VisionTransformer`` with the same weights
    (and, in eval mode, the same logits). See :mod:`vit.timm_interop`."""
    from vit.timm_interop import from_timm as _from_timm

    return _from_timm(timm_model)


# Registers the vit_* variants in timm as vitpkg_*, so that `import vit.models` is enough for
# timm.create_model("vitpkg_..."); last, after everything it uses is defined.
from vit import timm_interop as _timm_interop  # noqa: E402, F401
