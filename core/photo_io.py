"""Photo files in and out: the one decoder for every photo the pack reads from disk (the CLI, scripts, tests).

Pillow does all decoding; this module only chooses how each Pillow mode becomes float RGB in [0, 1]:

* The EXIF orientation tag is applied first (``PIL.ImageOps.exif_transpose``), so a phone photo whose pixels
  are stored sideways comes out upright, as ComfyUI's Load Image shows it.
* 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) are converted to RGB by
  Pillow and divided by 255. CMYK uses Pillow's conversion without colour management, exactly like
  ComfyUI's Load Image, so both paths see the same pixels; embedded ICC profiles are ignored by both.
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is divided by 65535; 32-bit integer
  grayscale (``I``, how some readers return 16-bit data) must hold 0 … 65535 and is divided by 65535 too;
  32-bit float grayscale (``F``) must already lie in [0, 1]. 16-bit RGB(A) PNG and TIFF files are reduced to
  8 bits per channel by Pillow itself (correctly scaled).
* Transparency (``RGBA``, ``LA``, ``PA``, a palette or ``L``/``RGB`` image with a transparent colour) is
  composited over white by :func:`core.faces.composite_to_rgb`, the policy the nodes apply to 4-channel
  IMAGEs. (ComfyUI's Load Image instead drops the alpha channel into its MASK output, so a node graph fed by
  Load Image sees the colour stored under transparent pixels.)
* Of a multi-frame file (GIF, multi-page TIFF, MPO) the first frame is used, as the nodes use the first image
  of a batch.
* The size policy (:func:`core.faces.check_image_size`) is checked on the header, before any pixel is
  decoded, which is also the decompression-bomb guard: nothing larger than
  :data:`core.faces.MAX_LONG_SIDE` per side is ever decoded.

Every failure raises :class:`core.errors.InvalidImageError` with a message that names the file and says what to
do. Photos are never written with metadata: :func:`save_photo` / :func:`encode_png` write plain PNGs.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidImageError
from .faces import MAX_LONG_SIDE, check_image_size, composite_to_rgb

#: Largest value of 16-bit samples (their scale to [0, 1]).
UINT16_MAX = 65535
#: Float photos may overshoot [0, 1] by this much (rounding in the program that wrote them).
FLOAT_TOLERANCE = 1e-3
#: Pillow modes whose 8-bit conversion to RGB loses nothing a face detector needs.
_CONVERT_TO_RGB = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"})
_CONVERT_TO_RGBA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: zlib level of written PNGs (lossless at every level; 4 is a good speed/size balance).
PNG_COMPRESS_LEVEL = 4


def check_pixel_values(image: torch.Tensor, what: str = "image") -> None:
    """Every value of a float image (any shape) is finite and within [0, 1] (± :data:`FLOAT_TOLERANCE`): the
    value range of ComfyUI's IMAGE and of :func:`load_photo`'s output, whatever bit depth the file had.

    Raises:
        InvalidImageError: naming ``what``, the range found and the likely cause.
    """
    if not torch.isfinite(image).all():
        raise InvalidImageError(f"The {what} contains NaN or infinite values.")
    lo, hi = float(image.min()), float(image.max())
    if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
        raise InvalidImageError(
            f"The {what} has values from {lo:.4g} to {hi:.4g}, but image values must lie in [0, 1]. It probably "
            f"comes from a loader or node that did not scale 16-bit or float pixels to [0, 1]; load the photo with "
            f"ComfyUI's Load Image instead.")


def _describe(path: Path) -> str:
    return f"The photo '{path}'"


def _has_transparency(image) -> bool:
    return "transparency" in image.info and image.mode in ("P", "L", "RGB")


def pil_to_float(image, what: str = "photo") -> np.ndarray:
    """One decoded Pillow image (orientation already applied) → float32 array [H,W,C] in [0,1], C in (1, 3, 4).

    Raises:
        InvalidImageError: a mode this policy does not read (naming ``what``), or 16/32-bit samples outside
            their documented ranges.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_GRAY:
        return (np.asarray(image, dtype=np.float32) / UINT16_MAX)[..., None]
    if mode == "I":
        values = np.asarray(image)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > UINT16_MAX:
            raise InvalidImageError(
                f"{what} has 32-bit integer pixels from {lo} to {hi}; only 0 … {UINT16_MAX} (16-bit data) can be "
                f"scaled to an image. Save it as an 8- or 16-bit PNG or JPEG first.")
        return (values.astype(np.float32) / UINT16_MAX)[..., None]
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise InvalidImageError(f"{what} has NaN or infinite pixel values. Save it as an 8- or 16-bit image.")
        lo, hi = float(values.min()), float(values.max())
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise InvalidImageError(
                f"{what} has floating-point pixels from {lo:.4g} to {hi:.4g}; float images must lie in [0, 1]. Save "
                f"it as an 8- or 16-bit PNG or JPEG first.")
        return np.clip(values, 0.0, 1.0)[..., None]
    if mode in _CONVERT_TO_RGBA or _has_transparency(image):
        return np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    if mode in _CONVERT_TO_RGB:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    raise InvalidImageError(f"{what} uses the pixel format {mode!r}, which cannot be read as a photo. Save it as an "
                            f"8-bit RGB PNG or JPEG first.")


def decode_photo(data: bytes | io.BufferedIOBase | str | os.PathLike, what: str = "photo") -> torch.Tensor:
    """Decode image bytes (or a file object or path) → float32 tensor [H,W,3] in [0,1], CPU, upright.

    ``what`` starts every error message (e.g. ``"The photo 'x.jpg'"``).

    Raises:
        InvalidImageError: not an image Pillow can read, a damaged or truncated file, a size outside
            :func:`core.faces.check_image_size` (checked before decoding), or a pixel format outside the module
            docstring's policy.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as image:
            width, height = image.size
            check_image_size(height, width, _lower(what))
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            pixels = pil_to_float(upright, what)
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{what} is not an image file Pillow can read (JPEG, PNG, WebP, TIFF, BMP, GIF, …). Check that it is "
            f"the photo and not another file with an image name, or convert it to PNG or JPEG.") from None
    except Image.DecompressionBombError:  # Pillow's own guard, at open, for headers far beyond the size policy
        raise InvalidImageError(
            f"{what} claims far more than {MAX_LONG_SIDE} px per side (Pillow refuses to decode it as a possible "
            f"decompression bomb). Downscale it so that no side exceeds {MAX_LONG_SIDE} px.") from None
    except InvalidImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise InvalidImageError(
            f"{what} is damaged or truncated and cannot be decoded ({type(exc).__name__}). Copy or export the "
            f"photo again.") from None
    return composite_to_rgb(torch.from_numpy(np.ascontiguousarray(pixels))).contiguous()


def _lower(what: str) -> str:
    """``"The photo 'x'"`` → ``"photo 'x'"``: check_image_size writes "The {what} is …"."""
    return what[4:] if what.startswith("The ") else what


def load_photo(path: str | os.PathLike) -> torch.Tensor:
    """Read a photo file → float32 tensor [H,W,3] in [0,1] on the CPU, upright (EXIF orientation applied).

    See the module docstring for how each pixel format is read. The file name appears only in error messages.

    Raises:
        InvalidImageError: the file does not exist or is a folder, cannot be read, is not an image, is damaged
            or truncated, is outside the size policy or has an unsupported pixel format; the message names
            the file.
    """
    path = Path(path)
    what = _describe(path)
    if not path.exists():
        raise InvalidImageError(f"{what} does not exist. Check the path (and its spelling).")
    if not path.is_file():
        raise InvalidImageError(f"{what} is not a file. Give the path of one image file.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{what} cannot be read ({exc.strerror or type(exc).__name__}).") from None
    return decode_photo(data, what)


def encode_png(image: torch.Tensor) -> bytes:
    """Image [H,W,3] (or [H,W,1], [H,W,4]) float in [0,1] → PNG bytes, 8-bit RGB, rounded, with no metadata
    (no text chunk, no EXIF, no ICC profile: nothing that could name the source or the settings)."""
    from PIL import Image

    rgb = composite_to_rgb(image.detach().float().cpu())
    pixels = (np.clip(rgb.numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def save_photo(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write ``image`` ([H,W,3] float in [0,1]) as a metadata-free PNG (:func:`encode_png`) to ``path``, replacing
    an existing file. Returns the path. Raises OSError from writing."""
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path
