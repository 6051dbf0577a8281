"""Faces in ordinary photos: validation, MTCNN detection, FFHQ alignment and feathered paste-back.

Real photos come from scikit-image's bundled samples (astronaut: one face; coffee, rocket: none).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from core.errors import FaceNotFoundError, InvalidImageError, MultipleFacesError
from core.faces import (
    AlignedFace,
    align_face,
    detect_faces,
    ensure_rgb,
    face_mask_at,
    face_mask_in_crop,
    ffhq_quad,
    paste_back,
    single_face,
    source_mask,
)
from tests.support.faces import crop_to_source, source_to_crop


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(astronaut):
    return single_face(astronaut)


@pytest.fixture(scope="module")
def aligned(astronaut, astronaut_face) -> AlignedFace:
    return align_face(torch.from_numpy(astronaut).float() / 255.0, astronaut_face.landmarks, size=512)


def _resize_uint8(image: np.ndarray, factor: float) -> np.ndarray:
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, scale_factor=factor, mode="area")
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

def test_ensure_rgb_converts_layouts():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(70, 90, 3, generator=gen)
    torch.testing.assert_close(ensure_rgb(rgb), rgb)
    torch.testing.assert_close(ensure_rgb(rgb[None]), rgb)  # ComfyUI IMAGE batch of one
    u8 = (rgb * 255).round().to(torch.uint8).numpy()
    torch.testing.assert_close(ensure_rgb(u8), torch.from_numpy(u8).float() / 255)
    gray = rgb[..., 0]
    out = ensure_rgb(gray)
    assert out.shape == (70, 90, 3) and torch.equal(out[..., 0], gray) and torch.equal(out[..., 2], gray)
    assert torch.equal(ensure_rgb(gray[..., None]), out)
    alpha = torch.zeros(70, 90, 1)
    alpha[10:60, 10:80] = 1.0
    rgba = ensure_rgb(torch.cat([rgb, alpha], dim=-1))
    torch.testing.assert_close(rgba[20:50, 20:70], rgb[20:50, 20:70])
    assert torch.equal(rgba[:5], torch.ones(5, 90, 3))  # transparent → white
    half = ensure_rgb(torch.cat([torch.zeros(70, 90, 3), torch.full((70, 90, 1), 0.25)], dim=-1))
    torch.testing.assert_close(half, torch.full((70, 90, 3), 0.75))


def test_ensure_rgb_rejects_bad_images():
    with pytest.raises(InvalidImageError, match=r"32×32.*at least 64"):
        ensure_rgb(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(InvalidImageError, match=r"at most 8192"):
        ensure_rgb(np.zeros((64, 8200, 3), dtype=np.uint8))
    nan = torch.rand(80, 80, 3)
    nan[3, 4, 1] = float("nan")
    with pytest.raises(InvalidImageError, match="NaN"):
        ensure_rgb(nan)
    with pytest.raises(InvalidImageError, match=r"\[0, 1\]"):
        ensure_rgb(torch.full((80, 80, 3), 200.0))
    with pytest.raises(InvalidImageError, match="C in"):
        ensure_rgb(torch.rand(80, 80, 2))
    with pytest.raises(InvalidImageError, match="batch of 2"):
        ensure_rgb(torch.rand(2, 80, 80, 3))


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------

def test_mtcnn_finds_the_astronaut(astronaut):
    found = detect_faces(astronaut)
    assert len(found) == 1
    face = found[0]
    assert face.prob > 0.9
    x0, y0, x1, y1 = face.box
    assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 200 and face.width > 60
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float64
    assert np.all((lm[:, 0] > x0) & (lm[:, 0] < x1) & (lm[:, 1] > y0) & (lm[:, 1] < y1))
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left eye/mouth corner left of the right ones
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above nose above mouth


def test_float_tensor_input_gives_same_detection(astronaut, astronaut_face):
    face = single_face(torch.from_numpy(astronaut).float() / 255.0)
    np.testing.assert_allclose(face.box, astronaut_face.box, atol=1e-3)


@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_no_face_raises(name):
    with pytest.raises(FaceNotFoundError, match="No face found in the source image"):
        single_face(getattr(data, name)())


def test_two_people_raise(astronaut):
    pair = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    assert len(detect_faces(pair)) == 2
    with pytest.raises(MultipleFacesError, match="2 faces"):
        single_face(pair)


def test_small_background_face_is_ignored(astronaut, astronaut_face):
    small = _resize_uint8(astronaut, 0.4)  # its face has 16 % of the main face's area
    canvas = np.full((512, 512 + small.shape[1], 3), 128, dtype=np.uint8)
    canvas[:, :512] = astronaut
    canvas[300:300 + small.shape[0], 512:] = small
    found = detect_faces(canvas)
    assert len(found) == 2 and found[1].area < 0.25 * found[0].area
    face = single_face(canvas)
    assert _iou(face.box, astronaut_face.box) > 0.9  # the pyramid scales differ with the canvas size


def test_grayscale_and_rgba_photos_are_accepted(astronaut):
    gray = astronaut.astype(np.float32).mean(axis=-1) / 255.0
    assert single_face(gray).prob > 0.9
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert single_face(rgba).prob > 0.9


# ---------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------

def test_ffhq_quad_hand_computed():
    # eye_avg (50, 50), eye_to_eye (20, 0), eye_to_mouth (0, 20): x = (20,0) − (−20,0) = (40,0) → scaled
    # to max(2·20, 1.8·20) = 40; y = (0, 40); c = (50, 52).
    lm = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], dtype=np.float64)
    expected = np.array([[10, 12], [10, 92], [90, 92], [90, 12]], dtype=np.float64)
    np.testing.assert_allclose(ffhq_quad(lm), expected, atol=1e-12)
    # Rotating the landmarks rotates the quad.
    angle = np.deg2rad(30.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(ffhq_quad(lm @ rot.T), expected @ rot.T, atol=1e-9)


def test_align_face_samples_along_the_matrix():
    # A linear ramp is reproduced exactly by bilinear sampling, so every crop pixel must equal the ramp at
    # the source point its centre maps to.
    h = w = 256
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    ramp = torch.stack([0.1 + 0.6 * xs / w, 0.2 + 0.5 * ys / h, 0.3 + 0.3 * xs / w + 0.3 * ys / h], dim=-1)
    lm = np.array([[110, 120], [140, 112], [127, 135], [116, 150], [142, 144]], dtype=np.float64)
    face = align_face(ramp, lm, size=64)
    assert face.crop.shape == (64, 64, 3) and face.source_size == (256, 256) and face.size == 64
    v, u = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5, indexing="ij")
    src = crop_to_source(face, np.stack([u, v], axis=-1))
    assert src.min() > 1 and src.max() < 255  # the quad lies inside the photo
    expected = np.stack([0.1 + 0.6 * src[..., 0] / w, 0.2 + 0.5 * src[..., 1] / h,
                         0.3 + 0.3 * src[..., 0] / w + 0.3 * src[..., 1] / h], axis=-1)
    np.testing.assert_allclose(face.crop.numpy(), expected, atol=2e-6)
    # The matrix sends the crop corners to the quad and inverts cleanly.
    corners = np.array([[0, 0], [0, 64], [64, 64], [64, 0]], dtype=np.float64)
    np.testing.assert_allclose(crop_to_source(face, corners), face.quad, atol=1e-9)
    np.testing.assert_allclose(source_to_crop(face, face.quad), corners, atol=1e-9)


def test_aligned_astronaut_is_upright_and_centred(aligned, astronaut_face):
    assert aligned.crop.shape == (512, 512, 3)
    assert 0.0 <= float(aligned.crop.min()) and float(aligned.crop.max()) <= 1.0
    eyes = source_to_crop(aligned, astronaut_face.landmarks[:2])
    mouth = source_to_crop(aligned, astronaut_face.landmarks[3:]).mean(axis=0)
    assert abs(eyes[0, 1] - eyes[1, 1]) < 0.03 * 512  # eyes level
    assert abs(eyes.mean(axis=0)[0] - 256) < 0.03 * 512 and abs(mouth[0] - 256) < 0.05 * 512
    assert eyes[:, 1].mean() < 256 < mouth[1]


def test_large_face_is_shrunk_before_sampling(astronaut, astronaut_face):
    # The same face aligned to 64 px (quad ~167 px → shrink by 2) matches a 512 alignment box-filtered to 64.
    small = align_face(astronaut, astronaut_face.landmarks, size=64)
    big = align_face(astronaut, astronaut_face.landmarks, size=512)
    reference = F.avg_pool2d(big.crop.permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0)
    assert float((small.crop - reference).abs().mean()) < 0.015


# ---------------------------------------------------------------------------------------------------------
# Paste-back
# ---------------------------------------------------------------------------------------------------------

def test_face_mask_in_crop():
    mask = face_mask_in_crop(100, feather=0.1)
    assert mask.shape == (100, 100) and mask.dtype == torch.float32
    assert float(mask.min()) == 0.0 and float(mask.max()) == 1.0
    assert mask[0, 0] == 0 and mask[10, 10] == 0 and mask[50, 50] == 1 and mask[50, 12] == 1
    assert 0 < float(mask[0, 50]) < 0.01  # the disc touches the crop edge at the middle of each side
    torch.testing.assert_close(mask, mask.flip(0))
    torch.testing.assert_close(mask, mask.T)
    row = mask[50, :50]
    assert torch.all(row[1:] >= row[:-1])  # rises monotonically towards the centre
    assert 0 < float(mask[50, 3]) < 1
    rect = face_mask_in_crop(100, feather=0.1, shape="rect")
    assert 0 < float(rect[0, 0]) < 0.01 and rect[10, 10] == 1 and 0 < float(rect[5, 50]) < 1
    outside = torch.tensor([[-0.01, 0.5], [0.5, 1.0], [1.2, -3.0], [0.5, 1.001]], dtype=torch.float64)
    for shape in ("ellipse", "rect"):
        assert torch.equal(face_mask_at(outside, 0.1, shape), torch.zeros(4, dtype=torch.float64))
    hard = face_mask_in_crop(100, feather=0.0)
    assert set(hard.unique().tolist()) == {0.0, 1.0}


def test_paste_back_of_unmodified_crop_reproduces_photo(astronaut, aligned):
    original = ensure_rgb(astronaut)
    out = paste_back(original, aligned.crop, aligned)
    mask = source_mask(aligned)
    diff = (out - original).abs()
    # Two bilinear resamplings (photo → 512 crop → photo) blur slightly: mean error 0.0045 measured.
    assert float(diff[mask == 1].mean()) < 0.01
    assert int((mask == 1).sum()) > 10_000
    assert float(diff[mask == 0].max()) == 0.0
    # Outside the quad's bounding box grown by 3 px nothing changes, bit for bit.
    x0, y0 = np.floor(aligned.quad.min(axis=0)).astype(int) - 3
    x1, y1 = np.ceil(aligned.quad.max(axis=0)).astype(int) + 3
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[max(y0, 0):y1, max(x0, 0):x1] = False
    assert int(outside.sum()) > 100_000
    assert torch.equal(out[outside], original[outside])


def test_paste_back_solid_colour(astronaut, aligned):
    original = ensure_rgb(astronaut)
    red = torch.zeros(256, 256, 3)
    red[..., 0] = 1.0
    out = paste_back(original, red, aligned)
    mask = source_mask(aligned)
    face = mask == 1
    torch.testing.assert_close(out[face], red[0, 0].expand(int(face.sum()), 3), atol=1e-6, rtol=0)
    edge = (mask > 0) & (mask < 1)
    expected_edge = original[edge] * (1 - mask[edge, None]) + red[0, 0] * mask[edge, None]
    torch.testing.assert_close(out[edge], expected_edge, atol=1e-5, rtol=0)
    for corner in (out[:40, :40], out[:40, -40:], out[-40:, :40], out[-40:, -40:]):
        assert corner.shape == (40, 40, 3)
    assert torch.equal(out[:40, :40], original[:40, :40]) and torch.equal(out[-40:, -40:], original[-40:, -40:])
    assert torch.equal(out[mask == 0], original[mask == 0])


def test_paste_back_batch(astronaut, aligned):
    original = ensure_rgb(astronaut)
    gen = torch.Generator().manual_seed(1)
    crops = torch.rand(2, 128, 128, 3, generator=gen)
    out = paste_back(original, crops, aligned, feather=0.05)
    assert out.shape == (2, 512, 512, 3)
    for i in range(2):
        torch.testing.assert_close(out[i], paste_back(original, crops[i], aligned, feather=0.05))
    assert not torch.allclose(out[0], out[1])


def test_paste_back_rejects_other_photo(aligned):
    with pytest.raises(InvalidImageError, match="aligned on a 512×512"):
        paste_back(torch.rand(300, 400, 3), aligned.crop, aligned)


def test_pipeline_runs_under_inference_mode(astronaut, monkeypatch):
    """ComfyUI runs nodes under torch.inference_mode(): detection, alignment and paste-back must work there,
    and an MTCNN first built there must hold normal tensors."""
    import core.faces as faces_module

    monkeypatch.setattr(faces_module, "_MTCNN_CACHE", {})
    with torch.inference_mode():
        image = torch.from_numpy(astronaut).float() / 255.0
        face = single_face(image)
        al = align_face(image, face, size=256)
        out = paste_back(image, al.crop, al)
        mtcnn = faces_module.get_mtcnn("cpu")
    assert not any(p.is_inference() for p in mtcnn.parameters())
    assert face.prob > 0.9 and out.shape == (512, 512, 3)
    inside = source_mask(al) == 1
    assert float((out - image).abs()[inside].mean()) < 0.01
