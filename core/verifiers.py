"""Face verifiers: recognizers that score a result against its source *after* sampling.

The guidance optimises the result against one recognizer, so that recognizer is the one check an adversarial
optimisation is sure to pass. A verifier is any other recognizer the user has configured; the identity gate
(core/gate.py) releases a result only when every verifier agrees it no longer matches. Two kinds exist:

* :class:`RecognizerVerifier` — FaceNet or ArcFace (core/recognizers.py) used as an independent judge, e.g.
  ArcFace verifying a FaceNet-guided run;
* :class:`SFaceVerifier` — OpenCV's SFace recognizer with its YuNet detector (ONNX models run by
  ``cv2.FaceRecognizerSF`` / ``cv2.FaceDetectorYN``). A different architecture trained on different data:
  the strongest independent check this pack offers. OpenCV stays an optional dependency; without ``cv2``
  :func:`load_sface` raises :class:`VerifierUnavailableError` naming the package to install.

Images are float tensors [H,W,3] (or [B,H,W,3]) in [0,1], RGB — aligned face crops or photos.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .autograd import normal_tensors
from .errors import DiffPrivacyError, FaceNotFoundError, WeightsNotFoundError
from .recognizers import FaceCrop, FaceRecognizer, reference_embedding

#: OpenCV Zoo's published same-person threshold for SFace cosine similarity (face_recognition_sface README,
#: and ``cv2.FaceRecognizerSF`` documentation): cos ≥ 0.363 means "same person".
SFACE_COSINE_THRESHOLD = 0.363
#: YuNet's default score threshold in OpenCV Zoo's demo.
YUNET_SCORE_THRESHOLD = 0.6
YUNET_NMS_THRESHOLD = 0.3
#: File name patterns the loader looks for in a models folder (fp32 or int8 variants).
SFACE_PATTERN = "face_recognition_sface*.onnx"
YUNET_PATTERN = "face_detection_yunet*.onnx"


class VerifierUnavailableError(DiffPrivacyError):
    """A verifier cannot run here (its optional package or model file is missing)."""


class Verifier(Protocol):
    """Scores results against their source with a recognizer that did not guide the sampling.

    ``name`` appears in reports and errors; ``bound`` is the cosine similarity at or above which the verifier
    says "same person" (an anonymized result must stay below it).
    """

    name: str
    bound: float

    def similarities(self, source: torch.Tensor, results: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each result [B,H,W,3] to ``source`` [H,W,3] → float32 CPU [B]."""

    def faces_detected(self, results: torch.Tensor) -> list[bool]:
        """Whether a face is still detected in each result [B,H,W,3] (the photo still shows a person)."""


def _batch(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(0) if images.dim() == 3 else images


def _to_model(images_bhwc: torch.Tensor) -> torch.Tensor:
    return images_bhwc.permute(0, 3, 1, 2).float() * 2.0 - 1.0


# ------------------------------------------------------------------------------------ FaceNet / ArcFace
@dataclass
class RecognizerVerifier:
    """A FaceNet / ArcFace recognizer used as a verifier, with its crop and the user's bound."""

    recognizer: FaceRecognizer
    crop: FaceCrop
    bound: float

    @property
    def name(self) -> str:
        return self.recognizer.name

    def similarities(self, source: torch.Tensor, results: torch.Tensor) -> torch.Tensor:
        f_src = reference_embedding(self.recognizer, self.crop, _to_model(_batch(source)))
        with normal_tensors(grad=False):
            images = _to_model(_batch(results)).to(self.recognizer.device)
            f = F.normalize(self.recognizer(self.crop(images)).float(), dim=1)
        return (f @ f_src.to(f.device).T).squeeze(1).cpu()

    def faces_detected(self, results: torch.Tensor) -> list[bool]:
        from .faces import detect_faces
        return [bool(detect_faces(image)) for image in _batch(results)]


# ---------------------------------------------------------------------------------------- OpenCV SFace
def _cv2():
    try:
        import cv2
    except ImportError:
        raise VerifierUnavailableError(
            "SFace verification needs OpenCV: install 'opencv-python-headless' (or 'opencv-python') into the "
            "Python that runs ComfyUI. It is optional, so the pack does not install it.") from None
    return cv2


def _bgr_uint8(image: torch.Tensor) -> np.ndarray:
    rgb = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


class SFaceVerifier:
    """OpenCV SFace (recognition) + YuNet (detection) as an independent verifier.

    ``similarities`` detects the source's largest face and scores each result by the *highest* similarity over
    every face YuNet finds in it and the source's own face geometry (the method keeps pose and layout). Taking
    the worst case fails closed: a result cannot escape the gate by hiding its face from the detector or by
    showing the person somewhere else.

    Args:
        recognizer_file: SFace ONNX file (``face_recognition_sface_2021dec.onnx``, Apache-2.0, OpenCV Zoo).
        detector_file: YuNet ONNX file (``face_detection_yunet_2023mar.onnx``, MIT, OpenCV Zoo).
        bound: cosine at or above which SFace says "same person" (default: OpenCV's 0.363).

    Raises:
        VerifierUnavailableError: without ``cv2``. WeightsNotFoundError: a file is missing.
    """

    name = "sface"

    def __init__(self, recognizer_file: str | Path, detector_file: str | Path,
                 bound: float = SFACE_COSINE_THRESHOLD, score_threshold: float = YUNET_SCORE_THRESHOLD):
        cv2 = _cv2()
        for path in (recognizer_file, detector_file):
            if not Path(path).is_file():
                raise WeightsNotFoundError(f"SFace verifier file not found: {Path(path).name}")
        self.bound = float(bound)
        self._cv2 = cv2
        self._detector_file = str(detector_file)
        self._score_threshold = float(score_threshold)
        self._recognizer = cv2.FaceRecognizerSF.create(str(recognizer_file), "")
        self._detectors: dict[tuple[int, int], object] = {}

    def detect(self, image: torch.Tensor) -> np.ndarray:
        """YuNet rows [N,15] (box x, y, w, h; five landmarks; score) for one image [H,W,3], largest first."""
        bgr = _bgr_uint8(image)
        return self._detect_bgr(bgr)

    def _detect_bgr(self, bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        detector = self._detectors.get((w, h))
        if detector is None:
            detector = self._cv2.FaceDetectorYN.create(self._detector_file, "", (w, h), self._score_threshold,
                                                       YUNET_NMS_THRESHOLD, 5000)
            self._detectors[(w, h)] = detector
        _, rows = detector.detect(bgr)
        if rows is None:
            return np.zeros((0, 15), dtype=np.float32)
        return rows[np.argsort(-(rows[:, 2] * rows[:, 3]))]

    def _feature(self, bgr: np.ndarray, row: np.ndarray) -> np.ndarray:
        return self._recognizer.feature(self._recognizer.alignCrop(bgr, row)).reshape(-1).astype(np.float64)

    def similarities(self, source: torch.Tensor, results: torch.Tensor) -> torch.Tensor:
        src_bgr = _bgr_uint8(source)
        rows = self._detect_bgr(src_bgr)
        if len(rows) == 0:
            raise FaceNotFoundError("The SFace verifier finds no face in the source image, so it cannot check "
                                    "the results; nothing was output.")
        anchor = rows[0]
        f_src = self._feature(src_bgr, anchor)
        scores = []
        for image in _batch(results):
            bgr = _bgr_uint8(image)
            candidates = [anchor, *self._detect_bgr(bgr)]
            features = np.stack([self._feature(bgr, row) for row in candidates])
            cosines = features @ f_src / (np.linalg.norm(features, axis=1) * np.linalg.norm(f_src) + 1e-12)
            scores.append(float(cosines.max()))
        return torch.tensor(scores, dtype=torch.float32)

    def faces_detected(self, results: torch.Tensor) -> list[bool]:
        return [len(self.detect(image)) > 0 for image in _batch(results)]


def find_sface_files(folders: Sequence[str | Path]) -> tuple[Path, Path] | None:
    """(SFace file, YuNet file) from the first folder holding both, preferring fp32 over int8; else None."""
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        recognizers = sorted(folder.glob(SFACE_PATTERN), key=lambda p: ("int8" in p.name, p.name))
        detectors = sorted(folder.glob(YUNET_PATTERN), key=lambda p: ("int8" in p.name, p.name))
        if recognizers and detectors:
            return recognizers[0], detectors[0]
    return None


def require_sface(folders: Sequence[str | Path]) -> tuple[Path, Path]:
    """(SFace file, YuNet file) that :func:`load_sface` would use, checked without loading them.

    Raises:
        VerifierUnavailableError: without ``cv2``. WeightsNotFoundError: naming the folders and the files.
    """
    _cv2()
    found = find_sface_files(folders)
    if found is None:
        names = ", ".join(str(f) for f in folders) or "(no folder)"
        raise WeightsNotFoundError(
            f"SFace verifier files not found in {names}: put 'face_recognition_sface_2021dec.onnx' and "
            "'face_detection_yunet_2023mar.onnx' (OpenCV Zoo) there.")
    return found


def sface_available(folders: Sequence[str | Path]) -> bool:
    """Whether :func:`load_sface` can load from ``folders``: ``cv2`` imports and both files are there."""
    try:
        require_sface(folders)
    except (VerifierUnavailableError, WeightsNotFoundError):
        return False
    return True


def load_sface(folders: Sequence[str | Path], bound: float = SFACE_COSINE_THRESHOLD) -> SFaceVerifier:
    """The SFace verifier from the first of ``folders`` that holds both ONNX files.

    Raises:
        VerifierUnavailableError: without ``cv2``. WeightsNotFoundError: naming the folders and the files.
    """
    recognizer_file, detector_file = require_sface(folders)
    return SFaceVerifier(recognizer_file, detector_file, bound=bound)
