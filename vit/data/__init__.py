"""Image classification data: datasets, the augmentation policy, the CPU and the device loaders.

Every dataset holds its images decoded once as a uint8 tensor (N, H, W, 3) and returns
``(uint8 (3, H, W), label)``; normalisation happens on the training device. Training augmentation
is a pure function of ``(seed, epoch, index)``: a training dataset is indexed with ``(epoch,
index)`` pairs (see :class:`EpochBatchSampler`), so resuming mid-epoch or changing the number of
loader workers does not change a single pixel.
"""

from vit.data.datasets import (
    SYNTHETIC_CLASSES,
    ImageDataset,
    cifar10,
    image_folder,
    list_image_folder,
    split_indices,
    synthetic,
)
from vit.data.device import (
    DeviceLoader,
    augment_batch,
    randaugment_batch,
    randaugment_params,
    uniform_ints,
)
from vit.data.loader import EpochBatchSampler, make_loader
from vit.data.transforms import (
    RANDAUGMENT_OPS,
    AugmentPolicy,
    build_transform,
    reseed,
    sample_seed,
)
from vit.errors import DataError
from vit.preprocess import IMG_EXTENSIONS

__all__ = [
    "IMG_EXTENSIONS",
    "RANDAUGMENT_OPS",
    "SYNTHETIC_CLASSES",
    "AugmentPolicy",
    "DataError",
    "DeviceLoader",
    "EpochBatchSampler",
    "ImageDataset",
    "augment_batch",
    "build_transform",
    "cifar10",
    "image_folder",
    "list_image_folder",
    "make_loader",
    "randaugment_batch",
    "randaugment_params",
    "reseed",
    "sample_seed",
    "split_indices",
    "synthetic",
    "uniform_ints",
]
