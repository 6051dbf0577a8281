"""Pure-torch conversions between ComfyUI tensors and the core's conventions (no ComfyUI import).

ComfyUI IMAGE: float [B, H, W, C] in [0, 1] (C = 3, sometimes 1 or 4); MASK: float [B, H, W] or [H, W] in [0, 1].
Core images: float [B, 3, H, W] in [−1, 1]. Sizes follow the one policy of ``core.faces.check_image_size``
(the CLI's too); ``what`` arguments name the node and input an image came from, for the error messages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import InvalidImageError
from ..core.faces import check_image_size, composite_to_rgb
from ..core.photo_io import check_pixel_values


def rgb(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] (or one [H,W,C]) → [B,H,W,3]: grayscale replicated, alpha composited over white
    (``core.faces.composite_to_rgb``).

    Raises:
        InvalidImageError: for another rank (naming ``what``) or channel count.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise InvalidImageError(f"The {what} must be an IMAGE [B,H,W,C]; got shape {tuple(image.shape)}.")
    return composite_to_rgb(image)


def check_size(image: torch.Tensor, what: str = "image") -> None:
    """``core.faces.check_image_size`` for IMAGE [B,H,W,C], plus ``core.photo_io.check_pixel_values`` (finite,
    in [0, 1]): the CLI's policy for decoded photos, applied to what a loader node produced.

    Raises:
        InvalidImageError: naming ``what``, its size or value range and what to do about it.
    """
    check_image_size(int(image.shape[1]), int(image.shape[2]), what)
    check_pixel_values(image, what)


def to_model_image(image: torch.Tensor, what: str = "image", multiple: int = 8) -> torch.Tensor:
    """IMAGE [B,H,W,C] in [0,1] → [B,3,H',W'] float32 in [−1,1], resized (bicubic) down to multiples of
    ``multiple``.

    Raises:
        InvalidImageError: see :func:`rgb` and :func:`check_size`.
    """
    x = rgb(image, what).float()
    check_size(x, what)
    x = x.clamp(0, 1).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    h2, w2 = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
    if (h2, w2) != (h, w):
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False).clamp(0, 1)
    return x * 2.0 - 1.0


def to_comfy_image(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [−1,1] → IMAGE [B,H,W,3] in [0,1] (clamped)."""
    return ((x.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """MASK [H,W] or [B,H,W] → [B,1,H,W] float."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    return mask.unsqueeze(1).float()
