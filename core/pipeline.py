"""Whole-photo protection and recovery for plain Python (the CLI, batch jobs) on any DiffusionBackend.

The ComfyUI nodes wire the same steps as a graph; the pieces both use live here (task presets, the recognizer
crop for a crop mode, the fail-closed check). Photos are float [H, W, 3] in [0, 1]; aligned faces are
``size``×``size``; latents are scaled SD latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import faces, msi, sampling
from .energies import BackgroundPaste, IdentityGuidance, StepSizeSchedule, mask_to_latent
from .errors import ProtectionFailedError
from .keys import KeyMetadata, PrivacyKeys, check_compatible
from .recognizers import FaceCrop, FaceRecognizer, reference_embedding
from .schedules import EmbeddingSchedule

CROP_MODES = ("official", "ffhq", "whole", "detect")


@dataclass(frozen=True)
class TaskPreset:
    """The official settings of a task (docs/method.md §1): DDIM grid, strength, samples, seed."""

    steps: int
    strength: float
    batch_size: int
    seed: int


PRESETS = {
    "anonymize": TaskPreset(steps=50, strength=0.6, batch_size=4, seed=125),
    "hide": TaskPreset(steps=100, strength=0.8, batch_size=1, seed=100162),
}


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
    raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")


def check_protected(similarities: torch.Tensor, max_similarity: float) -> None:
    """Fail closed: raise ProtectionFailedError if any result's cosine to the source exceeds the bound."""
    sims = similarities.detach().float().cpu()
    worst = float(sims.max())
    if worst > max_similarity:
        failed = int((sims > max_similarity).sum())
        raise ProtectionFailedError(
            f"Protection failed closed: {failed} of {len(sims)} results still match the source (cosine "
            f"{worst:.3f} > max_identity_similarity {max_similarity:.2f}); nothing was output. Raise the "
            "guidance step scale or the strength, or use another seed.")


def _to_model(image_hwc: torch.Tensor, device) -> torch.Tensor:
    return (image_hwc.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).to(device)


def _to_photo(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu()


@dataclass
class ProtectedPhoto:
    """photos [B,H,W,3] (faces pasted back), faces [B,S,S,3], both in [0,1]; keys (key-E + key-I, secret);
    similarities [B]: cosine of each result to the source under the guiding recognizer."""

    photos: torch.Tensor
    faces: torch.Tensor
    keys: PrivacyKeys
    similarities: torch.Tensor


def protect_photo(backend, recognizer: FaceRecognizer, photo: torch.Tensor, *, task: str = "anonymize",
                  size: int = 512, msi_mode: str = "lite", msi_steps: int | None = None, inversion_steps: int = 50,
                  steps: int | None = None, strength: float | None = None, batch_size: int | None = None,
                  seed: int | None = None, crop: str = "official", step_scale: float = 1.0,
                  max_identity_similarity: float = 0.5, keep_background: bool = True, vision=None,
                  progress: Callable[[str, int, int], None] | None = None,
                  cancel: Callable[[], None] | None = None) -> ProtectedPhoto:
    """Anonymize (or hide) the one face of ``photo`` [H,W,3] in [0,1]: align, MSI, key-I inversion, guided
    sampling, fail-closed check, decode, paste back. ``progress(stage, step, total)`` with stage "msi",
    "inversion" or "sampling". Preset values fill every setting left None."""
    if task not in PRESETS:
        raise ValueError(f"task must be one of {sorted(PRESETS)}, got {task!r}")
    preset = PRESETS[task]
    steps, strength = steps or preset.steps, strength or preset.strength
    batch_size = batch_size or preset.batch_size
    seed = preset.seed if seed is None else seed

    def stage(name):
        return None if progress is None else (lambda step, total, info=None: progress(name, step, total))

    photo = faces.ensure_rgb(photo)
    aligned = faces.align_face(photo, faces.single_face(photo), size=size)
    image = _to_model(aligned.crop, backend.device)
    fit = msi.train_msi(backend, image, mode=msi_mode, steps=msi_steps, vision=vision, progress=stage("msi"),
                        cancel=cancel)
    with torch.no_grad():
        z0 = backend.encode_image(image)
        z_T = sampling.ddim_invert(backend, z0, fit.stage_conds, inversion_steps, progress=stage("inversion"),
                                   cancel=cancel)
    face_crop = face_crop_for(crop, recognizer, aligned.crop)
    guidance = IdentityGuidance(decode=backend.decode_latent, recognizer=recognizer, crop=face_crop,
                                source_embedding=reference_embedding(recognizer, face_crop, image), mode=task,
                                step_size=StepSizeSchedule.preset(task).scaled(step_scale))
    background = None
    if keep_background and task == "anonymize":
        mask = 1.0 - faces.face_mask_in_crop(size, device=z0.device)
        background = BackgroundPaste(mask_to_latent(mask, tuple(z0.shape[-2:])), z0)
    latents = sampling.protect(backend, z0, fit.stage_conds, backend.null_conditioning(), guidance,
                               task_schedule=EmbeddingSchedule.preset(task), num_steps=steps, strength=strength,
                               batch_size=batch_size, seed=seed, background=background,
                               progress=stage("sampling"), cancel=cancel)
    similarities = guidance.similarities(latents)
    if task == "anonymize":
        check_protected(similarities, max_identity_similarity)
    with torch.no_grad():
        crops = _to_photo(backend.decode_latent(latents))
    keys = PrivacyKeys(fit.stage_tokens.detach().cpu(), fit.stage_conds.detach().cpu(), z_T.detach().cpu(),
                       KeyMetadata(model_fingerprint=backend.model_fingerprint(), ddim_steps=inversion_steps,
                                   schedule="recover", msi_mode=msi_mode, image_size=(size, size)))
    photos = faces.paste_back(photo, crops, aligned)
    return ProtectedPhoto(photos, crops, keys, similarities.detach().cpu())


def recover_face(backend, keys: PrivacyKeys, cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """The original aligned face [S,S,3] in [0,1] from its keys (same checkpoint required)."""
    check_compatible(keys, backend.model_fingerprint())
    with torch.no_grad():
        z0 = sampling.recover_latent(backend, keys.z_T.to(backend.device), keys.stage_conds.to(backend.device),
                                     keys.metadata.ddim_steps, cancel=cancel)
        return _to_photo(backend.decode_latent(z0))[0]
