"""Faces in ordinary photos: validation, MTCNN detection, FFHQ-style alignment and feathered paste-back.

Images here are float tensors [H,W,3] in [0,1] (ComfyUI's IMAGE layout without the batch) unless stated.
Coordinates are continuous pixel coordinates (x, y) with pixel (i, j) covering [j, j+1) × [i, i+1), i.e.
its centre at (j + 0.5, i + 0.5); that is the ``align_corners=False`` convention of ``F.grid_sample``.
MTCNN boxes and landmarks are used as they come, in the same frame.

Nothing here is differentiable on purpose: detection and alignment run once on the source photo, and the
generated crops are pasted back afterwards.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .autograd import normal_tensors
from .errors import FaceNotFoundError, InvalidImageError, MultipleFacesError

#: The one size policy for photos, in the CLI and the nodes alike (see :func:`check_image_size`).
MIN_SHORT_SIDE = 64
MAX_LONG_SIDE = 8192
#: Minimum MTCNN probability of a face: the default of every detection (and of Face Align's min_confidence).
MIN_FACE_PROBABILITY = 0.9
#: Width of the paste-back mask's soft edge, as a fraction of the face size (Face Paste Back's feather).
PASTE_FEATHER = 0.1
#: A second face counts as a competing subject when its box area is at least this fraction of the largest
#: (only :func:`single_face`, for the one-face guidance crop; protection itself handles every face).
SECONDARY_FACE_RATIO = 0.25
#: Longer side above which detection runs on a downscaled copy (boxes are mapped back to full resolution).
DETECT_MAX_SIDE = 2048
#: Tolerance for float images that overshoot [0, 1] by rounding.
_RANGE_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------

def _as_float_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise InvalidImageError(f"Unsupported image dtype {image.dtype}; use uint8 or float in [0, 1].")
        return image.float()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype == np.uint16:
        return torch.from_numpy(array.astype(np.float32) / 65535.0)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    raise InvalidImageError(f"Unsupported image dtype {array.dtype}; use uint8 or float in [0, 1].")


def check_image_size(height: int, width: int, what: str = "image") -> None:
    """The size policy for every photo the pack accepts: short side ≥ 64 px (smaller faces cannot be aligned
    to a useful crop), long side ≤ 8192 px.

    Raises:
        InvalidImageError: naming ``what`` and its size, and what to do about it.
    """
    if min(height, width) < MIN_SHORT_SIDE:
        raise InvalidImageError(f"The {what} is {width}×{height} px, too small to find and align a face in: its "
                                f"short side must be at least {MIN_SHORT_SIDE} px. Use the original photo, not a "
                                f"thumbnail or a strip cut from it.")
    if max(height, width) > MAX_LONG_SIDE:
        raise InvalidImageError(f"The {what} is {width}×{height} px; its long side may be at most {MAX_LONG_SIDE} px "
                                f"(larger photos take too much memory to decode, align and paste back). Downscale "
                                f"it so that no side exceeds {MAX_LONG_SIDE} px.")


def composite_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[..., C] with C in (1, 3, 4) → [..., 3]: grayscale replicated, RGBA composited over white (transparent
    areas become white, not black, so they do not create dark edges).

    Raises:
        InvalidImageError: for another channel count.
    """
    c = image.shape[-1]
    if c == 1:
        return image.expand(*image.shape[:-1], 3)
    if c == 4:
        alpha = image[..., 3:]
        return image[..., :3] * alpha + (1.0 - alpha)
    if c != 3:
        raise InvalidImageError(f"Expected 1, 3 or 4 image channels, got {c}.")
    return image


def ensure_rgb(image) -> torch.Tensor:
    """Validate a photo and return it as float32 [H,W,3] in [0,1] (same device as a tensor input).

    Accepts [H,W,3]; a leading batch of one ([1,H,W,C], ComfyUI IMAGE); grayscale [H,W] or [H,W,1]
    (replicated to RGB); RGBA [H,W,4] (:func:`composite_to_rgb`). uint8 / uint16 arrays are rescaled, floats
    must lie in [0,1]. Raises InvalidImageError for other shapes, non-finite values, or a size outside
    :func:`check_image_size`.
    """
    img = _as_float_tensor(image)
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise InvalidImageError(f"Expected a single image, got a batch of {img.shape[0]}; pick one image.")
        img = img[0]
    if img.ndim == 2:
        img = img.unsqueeze(-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise InvalidImageError(
            f"Expected an image [H,W,C] with C in (1, 3, 4), got shape {list(img.shape)}."
        )
    if not torch.isfinite(img).all():
        raise InvalidImageError("The image contains NaN or infinite values.")
    lo, hi = float(img.min()), float(img.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise InvalidImageError(f"Float image values must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}].")
    check_image_size(int(img.shape[0]), int(img.shape[1]))
    return composite_to_rgb(img.clamp(0.0, 1.0)).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FaceDetection:
    """One MTCNN face: box (x0, y0, x1, y1) in pixels, landmarks [5,2] float64 (x, y) in the order left eye,
    right eye, nose, mouth left, mouth right (left/right as seen in the image), detection probability."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    prob: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


_MTCNN_CACHE: dict[str, object] = {}
_MTCNN_LOCK = threading.Lock()


def get_mtcnn(device: torch.device | str = "cpu"):
    """One cached facenet-pytorch MTCNN per device (weights ship in the wheel), built outside inference mode."""
    key = str(torch.device(device))
    with _MTCNN_LOCK:
        if key not in _MTCNN_CACHE:
            from facenet_pytorch import MTCNN

            with normal_tensors():
                _MTCNN_CACHE[key] = MTCNN(keep_all=True, select_largest=True, device=torch.device(device)).eval()
        return _MTCNN_CACHE[key]


def to_uint8_array(image: torch.Tensor) -> np.ndarray:
    """float [H,W,3] in [0,1] → uint8 numpy HWC (rounded)."""
    return (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def detect_faces(image, min_prob: float = MIN_FACE_PROBABILITY, *,
                 device: torch.device | str = "cpu", max_side: int = DETECT_MAX_SIDE) -> list[FaceDetection]:
    """All faces with probability ≥ ``min_prob``, largest box first.

    image: float tensor/array [H,W,3] in [0,1] or uint8 HWC RGB (anything ``ensure_rgb`` accepts).
    Photos whose longer side exceeds ``max_side`` are searched on a copy downscaled (antialiased) to that side
    and the boxes and landmarks are mapped back to the photo's own pixels, so a 6000 px photo is never refused;
    the smallest face found is then MTCNN's 20 px times the downscale factor.
    """
    rgb = ensure_rgb(image)
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    scale = 1.0
    if max(height, width) > max_side:
        scale = max(height, width) / max_side
        size = (max(1, round(height / scale)), max(1, round(width / scale)))
        rgb = F.interpolate(rgb.permute(2, 0, 1).unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                            antialias=True)[0].permute(1, 2, 0)
        scale_y, scale_x = height / size[0], width / size[1]
    else:
        scale_y = scale_x = 1.0
    boxes, probs, points = get_mtcnn(device).detect(to_uint8_array(rgb), landmarks=True)
    if boxes is None:
        return []
    factor = np.array([scale_x, scale_y], dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2) * factor
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2) * factor
    faces = [
        FaceDetection(box=tuple(float(v) for v in box.reshape(4)), landmarks=lm.copy(), prob=float(p))
        for box, p, lm in zip(boxes, probs, points)
        if p >= min_prob
    ]
    return sorted(faces, key=lambda face: face.area, reverse=True)


def reading_order(detections: list[FaceDetection]) -> list[FaceDetection]:
    """Faces in reading order: rows from top to bottom, left to right within a row.

    A face joins the current row when its box centre lies less than half the row's median face height below
    the row's first centre; this keeps a row of heads at slightly different heights together. Face numbers
    shown to people (1, 2, …) are positions in this order.
    """
    by_top = sorted(detections, key=lambda f: (f.box[1] + f.box[3]) / 2)
    rows: list[list[FaceDetection]] = []
    for face in by_top:
        centre = (face.box[1] + face.box[3]) / 2
        if rows:
            row = rows[-1]
            first = (row[0].box[1] + row[0].box[3]) / 2
            if centre - first < 0.5 * float(np.median([f.height for f in row])):
                row.append(face)
                continue
        rows.append([face])
    return [face for row in rows for face in sorted(row, key=lambda f: (f.box[0] + f.box[2]) / 2)]


def single_face(
    image,
    min_prob: float = MIN_FACE_PROBABILITY,
    *,
    secondary_ratio: float = SECONDARY_FACE_RATIO,
    device: torch.device | str = "cpu",
) -> FaceDetection:
    """The one subject face of a photo.

    Faces whose box area is below ``secondary_ratio`` (25 %) of the largest face are background faces and
    are ignored. Raises FaceNotFoundError when there is no face and MultipleFacesError when a second face is
    at least that large.
    """
    faces = detect_faces(image, min_prob, device=device)
    if not faces:
        raise FaceNotFoundError(
            "No face found in the source image (detection probability ≥ "
            f"{min_prob}); use a photo with one clearly visible face, at least ~80 px wide."
        )
    if len(faces) >= 2 and faces[1].area >= secondary_ratio * faces[0].area:
        competing = sum(face.area >= secondary_ratio * faces[0].area for face in faces)
        raise MultipleFacesError(
            f"Found {competing} faces of similar size in the source image; crop the photo to one person "
            f"(faces smaller than {secondary_ratio:.0%} of the largest one are ignored)."
        )
    return faces[0]


# ---------------------------------------------------------------------------------------------------------
# FFHQ-style alignment
# ---------------------------------------------------------------------------------------------------------

def rot90(v: np.ndarray) -> np.ndarray:
    """Rotate 2-vectors (x, y) by +90° in image coordinates: (x, y) → (−y, x)."""
    return np.stack([-v[..., 1], v[..., 0]], axis=-1)


def ffhq_quad(landmarks) -> np.ndarray:
    """FFHQ crop quad [4,2] float64 from 5 landmarks [5,2] (left eye, right eye, nose, mouth l, mouth r).

    Corners in order top-left, bottom-left, bottom-right, top-right of the aligned crop:
    x = eye_to_eye − rot90(eye_to_mouth), normalised and scaled by max(2·|eye_to_eye|, 1.8·|eye_to_mouth|);
    y = rot90(x); centre c = eye_avg + 0.1·eye_to_mouth; quad = [c−x−y, c−x+y, c+x+y, c+x−y].
    """
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_left, eye_right, _nose, mouth_left, mouth_right = lm
    eye_avg = (eye_left + eye_right) / 2.0
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) / 2.0
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - rot90(eye_to_mouth)
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm == 0.0:
        raise InvalidImageError("Degenerate face landmarks: cannot compute an alignment.")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = rot90(x)
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_to_matrix(quad: np.ndarray, size: int) -> np.ndarray:
    """2×3 affine mapping crop coords [0,size]² → source coords: (0,0) → quad[0], (0,size) → quad[1],
    (size,0) → quad[3]."""
    quad = np.asarray(quad, dtype=np.float64)
    linear = np.stack([(quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size], axis=1)
    return np.concatenate([linear, quad[0][:, None]], axis=1)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine map."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """An FFHQ-aligned face crop and the geometry to put it back.

    crop: float32 [size,size,3] in [0,1]. matrix: 2×3 float64 affine mapping crop pixel coords → source pixel
    coords (continuous coordinates, pixel centres at +0.5). source_size: (H, W) of the photo. quad: the crop's
    corners in the source [4,2] (top-left, bottom-left, bottom-right, top-right).
    """

    crop: torch.Tensor
    matrix: np.ndarray
    source_size: tuple[int, int]
    size: int
    quad: np.ndarray

    @property
    def inverse_matrix(self) -> np.ndarray:
        """2×3 affine mapping source pixel coords → crop pixel coords."""
        return invert_affine(self.matrix)


def _pixel_centres(x0: int, y0: int, width: int, height: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Continuous coordinates (x, y) of the centres of a height×width block of pixels at (x0, y0) → [h,w,2]."""
    ys = torch.arange(height, dtype=dtype, device=device) + (y0 + 0.5)
    xs = torch.arange(width, dtype=dtype, device=device) + (x0 + 0.5)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def _apply_affine_torch(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=points.dtype, device=points.device)
    return points @ m[:, :2].T + m[:, 2]


def _normalised_grid(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coords [...,2] → ``grid_sample`` coords in [−1,1] (align_corners=False)."""
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=coords.dtype, device=coords.device)
    return coords * scale - 1.0


def align_face(image, landmarks, size: int = 512) -> AlignedFace:
    """FFHQ-style aligned crop [size,size,3] of the face given by 5 landmarks (or a FaceDetection).

    Bilinear resampling of the photo along the FFHQ quad. Where the quad leaves the photo the crop reflects
    the photo at its border (FFHQ pads with a blurred reflection; a plain reflection avoids black borders and
    is enough here, since paste-back only writes inside the photo). Quads much larger than the output are
    first box-filtered by an integer factor, like FFHQ's shrink step, to avoid aliasing.
    """
    if isinstance(landmarks, FaceDetection):
        landmarks = landmarks.landmarks
    img = ensure_rgb(image)
    height, width = int(img.shape[0]), int(img.shape[1])
    quad = ffhq_quad(landmarks)
    matrix = quad_to_matrix(quad, size)
    source = img.permute(2, 0, 1).unsqueeze(0)
    scale = float(np.hypot(*(quad[3] - quad[0]))) / size
    shrink = int(math.floor(scale)) if scale >= 2.0 else 1
    if shrink > 1:
        h, w = height // shrink * shrink, width // shrink * shrink
        source = F.avg_pool2d(source[..., :h, :w], kernel_size=shrink)
    src_coords = _apply_affine_torch(matrix, _pixel_centres(0, 0, size, size, device=img.device)) / shrink
    grid = _normalised_grid(src_coords, source.shape[-2], source.shape[-1]).to(img.dtype).unsqueeze(0)
    crop = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    crop = crop[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()
    return AlignedFace(crop=crop, matrix=matrix, source_size=(height, width), size=int(size), quad=quad)


# ---------------------------------------------------------------------------------------------------------
# Feathered paste-back
# ---------------------------------------------------------------------------------------------------------

def smoothstep(t: torch.Tensor) -> torch.Tensor:
    """3t² − 2t³ on t clamped to [0,1]: exactly 0 for t ≤ 0, exactly 1 for t ≥ 1, C¹ in between."""
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def face_mask_at(uv: torch.Tensor, feather: float = PASTE_FEATHER, shape: str = "ellipse") -> torch.Tensor:
    """Paste mask at normalised crop coordinates uv [...,2] ∈ [0,1]² (outside → 0) → [...].

    "ellipse": the disc inscribed in the crop; "rect": the whole crop. The mask is exactly 0 on and outside
    the shape's edge, rises with a smoothstep over ``feather`` × crop size inward, and is exactly 1 inside.
    ``feather`` = 0 gives a hard edge.
    """
    if shape == "ellipse":
        inside = 0.5 - torch.linalg.vector_norm(uv - 0.5, dim=-1)
    elif shape == "rect":
        inside = torch.minimum(torch.minimum(uv[..., 0], 1.0 - uv[..., 0]), torch.minimum(uv[..., 1], 1.0 - uv[..., 1]))
    else:
        raise ValueError(f"mask shape must be 'ellipse' or 'rect', got {shape!r}")
    if feather <= 0:
        return (inside > 0).to(uv.dtype)
    return smoothstep(inside / feather)


def face_mask_in_crop(
    size: int,
    feather: float = PASTE_FEATHER,
    shape: str = "ellipse",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The paste mask sampled at the pixel centres of a size×size crop → [size,size] in [0,1]."""
    uv = _pixel_centres(0, 0, size, size, device=device) / size
    return face_mask_at(uv, feather, shape).to(dtype)


def _paste_region(aligned: AlignedFace, pad: int = 2) -> tuple[int, int, int, int]:
    """Integer pixel rectangle (x0, y0, x1, y1) of the photo covering the quad, grown by ``pad`` and clipped."""
    height, width = aligned.source_size
    lo = np.floor(aligned.quad.min(axis=0)).astype(int) - pad
    hi = np.ceil(aligned.quad.max(axis=0)).astype(int) + pad
    return max(lo[0], 0), max(lo[1], 0), min(hi[0], width), min(hi[1], height)


def _region_crop_coords(aligned: AlignedFace, region, device) -> torch.Tensor:
    x0, y0, x1, y1 = region
    centres = _pixel_centres(x0, y0, x1 - x0, y1 - y0, device=device)
    return _apply_affine_torch(aligned.inverse_matrix, centres)


def source_mask(
    aligned: AlignedFace,
    feather: float = PASTE_FEATHER,
    shape: str = "ellipse",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The paste mask warped into the photo → float32 [H,W] in [0,1], exactly 0 outside the pasted face region
    (the pixels :func:`paste_back` may change; the privacy report measures everything else)."""
    height, width = aligned.source_size
    mask = torch.zeros(height, width, dtype=torch.float32, device=device)
    x0, y0, x1, y1 = region = _paste_region(aligned)
    if x1 > x0 and y1 > y0:
        uv = _region_crop_coords(aligned, region, device) / aligned.size
        mask[y0:y1, x0:x1] = face_mask_at(uv, feather, shape).float()
    return mask


def paste_back(
    original,
    processed_crop: torch.Tensor,
    aligned: AlignedFace,
    feather: float = PASTE_FEATHER,
    shape: str = "ellipse",
) -> torch.Tensor:
    """Warp processed crop(s) back into the photo with a feathered mask.

    original: [H,W,3] in [0,1] (anything ``ensure_rgb`` accepts; must match ``aligned.source_size``).
    processed_crop: [S,S,3] or [B,S,S,3] in [0,1]; resized to ``aligned.size`` first when S differs.
    Returns float32 [H,W,3] or [B,H,W,3]. Pixels where the mask is 0 (everything outside the crop's
    ``shape``) are exactly the original; inside, out = (1−m)·original + m·warped crop.
    """
    base = ensure_rgb(original)
    batched = processed_crop.ndim == 4
    crops = processed_crop if batched else processed_crop.unsqueeze(0)
    out = paste_into(base.unsqueeze(0).repeat(crops.shape[0], 1, 1, 1), crops, aligned, feather, shape)
    return out if batched else out[0]


def paste_into(photos: torch.Tensor, crops: torch.Tensor, aligned: AlignedFace, feather: float = PASTE_FEATHER,
               shape: str = "ellipse") -> torch.Tensor:
    """:func:`paste_back` of crop b into photo b, for photos [B,H,W,3] float32 that already hold other faces'
    results (several faces of one photo are pasted one after the other). Writes into ``photos`` and returns it;
    pixels where this face's mask is 0 are not touched.

    Raises InvalidImageError when the photo size differs from the alignment's or the crops are not [B,S,S,3].
    """
    if tuple(photos.shape[1:3]) != tuple(aligned.source_size):
        raise InvalidImageError(
            f"The photo is {photos.shape[2]}×{photos.shape[1]} px but the face was aligned on a "
            f"{aligned.source_size[1]}×{aligned.source_size[0]} px photo."
        )
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2] or crops.shape[0] != photos.shape[0]:
        raise InvalidImageError(f"Expected processed crops [{photos.shape[0]},S,S,3], got shape {list(crops.shape)}.")
    crops = crops.to(device=photos.device, dtype=torch.float32).permute(0, 3, 1, 2)
    if crops.shape[-1] != aligned.size:
        crops = F.interpolate(crops, size=(aligned.size, aligned.size), mode="bilinear",
                              align_corners=False, antialias=crops.shape[-1] > aligned.size)
    x0, y0, x1, y1 = region = _paste_region(aligned)
    if x1 > x0 and y1 > y0:
        crop_coords = _region_crop_coords(aligned, region, photos.device)
        mask = face_mask_at(crop_coords / aligned.size, feather, shape).float()[None, :, :, None]
        grid = _normalised_grid(crop_coords, aligned.size, aligned.size).float()
        grid = grid.unsqueeze(0).expand(crops.shape[0], -1, -1, -1)
        warped = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
        warped = warped.permute(0, 2, 3, 1)
        patch = photos[:, y0:y1, x0:x1]
        blended = patch * (1.0 - mask) + warped * mask
        photos[:, y0:y1, x0:x1] = torch.where(mask > 0, blended, patch).clamp(0.0, 1.0)
    return photos


def match_seam_colour(crops: torch.Tensor, source: torch.Tensor, feather: float = PASTE_FEATHER) -> torch.Tensor:
    """Shift each generated crop's colour so that it agrees with the source crop on the paste seam.

    crops [B,S,S,3] and source [S,S,3] in [0,1]. The seam is the feathered ring of the paste mask
    (0 < m < 1), where the pasted face blends into the photo; each crop gets the per-channel offset
    mean(source on the ring) − mean(crop on the ring), clamped to [0,1]. With ``feather`` = 0 (no ring) the crops
    are returned unchanged. Returns float32 [B,S,S,3].
    """
    size = int(source.shape[0])
    mask = face_mask_in_crop(size, feather, device=crops.device)
    ring = (mask > 0) & (mask < 1)
    if not bool(ring.any()):
        return crops.float()
    offset = source.to(crops.device).float()[ring].mean(dim=0) - crops.float()[:, ring].mean(dim=1)  # [B,3]
    return (crops.float() + offset[:, None, None, :]).clamp(0.0, 1.0)


def obscure_face(photo: torch.Tensor, aligned: AlignedFace, kind: str) -> torch.Tensor:
    """A fallback for a face the method cannot process: the face region (the paste mask of its alignment,
    feathered) replaced by a strong blur or a solid fill of the region's mean colour.

    photo [H,W,3] in [0,1] (float32); kind "blur" (Gaussian, σ = 1/8 of the face's crop side in photo pixels,
    so no facial feature survives) or "fill". Pixels outside the mask are exactly the photo's. Returns a new
    [H,W,3] float32 tensor. Raises ValueError for another kind.
    """
    if kind not in ("blur", "fill"):
        raise ValueError(f"fallback must be 'blur' or 'fill', got {kind!r}")
    photo = photo.float()
    mask = source_mask(aligned, device=photo.device)[..., None]
    if not bool((mask > 0).any()):
        return photo.clone()
    if kind == "fill":
        weight = mask.sum()
        colour = (photo * mask).sum(dim=(0, 1)) / weight
        covered = colour.expand_as(photo)
    else:
        side = float(np.hypot(*(aligned.quad[3] - aligned.quad[0])))
        covered = gaussian_blur(photo, sigma=max(side / 8.0, 1.0))
    return torch.where(mask > 0, photo * (1.0 - mask) + covered * mask, photo)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [H,W,3] with standard deviation ``sigma`` px (kernel ±3σ, reflect padding;
    the radius is capped at the image's size minus one)."""
    height, width = int(image.shape[0]), int(image.shape[1])
    radius = max(1, min(int(math.ceil(3 * sigma)), height - 1, width - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    chw = image.permute(2, 0, 1).unsqueeze(0)
    chw = F.conv2d(F.pad(chw, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1),
                   groups=3)
    chw = F.conv2d(F.pad(chw, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1),
                   groups=3)
    return chw[0].permute(1, 2, 0)
