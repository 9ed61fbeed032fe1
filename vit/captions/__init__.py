"""Image captioning data and evaluation: a word-level tokenizer, caption datasets, BLEU and CIDEr-D.

Datasets (``load_caption_data(name, ...)``):

* ``shapes`` — generated offline: scenes of one to three coloured shapes on a 2x2 grid with
  captions that need both *what* and *where* ("a small red circle to the left of a large blue
  square"). Deterministic given a seed; the validation scenes come from another seed (held out).
* ``flickr8k`` — ``DIR/captions.txt`` (CSV ``image,caption``) or the original
  ``DIR/Flickr8k.token.txt`` (``img.jpg#0<TAB>caption``), with the images in ``DIR/Images``,
  ``DIR/Flicker8k_Dataset`` or ``DIR/images``.
* ``coco`` — ``DIR/{train,val}2017`` and ``DIR/annotations/captions_{train,val}2017.json`` through
  ``torchvision.datasets.CocoCaptions`` (needs ``pycocotools``).

Where a trained captioner looks: :func:`cross_attention_maps` and :func:`attention_strip`
(:mod:`vit.captions.attention`). The caption task of the training engine is
:class:`vit.engine.captioning.CaptionTask`.
"""

from __future__ import annotations

from vit.captions.attention import attention_strip, cross_attention_maps
from vit.captions.datasets import (
    CAPTION_DATASETS,
    CaptionData,
    CaptionDataset,
    caption_preprocess,
    load_caption_data,
    load_coco,
    load_flickr8k,
    make_shapes,
    normalize,
    read_flickr8k_captions,
)
from vit.captions.metrics import bleu_scores, cider_d
from vit.captions.tokenizer import Tokenizer

__all__ = [
    "CAPTION_DATASETS",
    "CAPTION_TASK_ARGS",
    "CaptionData",
    "CaptionDataset",
    "CaptionTask",
    "Tokenizer",
    "attention_strip",
    "bleu_scores",
    "caption_preprocess",
    "cider_d",
    "cross_attention_maps",
    "load_caption_data",
    "load_coco",
    "load_flickr8k",
    "make_shapes",
    "normalize",
    "read_flickr8k_captions",
]
