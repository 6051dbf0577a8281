"""Geometry helpers for the face tests: map points through an alignment, and the paste mask in the photo.

They only read an :class:`core.faces.AlignedFace`; ``source_mask`` uses the same private region and
coordinate helpers as :func:`core.faces.paste_back`, so it is exactly the mask paste_back blends with.
"""
from __future__ import annotations

import numpy as np
import torch

from core.faces import AlignedFace, _paste_region, _region_crop_coords, face_mask_at


def _apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """matrix [2,3] applied to points [...,2] (x, y) → [...,2] float64."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def crop_to_source(aligned: AlignedFace, points) -> np.ndarray:
    """Crop points [...,2] (x, y) → source photo coordinates, float64."""
    return _apply_affine(aligned.matrix, points)


def source_to_crop(aligned: AlignedFace, points) -> np.ndarray:
    """Source photo points [...,2] (x, y) → crop coordinates, float64."""
    return _apply_affine(aligned.inverse_matrix, points)


def source_mask(aligned: AlignedFace, feather: float = 0.1, shape: str = "ellipse", *,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The paste mask warped into the photo → float32 [H,W] in [0,1], exactly 0 outside the pasted region."""
    height, width = aligned.source_size
    mask = torch.zeros(height, width, dtype=torch.float32, device=device)
    x0, y0, x1, y1 = region = _paste_region(aligned)
    if x1 > x0 and y1 > y0:
        uv = _region_crop_coords(aligned, region, device) / aligned.size
        mask[y0:y1, x0:x1] = face_mask_at(uv, feather, shape).float()
    return mask
