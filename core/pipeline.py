"""Whole-photo protection and recovery for plain Python (the CLI, batch jobs) on any DiffusionBackend.

The ComfyUI nodes wire the same steps as a graph; the pieces both use live here (task presets, the recognizer
crop for a crop mode, the fail-closed check). Photos are float [H, W, 3] in [0, 1]; aligned faces are
``size``×``size``; latents are scaled SD latents.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from . import faces, msi, sampling
from .backend import DiffusionBackend, VisionEncoder
from .diffusion import check_num_steps
from .energies import MODES as TASKS
from .energies import BackgroundPaste, IdentityGuidance, StepSizeSchedule, mask_to_latent
from .gate import IdentityScore, check_identity_gate, identity_scores
from .keys import KeyMetadata, PrivacyKeys, check_compatible
from .msi import MSIOptions
from .recognizers import FaceCrop, FaceRecognizer, reference_embedding
from .sampling import SamplingOptions
from .schedules import EmbeddingSchedule
from .report import FaceEntry, PrivacyReport, outside_face_metrics, settings_dict
from .verifiers import SFaceVerifier, Verifier

#: How the guiding recognizer sees a face (:func:`face_crop_for`); "official" is the release's choice.
GUIDANCE_CROPS = ("official", "ffhq", "whole", "detect")


@dataclass(frozen=True)
class ProtectOptions:
    """Every setting of a whole-photo protection run (:func:`protect_photo`), validated once.

    Attributes:
        task: "anonymize" or "hide".
        size: side of the aligned face crop in pixels, a multiple of 8 in [64, 2048] (the paper: 512).
        msi: MSI settings (default: lite mode's defaults, which need no CLIP vision model).
        inversion_steps: DDIM steps of the key-I inversion, [1, 999] (the release: 50); recovery uses the same.
        sampling: the guided sampler's settings; None = the task's official preset
            (:data:`core.sampling.SAMPLING_PRESETS`).
        crop: how the recognizer sees the face, one of :data:`GUIDANCE_CROPS`.
        step_scale: factor ≥ 0 on the task's official step sizes ρ(t).
        max_identity_similarity: anonymize fails closed if any result's cosine to the source exceeds it, in
            [−1, 1] (1 disables the check).
        keep_background: paste the source background back for t < 300 (anonymize only, as the release).
        label: the preset's name, for the privacy report ("custom" unless made by :meth:`preset`, which
            records its speed: "paper", "default" or "fast").

    Raises:
        ValueError: on a value outside those ranges (when constructed).
    """

    task: str = "anonymize"
    size: int = 512
    msi: MSIOptions = MSIOptions.preset("lite")
    inversion_steps: int = 50
    sampling: Optional[SamplingOptions] = None
    crop: str = "official"
    step_scale: float = 1.0
    max_identity_similarity: float = 0.5
    keep_background: bool = True
    label: str = "custom"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if int(self.size) != self.size or self.size % 8 or not 64 <= self.size <= 2048:
            raise ValueError(f"size must be a multiple of 8 in [64, 2048], got {self.size}")
        check_num_steps(self.inversion_steps, "inversion_steps")
        if self.crop not in GUIDANCE_CROPS:
            raise ValueError(f"crop must be one of {GUIDANCE_CROPS}, got {self.crop!r}")
        if not (math.isfinite(self.step_scale) and self.step_scale >= 0):
            raise ValueError(f"step_scale must be finite and ≥ 0, got {self.step_scale}")
        if not -1.0 <= self.max_identity_similarity <= 1.0:
            raise ValueError(f"max_identity_similarity must be in [-1, 1], got {self.max_identity_similarity}")
        if self.sampling is None:
            object.__setattr__(self, "sampling", SamplingOptions.preset(self.task))

    @classmethod
    def preset(cls, task: str = "anonymize", speed: str = "default", **overrides: Any) -> "ProtectOptions":
        """The task's settings at ``speed`` with ``overrides`` applied; ``sampling`` may also be given as a dict
        of overrides on the task's sampling preset (e.g. ``sampling={"steps": 20}``).

        speed (:data:`core.msi.SPEEDS`, recorded as the report's preset): "paper" runs lite MSI's 1500
        timesteps one per step in fp32 and the official sampler; "default" the same timesteps four per step
        (:func:`core.msi.recipe`) and the official sampler; "fast" 480 timesteps eight per step with a cosine
        learning rate, half the DDIM grid (:data:`core.sampling.FAST_SAMPLING_PRESETS`) with the step sizes
        scaled by the ratio of guided steps (official/fast = 2). Every speed inverts with 50 steps (on the toy
        model 25 doubled the recovery error). The identity gate judges every result whatever the speed
        (docs/method.md §8.8).
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        sampling = SamplingOptions.preset(task, speed)
        sampling_overrides = overrides.pop("sampling", None)
        if isinstance(sampling_overrides, dict):
            overrides["sampling"] = dataclasses.replace(sampling, **sampling_overrides)
        elif sampling_overrides is not None:
            overrides["sampling"] = sampling_overrides
        fast = speed == "fast"
        official = SamplingOptions.preset(task).denoising_steps
        defaults = {"msi": MSIOptions.preset("lite", speed), "sampling": sampling, "label": speed,
                    "step_scale": official / sampling.denoising_steps if fast else cls.step_scale}
        return cls(task=task, **{**defaults, **overrides})


def face_crop_for(mode: str, recognizer: FaceRecognizer, source: torch.Tensor) -> FaceCrop:
    """The recognizer's view of a face for a crop mode; ``source`` is the aligned face [H,W,3] in [0,1].

    official: ArcFace's FFHQ crop or FaceNet's whole image (as released); ffhq / whole: those crops for any
    recognizer; detect: the MTCNN box found once on the source, reused for every generated image.
    """
    if mode == "official":
        return FaceCrop.official(recognizer)
    if mode == "detect":
        box = faces.single_face(source).box
        return FaceCrop("box", recognizer.input_size, "bilinear", box=tuple(float(v) for v in box), margin=0.1)
    if mode in ("ffhq", "whole"):
        return FaceCrop(mode, recognizer.input_size, "nearest")
    raise ValueError(f"crop mode must be one of {GUIDANCE_CROPS}, got {mode!r}")


def score_results(task: str, guiding: tuple[str, torch.Tensor], source: torch.Tensor, results: torch.Tensor,
                  verifiers: Sequence[Verifier], max_identity_similarity: float, face: int = 0) -> list[IdentityScore]:
    """Every identity score of one face's results: the guiding recognizer's similarities [B] (already computed
    during sampling's bookkeeping) and each verifier's, on the aligned source [S,S,3] and results [B,S,S,3] in
    [0,1]. Anonymize bounds the guiding recognizer by ``max_identity_similarity`` and each verifier by its own
    bound; hide only requires finite scores (it keeps the machine identity on purpose)."""
    anonymize = task == "anonymize"
    name, sims = guiding
    scores = identity_scores(name, sims, max_identity_similarity if anonymize else None, face)
    for verifier in verifiers:
        scores += identity_scores(verifier.name, verifier.similarities(source, results),
                                  verifier.bound if anonymize else None, face)
    return scores


def _to_model(image_hwc: torch.Tensor, device) -> torch.Tensor:
    return (image_hwc.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).to(device)


def _to_photo(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu()


@dataclass
class ProtectedPhoto:
    """photos [B,H,W,3] (faces pasted back), faces [B,S,S,3], both in [0,1]; keys (key-E + key-I, secret);
    similarities [B]: cosine of each result to the source under the guiding recognizer; scores: every identity
    score the gate passed (guiding recognizer and verifiers); report: the privacy report (core/report.py)."""

    photos: torch.Tensor
    faces: torch.Tensor
    keys: PrivacyKeys
    similarities: torch.Tensor
    scores: list[IdentityScore]
    report: PrivacyReport


def protect_photo(backend: DiffusionBackend, recognizer: FaceRecognizer, photo: torch.Tensor,
                  options: ProtectOptions = ProtectOptions(), *, verifiers: Sequence[Verifier] = (),
                  vision: Optional[VisionEncoder] = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  cancel: Callable[[], None] | None = None) -> ProtectedPhoto:
    """Anonymize (or hide) the one face of ``photo`` [H,W,3] in [0,1]: align, MSI, key-I inversion, guided
    sampling, decode, identity gate (guiding recognizer and every verifier), paste back.
    ``progress(stage, step, total)`` with stage "msi", "inversion" or "sampling"; ``vision`` is needed by
    faithful MSI only.

    Raises:
        FaceNotFoundError, MultipleFacesError, InvalidImageError: from face detection and alignment.
        ProtectionFailedError: the identity gate failed (a score is NaN, or an anonymized result still matches
            the source under some recognizer); nothing is returned.
    """
    task, size = options.task, options.size
    started = time.monotonic()

    def stage(name):
        return None if progress is None else (lambda step, total, info=None: progress(name, step, total))

    photo = faces.ensure_rgb(photo)
    detection = faces.single_face(photo)
    aligned = faces.align_face(photo, detection, size=size)
    image = _to_model(aligned.crop, backend.device)
    fit = msi.train_msi(backend, image, options.msi, vision=vision, progress=stage("msi"), cancel=cancel)
    with torch.no_grad():
        z0 = backend.encode_image(image)
        z_T = sampling.ddim_invert(backend, z0, fit.stage_conds, options.inversion_steps,
                                   progress=stage("inversion"), cancel=cancel)
    face_crop = face_crop_for(options.crop, recognizer, aligned.crop)
    guidance = IdentityGuidance(decode=backend.decode_latent, recognizer=recognizer, crop=face_crop,
                                source_embedding=reference_embedding(recognizer, face_crop, image), mode=task,
                                step_size=StepSizeSchedule.preset(task).scaled(options.step_scale))
    background = None
    if options.keep_background and task == "anonymize":
        mask = 1.0 - faces.face_mask_in_crop(size, device=z0.device)
        background = BackgroundPaste(mask_to_latent(mask, tuple(z0.shape[-2:])), z0)
    latents = sampling.protect(backend, z0, fit.stage_conds, backend.null_conditioning(), guidance,
                               schedule=EmbeddingSchedule.preset(task), options=options.sampling,
                               background=background, progress=stage("sampling"), cancel=cancel)
    similarities = guidance.similarities(latents)
    with torch.no_grad():
        crops = _to_photo(backend.decode_latent(latents))
    scores = check_identity_gate(score_results(task, (recognizer.name, similarities), aligned.crop, crops, verifiers,
                                               options.max_identity_similarity))
    keys = PrivacyKeys(fit.stage_tokens.detach().cpu(), fit.stage_conds.detach().cpu(), z_T.detach().cpu(),
                       KeyMetadata(model_fingerprint=backend.model_fingerprint(), ddim_steps=options.inversion_steps,
                                   schedule="recover", msi_mode=options.msi.mode, image_size=(size, size)))
    photos = faces.paste_back(photo, crops, aligned)
    report = PrivacyReport(
        task=task, preset=options.label, settings=settings_dict(options),
        model={"unet": keys.metadata.model_fingerprint, "text_encoder": backend.text_encoder_fingerprint()},
        faces=[FaceEntry(0, detection.box, scores, faces_still_detected(crops, verifiers))],
        outside_faces=outside_face_metrics(photo, photos, faces.source_mask(aligned)),
        seconds=time.monotonic() - started)
    return ProtectedPhoto(photos, crops, keys, similarities.detach().cpu(), scores, report)


def faces_still_detected(results: torch.Tensor, verifiers: Sequence[Verifier]) -> list[bool]:
    """Whether each result [B,H,W,3] still shows a face: YuNet when the SFace verifier is configured (the
    stronger detector), else MTCNN."""
    for verifier in verifiers:
        if verifier.name == SFaceVerifier.name:
            return verifier.faces_detected(results)
    return [bool(faces.detect_faces(image)) for image in results]


def recover_face(backend: DiffusionBackend, keys: PrivacyKeys,
                 cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """The original aligned face [S,S,3] in [0,1] from its keys (same checkpoint required)."""
    check_compatible(keys, backend.model_fingerprint())
    with torch.no_grad():
        z0 = sampling.recover_latent(backend, keys.z_T.to(backend.device), keys.stage_conds.to(backend.device),
                                     keys.metadata.ddim_steps, cancel=cancel)
        return _to_photo(backend.decode_latent(z0))[0]
