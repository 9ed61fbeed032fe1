"""Patch embedding: images become a sequence of patch tokens, the "words" of a Vision Transformer
(Dosovitskiy et al. 2021, §3.1, eq. 1)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchEmbedding", "check_images"]


def check_images(x: Tensor, *, in_chans: int, img_size: int) -> None:
    """Refuse a batch a model built for ``in_chans``-channel ``img_size`` square images cannot
    embed, naming the problem and the fix (shared by every tokenizer).

    Raises:
        TypeError: not a floating-point tensor. ValueError: wrong rank, channels or size.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(
            f"expected images of shape (B, C, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (shape "
            f"{tuple(x.shape)}); convert the images or create the model with "
            f"in_chans={x.shape[1]}"
        )
    if tuple(x.shape[2:]) != (img_size, img_size):
        raise ValueError(
            f"expected {img_size}x{img_size} images, got "
            f"{x.shape[2]}x{x.shape[3]}; resize the input or create the model with "
            f"img_size={x.shape[2]} (position embeddings of a trained model are resampled by "
            f"from_timm / load_pretrained)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected floating-point images, got {x.dtype}; convert with x.float() / 255 and "
            f"normalise"
        )


class PatchEmbedding(nn.Module):
    """Split an image into non-overlapping ``patch_size`` patches and project each to ``dim``.

    A strided convolution is the linear projection of flattened patches of Dosovitskiy et al.
    (2021, eq. 1), computed without materialising the patches.
    """

    def __init__(
        self, *, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 192
    ) -> None:
        super().__init__()
        side, rest = divmod(img_size, patch_size)
        if rest:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; pick a patch "
                f"size that divides it (e.g. {_divisors_hint(img_size)})"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (side, side)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, gh·gw, D)


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n) if n % d == 0 and d <= 32) or "1"
