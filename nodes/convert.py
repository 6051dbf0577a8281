"""Pure-torch conversions between ComfyUI tensors and the core's conventions (no ComfyUI import).

ComfyUI IMAGE: float [B, H, W, C] in [0, 1] (C = 3, sometimes 1 or 4); MASK: float [B, H, W] or [H, W] in [0, 1].
Core images: float [B, 3, H, W] in [−1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import InvalidImageError

MIN_SIDE = 64
MAX_SIDE = 4096


def rgb(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] → [B,H,W,3]: grayscale replicated, alpha dropped (composited over white)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise InvalidImageError(f"expected an IMAGE tensor [B,H,W,C], got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 1:
        return image.expand(-1, -1, -1, 3)
    if c == 4:
        alpha = image[..., 3:4]
        return image[..., :3] * alpha + (1.0 - alpha)
    if c != 3:
        raise InvalidImageError(f"expected 1, 3 or 4 image channels, got {c}")
    return image


def check_size(image: torch.Tensor, what: str = "image") -> None:
    h, w = image.shape[1], image.shape[2]
    if min(h, w) < MIN_SIDE:
        raise InvalidImageError(f"the {what} is {w}×{h} px; at least {MIN_SIDE} px per side is needed "
                                f"(use the Face Align node on a larger photo)")
    if max(h, w) > MAX_SIDE:
        raise InvalidImageError(f"the {what} is {w}×{h} px; at most {MAX_SIDE} px per side is supported here "
                                f"(use Face Align, or downscale first)")
    if not torch.isfinite(image).all():
        raise InvalidImageError(f"the {what} contains NaN or infinite values")


def to_model_image(image: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """IMAGE [B,H,W,C] in [0,1] → [B,3,H',W'] in [−1,1], resized (bicubic) to multiples of ``multiple``."""
    x = rgb(image).float()
    check_size(x)
    x = x.permute(0, 3, 1, 2)
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
