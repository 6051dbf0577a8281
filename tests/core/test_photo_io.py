"""core.photo_io: every pixel format decodes to RGB in [0, 1] with the right scale, upright, or fails with an
InvalidImageError naming the file. Expected values are computed here from the files' own numbers (numpy), not by
the decoder under test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InvalidImageError
from core.faces import MAX_LONG_SIDE, MIN_SHORT_SIDE
from core.photo_io import check_pixel_values, decode_photo, encode_png, load_photo, save_photo
from tests.support import photos

RNG = np.random.default_rng(0)


def _gray16(h=70, w=90) -> np.ndarray:
    return RNG.integers(0, 65536, size=(h, w), dtype=np.uint16)


def _write(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """The issue's near-white bug: 16-bit gray must be divided by 65535, not clipped at 255."""
    gray = _gray16()
    got = load_photo(_write(tmp_path, photos.png_by_hand(gray), "g16.png"))
    expected = torch.from_numpy(gray.astype(np.float64) / 65535.0).float()
    assert got.shape == (70, 90, 3) and got.dtype == torch.float32
    assert torch.allclose(got[..., 0], expected, atol=1e-6)
    assert torch.equal(got[..., 0], got[..., 1]) and torch.equal(got[..., 0], got[..., 2])
    assert 0.45 < float(got.mean()) < 0.55  # uniform noise, not near-white


def test_16_bit_rgb_and_rgba_keep_their_scale(tmp_path):
    rgb16 = RNG.integers(0, 65536, size=(66, 80, 3), dtype=np.uint16)
    got = load_photo(_write(tmp_path, photos.png_by_hand(rgb16), "rgb16.png"))
    # 8 bits per channel survive (Pillow keeps the high byte): within one 8-bit step of the 16-bit value
    assert (got - torch.from_numpy(rgb16 / 65535.0).float()).abs().max() < 1.0 / 255 + 1e-6
    rgba16 = np.dstack([rgb16, np.full((66, 80, 1), 65535, dtype=np.uint16)])
    opaque = load_photo(_write(tmp_path, photos.png_by_hand(rgba16), "rgba16.png"))
    assert torch.equal(opaque, got)


def test_gray_alpha_and_rgba_are_composited_over_white(tmp_path):
    rgb = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(64, 64, 1), dtype=np.uint8)
    a = alpha / 255.0
    got = load_photo(_write(tmp_path, photos.png_by_hand(np.dstack([rgb, alpha])), "rgba.png"))
    expected = rgb / 255.0 * a + (1 - a)
    assert np.abs(got.numpy() - expected).max() < 1e-6
    gray = rgb[..., :1]
    got = load_photo(_write(tmp_path, photos.png_by_hand(np.dstack([gray, alpha])), "la.png"))
    expected = gray / 255.0 * a + (1 - a)
    assert np.abs(got.numpy() - np.repeat(expected, 3, axis=2)).max() < 1e-6


def test_palette_with_a_transparent_index(tmp_path):
    from PIL import Image

    index = np.zeros((64, 64), dtype=np.uint8)
    index[:, 32:] = 1
    image = Image.fromarray(index, mode="L").convert("P")
    image.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    path = tmp_path / "p.png"
    image.save(path, transparency=1)
    got = load_photo(path)
    assert torch.allclose(got[0, 0], torch.tensor([200, 10, 10]) / 255.0)
    assert torch.equal(got[0, 40], torch.ones(3))  # the transparent colour becomes white
    opaque = tmp_path / "p_opaque.png"
    image.save(opaque)
    assert torch.allclose(load_photo(opaque)[0, 40], torch.tensor([10, 200, 10]) / 255.0)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr"])
def test_8_bit_modes_match_pillows_rgb_conversion(tmp_path, mode):
    """The 8-bit modes are Pillow's own RGB conversion / 255: what ComfyUI's Load Image produces too."""
    from PIL import Image

    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    path = _write(tmp_path, photos.encode(photos.astronaut()[:128, :96], fmt, mode=mode), f"m.{fmt.lower()}")
    with Image.open(path) as image:
        assert image.mode == mode or (mode == "YCbCr" and image.mode == "RGB")
        reference = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    assert np.array_equal(load_photo(path).numpy(), reference)


def test_32_bit_integer_and_float_images(tmp_path):
    import tifffile

    gray = _gray16(64, 64)
    path = tmp_path / "i32.tif"
    tifffile.imwrite(path, gray.astype(np.int32))
    assert np.abs(load_photo(path).numpy()[..., 0] - gray / 65535.0).max() < 1e-6
    tifffile.imwrite(tmp_path / "big.tif", gray.astype(np.int32) * 4)
    with pytest.raises(InvalidImageError, match=r"32-bit integer pixels from \d+ to \d+.*big\.tif|big\.tif.*32-bit"):
        load_photo(tmp_path / "big.tif")
    unit = (gray / 65535.0).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", unit)
    assert np.abs(load_photo(tmp_path / "f.tif").numpy()[..., 0] - unit).max() < 1e-7
    tifffile.imwrite(tmp_path / "f255.tif", unit * 255)
    with pytest.raises(InvalidImageError, match=r"f255\.tif.*must lie in \[0, 1\]"):
        load_photo(tmp_path / "f255.tif")


@pytest.mark.parametrize("tag", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_gives_the_upright_picture(tmp_path, tag, fmt):
    upright = photos.astronaut()[100:260, 150:250]  # not square: a wrong rotation changes the shape
    stored = photos.stored_for_orientation(upright, tag)
    save = {"lossless": True} if fmt == "WEBP" else {}
    path = _write(tmp_path, photos.encode(stored, fmt, exif=photos.exif_orientation_tag(tag), **save),
                  f"o{tag}.{fmt.lower()}")
    got = load_photo(path)
    assert got.shape == (160, 100, 3)
    assert np.array_equal((got.numpy() * 255).round().astype(np.uint8), upright)


def test_size_policy_is_checked_on_the_header_before_decoding(tmp_path, monkeypatch):
    """9000×9000 passes Pillow's own guard (89 M pixels) but not the size policy; 60000×60000 is stopped by Pillow
    at open. Neither is decoded, and both messages say what to do."""
    decoded = []
    from PIL import ImageFile

    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    big = _write(tmp_path, photos.png_header_claiming(9000, 9000), "big.png")
    with pytest.raises(InvalidImageError, match=rf"big\.png' is 9000×9000 px; its long side may be at most "
                                                rf"{MAX_LONG_SIDE} px"):
        load_photo(big)
    bomb = _write(tmp_path, photos.png_header_claiming(60000, 60000), "bomb.png")
    with pytest.raises(InvalidImageError, match=rf"bomb\.png' claims far more than {MAX_LONG_SIDE} px.*Downscale"):
        load_photo(bomb)
    assert decoded == []
    tiny = _write(tmp_path, photos.png_by_hand(np.zeros((16, 300, 3), np.uint8)), "strip.png")
    with pytest.raises(InvalidImageError, match=rf"300×16 px, too small.*at least {MIN_SHORT_SIDE} px"):
        load_photo(tiny)


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(InvalidImageError, match=r"'.*missing\.jpg' does not exist"):
        load_photo(tmp_path / "missing.jpg")
    with pytest.raises(InvalidImageError, match="is not a file"):
        load_photo(tmp_path)
    text = _write(tmp_path, b"just some text, not a picture", "notes.jpg")
    with pytest.raises(InvalidImageError, match=r"notes\.jpg' is not an image file Pillow can read"):
        load_photo(text)
    jpeg = photos.encode(photos.astronaut(), "JPEG", quality=90)
    cut = _write(tmp_path, jpeg[: len(jpeg) // 2], "cut.jpg")
    with pytest.raises(InvalidImageError, match=r"cut\.jpg' is damaged or truncated"):
        load_photo(cut)
    png = photos.png_by_hand(photos.astronaut())
    with pytest.raises(InvalidImageError, match="damaged or truncated"):
        load_photo(_write(tmp_path, png[: len(png) - 40_000], "cut.png"))


def test_decode_photo_takes_bytes_and_matches_load_photo(tmp_path):
    data = photos.encode(photos.astronaut(), "PNG")
    assert torch.equal(decode_photo(data), load_photo(_write(tmp_path, data, "a.png")))


def test_encode_png_round_trips_8_bit_values_without_metadata(tmp_path):
    from PIL import Image

    pixels = torch.from_numpy(photos.astronaut()).float() / 255.0
    path = save_photo(tmp_path / "out.png", pixels)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert not image.info.get("exif") and not image.text and "icc_profile" not in image.info
        assert np.array_equal(np.asarray(image), photos.astronaut())
    assert encode_png(pixels.clamp(0, 1)) == path.read_bytes()


def test_check_pixel_values_names_the_range():
    check_pixel_values(torch.rand(2, 8, 8, 3))
    with pytest.raises(InvalidImageError, match=r"photo at X has values from 0 to 6\.554e\+04"):
        check_pixel_values(torch.tensor([[0.0, 65535.0]]), "photo at X")
    with pytest.raises(InvalidImageError, match="NaN"):
        check_pixel_values(torch.tensor([float("nan")]))
