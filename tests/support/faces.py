"""Geometry helpers for the face tests: map points through an alignment (they only read an
:class:`core.faces.AlignedFace`)."""
from __future__ import annotations

import numpy as np

from core.faces import AlignedFace


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
