"""Models: the Vision Transformer classifier, the image captioners (Transformer and Show, Attend and
Tell LSTM decoders), named variants, the factory, building from stored specs, export folders.

``import vit.models`` stays light: no timm, torchvision, tensorboard, albumentations or training
engine (tests/test_layering.py holds it to that). timm users register our variants in timm's
registry with one line, ``import vit.timm_interop``.
"""

from __future__ import annotations

from vit.models import cct as _cct  # noqa: F401  (registers the cct_* variants)
from vit.models._builder import MAX_PARAMS, LoadReport, build, load_pretrained, upgrade_spec
from vit.models._from_timm import from_timm
from vit.models._registry import VARIANTS, create_model, list_models, num_params, register_variant
from vit.models.captioning import CaptionConfig, CaptioningTransformer
from vit.models.pretrained import from_pretrained, save_pretrained
from vit.models.show_attend_tell import CaptioningLSTM, LSTMCaptionConfig
from vit.models.vision_transformer import VisionTransformer, ViTConfig

__all__ = [
    "MAX_PARAMS",
    "VARIANTS",
    "CaptionConfig",
    "CaptioningLSTM",
    "CaptioningTransformer",
    "LSTMCaptionConfig",
    "LoadReport",
    "ViTConfig",
    "VisionTransformer",
    "build",
    "create_model",
    "from_pretrained",
    "from_timm",
    "list_models",
    "load_pretrained",
    "num_params",
    "register_variant",
    "save_pretrained",
    "upgrade_spec",
]
