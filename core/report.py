"""The privacy report written next to every protected photo, and its preview picture.

For every face: the cosine of each result to its source under every recognizer (guiding and verifiers) with
pass/fail at that recognizer's bound, whether a face is still detected in each result (the photo still shows a
person), and the face's box. For the photo: PSNR and SSIM of everything *outside* the face regions (the method
promises to leave it alone), the settings, the model fingerprints, which preset ran and the time taken.

By construction the report holds no embedding, no pixel of the source, no passphrase and no file name: it is
built only from the numbers listed above, so it can be shared with the protected photo.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .gate import IdentityScore

REPORT_FORMAT = "diffprivacy-report"
REPORT_VERSION = 1
#: SSIM constants of Wang et al. 2004 ("Image quality assessment: from error visibility to structural
#: similarity"): an 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


# ------------------------------------------------------------------------------------------ image metrics
def _gaussian_taps() -> list[float]:
    """The 1-D Gaussian (σ = SSIM_SIGMA, SSIM_WINDOW taps, sum 1) whose outer product is SSIM's 2-D window."""
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return (g / g.sum()).tolist()


def _blur(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """The Gaussian window applied to x [B,C,H,W] with reflect padding, as two 1-D passes of shifted sums (the
    window is separable: 2·11 multiply-adds per pixel instead of 121)."""
    pad = len(taps) // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h, w = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    rows = sum(t * x[..., :, k:k + w] for k, t in enumerate(taps))
    return sum(t * rows[..., k:k + h, :] for k, t in enumerate(taps))


def _ssim_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    mu_a, mu_b, aa, bb, ab = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), _gaussian_taps()).chunk(5, dim=1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=1)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004, eq. 13) of images [B,3,H,W] in [0,1], averaged over channels → [B,H,W].

    Uses reflect padding so the map covers every pixel; float64 for stable variances. Where a and b agree on a
    pixel's whole window, SSIM is exactly 1, so only the neighbourhood of the pixels that differ (grown by two
    window radii) is computed; the rest of the map is 1.
    """
    height, width = a.shape[-2:]
    out = torch.ones(a.shape[0], height, width, dtype=torch.float64, device=a.device)
    changed = (a != b).flatten(0, 1).any(dim=0)  # [H,W], one host read below
    rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return out
    reach = SSIM_WINDOW // 2
    y0, y1 = int(rows[0]) - 2 * reach, int(rows[-1]) + 2 * reach + 1
    x0, x1 = int(cols[0]) - 2 * reach, int(cols[-1]) + 2 * reach + 1
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    # inside the crop, pixels within one radius of a cut edge see wrong padding, but they are more than one
    # radius from every changed pixel, so their SSIM is 1; at the photo's own edges the padding is the same
    dense = _ssim_dense(a[..., y0:y1, x0:x1], b[..., y0:y1, x0:x1])
    ys, xs = slice(reach if y0 > 0 else 0, (y1 - y0) - (reach if y1 < height else 0)), \
        slice(reach if x0 > 0 else 0, (x1 - x0) - (reach if x1 < width else 0))
    out[:, y0 + ys.start:y0 + ys.stop, x0 + xs.start:x0 + xs.stop] = dense[:, ys, xs]
    return out


@dataclass(frozen=True)
class OutsideFaces:
    """How much one result changed outside the face regions: PSNR in dB (None when the region is identical,
    i.e. infinite PSNR) and mean SSIM in [−1, 1] over the region; ``pixels`` is the region's size."""

    psnr_db: Optional[float]
    ssim: float
    identical: bool
    pixels: int


def outside_face_metrics(original: torch.Tensor, results: torch.Tensor, face_mask: torch.Tensor) -> list[OutsideFaces]:
    """Compare results [B,H,W,3] with the original photo [H,W,3] (both in [0,1]) where ``face_mask`` [H,W] is 0.

    ``face_mask`` is 1 (or > 0) on every pixel that a face's paste-back may touch; the rest must be untouched.
    Face pixels are set to the original's before SSIM, so its windows that straddle a face's edge measure only
    the changes outside it.
    """
    outside = face_mask <= 0
    pixels = int(outside.sum())
    ref = original.float().unsqueeze(0).expand_as(results)
    only_outside = torch.where(outside[None, :, :, None], results.float(), ref)
    diff = (only_outside - ref)[:, outside]  # [B, N, 3]
    ssim = ssim_map(ref.permute(0, 3, 1, 2), only_outside.permute(0, 3, 1, 2))[:, outside]
    out = []
    for i in range(results.shape[0]):
        mse = float(diff[i].pow(2).mean()) if pixels else 0.0
        identical = pixels == 0 or bool((diff[i] == 0).all())
        psnr = None if identical else 10.0 * math.log10(1.0 / mse)
        out.append(OutsideFaces(psnr, float(ssim[i].mean()) if pixels else 1.0, identical, pixels))
    return out


# ------------------------------------------------------------------------------------------------ report
def worst_scores(scores: Sequence[IdentityScore]) -> dict[str, IdentityScore]:
    """Per recognizer, the score closest to failing: NaN first, else the highest similarity."""
    worst: dict[str, IdentityScore] = {}
    for s in scores:
        key = math.inf if not math.isfinite(s.similarity) else s.similarity
        current = worst.get(s.recognizer)
        if current is None or key > (math.inf if not math.isfinite(current.similarity) else current.similarity):
            worst[s.recognizer] = s
    return worst


#: What happened to a detected face (core.selection's actions, as the report words them).
FACE_ACTIONS = {"protect": "protected", "skip": "left alone", "fallback": "obscured"}


@dataclass
class FaceEntry:
    """One detected face: its number (1-based, reading order), box [x0, y0, x1, y1] in photo pixels, every
    identity score of its samples, whether a face is still detected in each result, and what happened to it
    (``action``: a key of :data:`FACE_ACTIONS`; ``reason`` says why a face was left alone or obscured)."""

    index: int
    box: tuple[float, float, float, float]
    scores: list[IdentityScore]
    face_detected: list[bool]
    action: str = "protect"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "action": FACE_ACTIONS.get(self.action, self.action), "reason": self.reason,
                "box": [round(float(v), 1) for v in self.box],
                "scores": [{"recognizer": s.recognizer, "sample": s.sample,
                            "cosine": round(s.similarity, 4) if math.isfinite(s.similarity) else None,
                            "bound": s.bound, "passed": s.passed} for s in self.scores],
                "face_detected": list(self.face_detected)}


@dataclass
class PrivacyReport:
    """Everything a person needs to judge one protected photo, and nothing that identifies its source."""

    task: str
    preset: str
    settings: dict[str, Any]
    model: dict[str, str]
    faces: list[FaceEntry]
    outside_faces: list[OutsideFaces]
    seconds: float
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        """Every protected face passed every score, at least one face was protected or obscured, and no face
        was left in an undecided state."""
        return (all(s.passed for face in self.faces for s in face.scores)
                and all(face.action in FACE_ACTIONS for face in self.faces)
                and all(face.scores for face in self.faces if face.action == "protect")
                and any(face.action in ("protect", "fallback") for face in self.faces))

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "created": self.created, "task": self.task,
                "preset": self.preset, "passed": self.passed, "seconds": round(self.seconds, 2),
                "model": dict(self.model), "settings": dict(self.settings),
                "faces": [face.to_dict() for face in self.faces],
                "outside_faces": [asdict(o) for o in self.outside_faces]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def summary(self) -> str:
        """A few lines for a terminal or a ComfyUI text display."""
        lines = [f"Diff-Privacy {self.task} ({self.preset}): {'PASSED' if self.passed else 'FAILED'} identity gate, "
                 f"{len(self.faces)} face(s), {self.seconds:.1f} s"]
        for face in self.faces:
            if face.action != "protect":
                lines.append(f"  face {face.index}: {FACE_ACTIONS.get(face.action, face.action)}"
                             + (f" ({face.reason})" if face.reason else ""))
                continue
            parts = [f"{name} max {s.similarity:.3f}" + ("" if s.bound is None else f" / bound {s.bound:.3f}")
                     for name, s in worst_scores(face.scores).items()]
            detected = sum(face.face_detected)
            lines.append(f"  face {face.index}: " + ", ".join(parts) +
                         f"; face still detected in {detected}/{len(face.face_detected)} results")
        for i, o in enumerate(self.outside_faces):
            psnr = "identical" if o.identical else f"PSNR {o.psnr_db:.1f} dB, SSIM {o.ssim:.4f}"
            lines.append(f"  result {i} outside the faces: {psnr}")
        return "\n".join(lines)


def draw_preview(photo: torch.Tensor, report: PrivacyReport) -> torch.Tensor:
    """The photo [H,W,3] in [0,1] with each face boxed (green passed, red failed) and its worst scores written
    next to the box → [H,W,3] float in [0,1]. Drawing uses Pillow."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray((photo.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype("uint8"))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    for face in report.faces:
        if face.action != "protect":
            color = (150, 150, 150) if face.action == "skip" else (240, 150, 30)
            x0, y0, x1, y1 = face.box
            draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
            draw.text((x0 + width, max(0, y0 - 12 - width)), f"#{face.index} {FACE_ACTIONS.get(face.action, '')}",
                      fill=color)
            continue
        ok = all(s.passed for s in face.scores)
        color = (40, 200, 80) if ok else (230, 40, 40)
        x0, y0, x1, y1 = face.box
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = f"#{face.index} " + " ".join(f"{name[:8]} {s.similarity:.2f}"
                                            for name, s in worst_scores(face.scores).items())
        draw.text((x0 + width, max(0, y0 - 12 - width)), text, fill=color)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def settings_dict(options: Any) -> dict[str, Any]:
    """A JSON-safe dict of an options dataclass (dtypes and other objects as strings)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)
    return clean(asdict(options))
