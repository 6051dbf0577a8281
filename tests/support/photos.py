"""Photo files for the input tests, written independently of the decoder under test.

* :func:`png_by_hand` writes PNGs from the PNG specification (signature, IHDR, zlib-compressed scanlines with
  filter 0, optional extra chunks, IEND) with ``zlib``/``struct`` only, so 16-bit grayscale, 16-bit RGB(A) and
  gray + alpha files do not depend on Pillow's writer (which cannot write most of them).
* :func:`stored_for_orientation` is the EXIF 2.3 definition of the Orientation tag written with numpy: the
  stored pixels that a viewer honouring tag ``t`` shows as ``upright``.
* :func:`exif_orientation_tag` puts an Orientation tag into a JPEG/PNG/WebP through Pillow's EXIF writer.

Real faces come from scikit-image's astronaut photo (one face, 512×512); no-face pictures from its other
sample images.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types by channel count: gray, gray + alpha, RGB, RGBA
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
ORIENTATION_TAG = 0x0112


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo: uint8 [512,512,3], one face (Eileen Collins), upright."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def coffee() -> np.ndarray:
    """scikit-image's coffee cup: uint8 [400,600,3], no face."""
    from skimage import data

    return np.ascontiguousarray(data.coffee())


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_by_hand(pixels: np.ndarray, *, extra_chunks: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """PNG bytes of ``pixels`` [H,W] or [H,W,C] (C = 1 … 4), uint8 (bit depth 8) or uint16 (bit depth 16,
    stored big-endian as the specification requires). ``extra_chunks`` go between IHDR and IDAT."""
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}[array.dtype]
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))  # filter type 0 on every scanline
    header = struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels], 0, 0, 0)
    body = _chunk(b"IHDR", header)
    for kind, payload in extra_chunks:
        body += _chunk(kind, payload)
    return PNG_SIGNATURE + body + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` 8-bit gray pixels but whose data holds one row: what a
    decompression bomb looks like to a reader that trusts the header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1), 9)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def stored_for_orientation(upright: np.ndarray, tag: int) -> np.ndarray:
    """The pixels a camera stores with EXIF Orientation ``tag`` for a scene that looks like ``upright`` [H,W,…].

    EXIF 2.3 names, for each tag, where the stored image's 0th row and 0th column appear on screen:
    1 top/left, 2 top/right (mirrored), 3 bottom/right (rotated 180°), 4 bottom/left (flipped), 5 left/top
    (transposed), 6 right/top (shown after turning 90° clockwise), 7 right/bottom (transverse), 8 left/bottom
    (shown after turning 90° counter-clockwise). The stored array is the inverse of that display transform.
    """
    a = np.asarray(upright)
    if tag == 1:
        out = a
    elif tag == 2:
        out = a[:, ::-1]
    elif tag == 3:
        out = a[::-1, ::-1]
    elif tag == 4:
        out = a[::-1, :]
    elif tag == 5:
        out = a.swapaxes(0, 1)
    elif tag == 6:
        out = np.rot90(a, 1)  # shown turned 90° clockwise, so stored turned 90° counter-clockwise
    elif tag == 7:
        out = a[::-1, ::-1].swapaxes(0, 1)
    elif tag == 8:
        out = np.rot90(a, -1)
    else:
        raise ValueError(f"EXIF orientation must be 1 … 8, got {tag}")
    return np.ascontiguousarray(out)


def exif_orientation_tag(tag: int) -> bytes:
    """The EXIF block (TIFF structure) holding only Orientation = ``tag``."""
    from PIL import Image

    exif = Image.Exif()
    exif[ORIENTATION_TAG] = tag
    return exif.tobytes()


def encode(pixels: np.ndarray, fmt: str, *, mode: str | None = None, **save) -> bytes:
    """Pillow-encoded bytes of uint8 ``pixels`` in format ``fmt`` (after ``convert(mode)`` when given)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def padded(pixels: np.ndarray, height: int, width: int, *, value: int = 128, top: int = 0, left: int = 0
           ) -> np.ndarray:
    """``pixels`` placed at (top, left) on a ``height``×``width`` canvas of grey ``value`` (cropped to fit)."""
    canvas = np.full((height, width, pixels.shape[2]), value, dtype=pixels.dtype)
    h, w = min(pixels.shape[0], height - top), min(pixels.shape[1], width - left)
    canvas[top:top + h, left:left + w] = pixels[:h, :w]
    return canvas
