"""vit: Vision Transformers for small images, built from the classic Transformer's pieces."""

__version__ = "0.1.0"
