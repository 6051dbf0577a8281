"""Which faces of a photo get protected: detection of every face, the user's selection, what cannot be processed.

Every face the detector finds gets exactly one decision (:class:`PlannedFace.action`):

* ``protect``: the full method runs on it;
* ``skip``: left as it is *because the selection says so* (largest only, by number, by reference photo);
* ``fallback``: selected but not processable by the method (too small to align, cut by the border), and the
  user chose a fallback ("blur" or "fill"), so its region is obscured instead;
* ``unprocessable``: selected, not processable, no fallback chosen: :func:`plan_faces` raises
  :class:`UnprocessableFacesError` listing these faces. Nothing is ever dropped silently.

Faces are numbered 1, 2, … in reading order (:func:`core.faces.reading_order`); :func:`draw_face_numbers`
draws those numbers on the photo so people can pick faces by number before the expensive steps run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import faces
from .errors import FaceNotFoundError, InvalidImageError, ProtectionFailedError

#: Selection modes: every face (default), the largest, by number, faces matching a reference photo, every face
#: except those matching a reference photo ("everyone but me").
SELECTION_MODES = ("all", "largest", "index", "match_reference", "except_reference")
#: What happens to a selected face the method cannot process.
FALLBACKS = ("fail", "blur", "fill")
#: A face whose box is narrower than this (photo pixels) is too small for the method: its 512 px aligned crop
#: would be a > 16× upscale of a face whose landmarks are off by whole pixels. MTCNN finds faces from ~20 px.
MIN_FACE_SIDE = 32
#: A face is cut by the border beyond repair when less than this fraction of its FFHQ crop lies inside the photo
#: (the reflection padding of the alignment then invents most of the face) or an eye is outside the photo.
MIN_INSIDE_FRACTION = 0.5
#: Default cosine similarity at which a face counts as the reference person (the pipeline's identity bound).
DEFAULT_MATCH_THRESHOLD = 0.5


class UnprocessableFacesError(ProtectionFailedError):
    """Selected faces cannot be processed and no fallback was chosen; the message lists them and why."""


class NoFaceSelectedError(FaceNotFoundError):
    """Faces were found, but the selection leaves none to protect."""


@dataclass(frozen=True)
class FaceSelection:
    """Which detected faces to protect, and what to do with the ones the method cannot process.

    Attributes:
        mode: one of :data:`SELECTION_MODES`.
        numbers: face numbers (1-based, reading order) for mode "index".
        threshold: cosine similarity in [−1, 1] at or above which a face matches the reference photo (modes
            "match_reference" / "except_reference"); None = the judge's own same-person bound (SFace: OpenCV's
            0.363; the guiding recognizer: :data:`DEFAULT_MATCH_THRESHOLD`).
        fallback: one of :data:`FALLBACKS`; "fail" (default) refuses the photo when a selected face cannot be
            processed.
        min_face_side: box width in photo pixels below which a face is too small for the method (≥ 1).
        min_confidence: detection probability in (0, 1] a face needs.

    Raises:
        ValueError: on a value outside those sets and ranges (when constructed).
    """

    mode: str = "all"
    numbers: tuple[int, ...] = ()
    threshold: Optional[float] = None
    fallback: str = "fail"
    min_face_side: float = MIN_FACE_SIDE
    min_confidence: float = faces.MIN_FACE_PROBABILITY

    def __post_init__(self):
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"face selection must be one of {SELECTION_MODES}, got {self.mode!r}")
        numbers = tuple(int(n) for n in self.numbers)
        if any(n < 1 for n in numbers):
            raise ValueError(f"face numbers start at 1, got {list(numbers)}")
        object.__setattr__(self, "numbers", numbers)
        if self.mode == "index" and not numbers:
            raise ValueError("face selection 'index' needs at least one face number (e.g. 1,3)")
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise ValueError(f"match threshold must be in [-1, 1], got {self.threshold}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not (math.isfinite(self.min_face_side) and self.min_face_side >= 1):
            raise ValueError(f"min_face_side must be ≥ 1 px, got {self.min_face_side}")
        if not 0.0 < self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in (0, 1], got {self.min_confidence}")

    @property
    def needs_reference(self) -> bool:
        return self.mode in ("match_reference", "except_reference")

    @staticmethod
    def parse_numbers(text: str) -> tuple[int, ...]:
        """"1, 3,4" → (1, 3, 4); ranges "2-4" allowed. Raises ValueError naming the bad part."""
        numbers: list[int] = []
        for part in (p.strip() for p in str(text).replace(";", ",").split(",")):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(v) for v in part.split("-", 1))
                    numbers.extend(range(lo, hi + 1))
                else:
                    numbers.append(int(part))
            except ValueError:
                raise ValueError(f"face numbers must look like 1,3 or 2-4; cannot read {part!r}") from None
        return tuple(dict.fromkeys(numbers))


@dataclass(frozen=True, eq=False)
class PlannedFace:
    """One detected face and its decision. ``number`` is 1-based in reading order; ``reason`` says why a face is
    skipped or not processable (empty for protected faces); ``similarity`` is the cosine to the reference photo
    when a reference mode ran."""

    number: int
    detection: faces.FaceDetection
    action: str
    reason: str = ""
    similarity: Optional[float] = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.detection.box


@dataclass(frozen=True)
class FacePlan:
    """Every detected face of one photo with its decision, in reading order, and how faces marked "fallback" are
    obscured ("blur" or "fill"; "fail" when the selection chose no fallback)."""

    faces: tuple[PlannedFace, ...]
    photo_size: tuple[int, int]
    fallback: str = "fail"

    def with_action(self, action: str) -> list[PlannedFace]:
        return [f for f in self.faces if f.action == action]

    def summary(self) -> str:
        """One line per face, e.g. "face 2: skipped (not the largest face)"."""
        words = {"protect": "protected", "skip": "left alone", "fallback": "obscured", "unprocessable": "NOT processable"}
        return "\n".join(f"face {f.number}: {words[f.action]}" + (f" ({f.reason})" if f.reason else "")
                         for f in self.faces)


def processing_problem(detection: faces.FaceDetection, photo_size: tuple[int, int], min_face_side: float) -> str:
    """Why the method cannot process this face ("" when it can): too small, or cut by the border beyond repair."""
    height, width = photo_size
    if detection.width < min_face_side:
        return f"too small: {detection.width:.0f} px wide, the method needs at least {min_face_side:.0f} px"
    eyes = detection.landmarks[:2]
    if not bool(np.all((eyes >= 0) & (eyes < np.array([width, height])))):
        return "cut by the photo border: an eye is outside the photo"
    quad = faces.ffhq_quad(detection.landmarks)
    inside = _quad_fraction_inside(quad, width, height)
    if inside < MIN_INSIDE_FRACTION:
        return f"cut by the photo border: only {inside:.0%} of the face's crop lies inside the photo"
    return ""


def _quad_fraction_inside(quad: np.ndarray, width: int, height: int, samples: int = 32) -> float:
    """Fraction of the quad's area inside the photo, from a samples×samples grid of points across the quad."""
    u = (np.arange(samples) + 0.5) / samples
    uu, vv = np.meshgrid(u, u, indexing="xy")
    top_left, bottom_left, _, top_right = quad
    points = top_left + uu[..., None] * (top_right - top_left) + vv[..., None] * (bottom_left - top_left)
    inside = (points[..., 0] >= 0) & (points[..., 0] < width) & (points[..., 1] >= 0) & (points[..., 1] < height)
    return float(inside.mean())


def plan_faces(photo: torch.Tensor, selection: FaceSelection = FaceSelection(), *,
               detections: Optional[Sequence[faces.FaceDetection]] = None,
               similarities: Optional[Sequence[float]] = None) -> FacePlan:
    """Detect every face of ``photo`` [H,W,3] in [0,1] and decide for each (see the module docstring).

    ``detections``: reuse an earlier detection (any order); ``similarities``: per face in reading order, the
    cosine to the reference photo (required by the reference modes; see :func:`reference_similarities`).

    Raises:
        FaceNotFoundError: no face at all.
        NoFaceSelectedError: the selection leaves no face to protect (e.g. a number larger than the face count,
            no face matches the reference, or everyone matches it in "except_reference").
        UnprocessableFacesError: selected faces the method cannot process, fallback "fail"; lists every one.
        ValueError: a reference mode without ``similarities`` (or of the wrong length).
    """
    photo = faces.ensure_rgb(photo)
    size = (int(photo.shape[0]), int(photo.shape[1]))
    found = detections if detections is not None else faces.detect_faces(photo, selection.min_confidence)
    if not found:
        raise FaceNotFoundError(
            f"No face found in the photo (detection probability ≥ {selection.min_confidence}); faces smaller than "
            f"about 20 px (after downscaling photos over {faces.DETECT_MAX_SIDE} px) are not detected.")
    ordered = faces.reading_order(list(found))
    if selection.needs_reference and (similarities is None or len(similarities) != len(ordered)):
        raise ValueError(f"face selection {selection.mode!r} needs one reference similarity per detected face")
    largest = max(ordered, key=lambda f: f.area)
    planned: list[PlannedFace] = []
    for number, detection in enumerate(ordered, start=1):
        sim = None if similarities is None else float(similarities[number - 1])
        chosen, reason = _chosen(selection, number, detection is largest, sim)
        if not chosen:
            planned.append(PlannedFace(number, detection, "skip", reason, sim))
            continue
        problem = processing_problem(detection, size, selection.min_face_side)
        if problem:
            action = "unprocessable" if selection.fallback == "fail" else "fallback"
            if action == "fallback":
                problem += f"; {selection.fallback} applied"
            planned.append(PlannedFace(number, detection, action, problem, sim))
        else:
            planned.append(PlannedFace(number, detection, "protect", "", sim))
    plan = FacePlan(tuple(planned), size, selection.fallback)
    missing = [n for n in selection.numbers if n > len(ordered)] if selection.mode == "index" else []
    if missing:
        raise NoFaceSelectedError(
            f"Face number(s) {missing} do not exist: the photo has {len(ordered)} face(s), numbered 1–{len(ordered)} "
            f"in reading order (see the preview).")
    if not plan.with_action("protect") and not plan.with_action("fallback") and not plan.with_action("unprocessable"):
        raise NoFaceSelectedError(
            f"The face selection '{selection.mode}' leaves none of the {len(ordered)} face(s) to protect:\n"
            + plan.summary())
    bad = plan.with_action("unprocessable")
    if bad:
        listing = "\n".join(f"  face {f.number} at {_box_text(f.box)}: {f.reason}" for f in bad)
        raise UnprocessableFacesError(
            f"{len(bad)} selected face(s) cannot be processed, so nothing was output:\n{listing}\n"
            f"Choose a fallback (blur or fill) to obscure them instead, leave them out with the face selection, "
            f"or use a larger photo.")
    return plan


def _box_text(box) -> str:
    x0, y0, x1, y1 = (round(v) for v in box)
    return f"x {x0}–{x1}, y {y0}–{y1}"


def _chosen(selection: FaceSelection, number: int, is_largest: bool, similarity: Optional[float]) -> tuple[bool, str]:
    mode = selection.mode
    if mode == "all":
        return True, ""
    if mode == "largest":
        return is_largest, "" if is_largest else "not the largest face (selection: largest)"
    if mode == "index":
        chosen = number in selection.numbers
        return chosen, "" if chosen else f"not among the chosen numbers {list(selection.numbers)}"
    if similarity is None or not math.isfinite(similarity):  # the judge cannot tell: protect it (fail closed)
        return True, ""
    threshold = DEFAULT_MATCH_THRESHOLD if selection.threshold is None else selection.threshold
    matches = similarity >= threshold
    if mode == "match_reference":
        return matches, "" if matches else f"does not match the reference (cosine {similarity:.2f} < {threshold:.3f})"
    return (not matches), "" if not matches else (
        f"matches the reference (cosine {similarity:.2f} ≥ {threshold:.3f}; selection: everyone but the reference)")


def reference_similarities(judge, photo: torch.Tensor, detections: Sequence[faces.FaceDetection],
                           reference: torch.Tensor, crop_size: int = 256) -> list[float]:
    """Cosine similarity of each face (in reading order) to the largest face of ``reference`` [H,W,3] in [0,1].

    ``judge`` is a :class:`core.verifiers.Verifier` (``similarities(source [S,S,3], faces [N,S,S,3]) → [N]``):
    SFace when configured, else the guiding recognizer wrapped as a RecognizerVerifier. Both sides are
    FFHQ-aligned crops of ``crop_size`` px.

    Raises FaceNotFoundError when the reference photo shows no face.
    """
    ref_faces = faces.detect_faces(reference)
    if not ref_faces:
        raise FaceNotFoundError("No face found in the reference photo: give a photo that shows the person clearly.")
    ordered = faces.reading_order(list(detections))
    photo = faces.ensure_rgb(photo)
    source = faces.align_face(reference, ref_faces[0], size=crop_size).crop
    crops = torch.stack([faces.align_face(photo, d, size=crop_size).crop for d in ordered])
    with torch.no_grad():
        sims = judge.similarities(source, crops)
    return [float(v) for v in sims.float().cpu()]


def draw_face_numbers(photo: torch.Tensor, plan: FacePlan) -> torch.Tensor:
    """The photo [H,W,3] in [0,1] with every detected face boxed and numbered: green = will be protected,
    grey = left alone by the selection, orange = obscured by the fallback, red = cannot be processed.
    Returns float32 [H,W,3] in [0,1]; drawing uses Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray((faces.ensure_rgb(photo).cpu().numpy() * 255 + 0.5).astype("uint8"))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    colours = {"protect": (40, 200, 80), "skip": (150, 150, 150), "fallback": (240, 150, 30),
               "unprocessable": (230, 40, 40)}
    for face in plan.faces:
        colour = colours[face.action]
        x0, y0, x1, y1 = face.box
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        font_size = max(12, round(min(face.detection.height, max(canvas.size) / 8) / 3))
        try:
            font = ImageFont.load_default(size=font_size)
        except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
            font = ImageFont.load_default()
        label = str(face.number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tx, ty = x0, max(0.0, y0 - (bottom - top) - 2 * width)
        draw.rectangle([tx, ty, tx + (right - left) + 2 * width, ty + (bottom - top) + 2 * width], fill=colour)
        draw.text((tx + width - left, ty + width - top), label, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def check_reference(selection: FaceSelection, reference) -> None:
    """Raise InvalidImageError when a reference mode has no reference photo."""
    if selection.needs_reference and reference is None:
        raise InvalidImageError(f"Face selection '{selection.mode}' needs a reference photo of the person.")
