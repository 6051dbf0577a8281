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

import numpy as np
import torch

from . import faces, msi, sampling
from .autograd import normal_tensors
from .backend import DiffusionBackend, VisionEncoder
from .diffusion import check_num_steps
from .energies import MODES as TASKS
from .energies import BackgroundPaste, IdentityGuidance, StepSizeSchedule, mask_to_latent
from .gate import IdentityScore, check_identity_gate, identity_scores
from .errors import InvalidImageError
from .keys import FaceGeometry, KeyMetadata, PhotoKeys, PrivacyKeys, check_compatible
from .msi import MSIOptions
from .recognizers import FaceCrop, FaceCrops, FaceRecognizer, face_embeddings
from .sampling import SamplingOptions
from .selection import (DEFAULT_MATCH_THRESHOLD, FacePlan, FaceSelection, check_reference, draw_face_numbers, plan_faces,
                        reference_similarities)
from .schedules import EmbeddingSchedule
from .report import FaceEntry, PrivacyReport, outside_face_metrics, settings_dict
from .speed import backend_free_bytes, faces_that_fit, saved_activation_bytes
from .verifiers import RecognizerVerifier, SFaceVerifier, Verifier

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
        seam_colour_match: shift each result's colour to agree with the photo on the paste seam
            (:func:`core.faces.match_seam_colour`).
        label: the preset's name, for the privacy report ("custom" unless made by :meth:`preset`, which
            records its speed: "paper", "default" or "fast").
        faces_per_batch: how many faces of a photo go through MSI, inversion and sampling in one batch, ≥ 1;
            None = as many as fit into free memory (:func:`faces_per_batch`). Changes time and memory, not
            results (each face's result equals its own run to floating-point tolerance).

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
    seam_colour_match: bool = True
    label: str = "custom"
    faces_per_batch: Optional[int] = None

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
        if self.faces_per_batch is not None and (isinstance(self.faces_per_batch, bool)
                                                 or int(self.faces_per_batch) != self.faces_per_batch
                                                 or self.faces_per_batch < 1):
            raise ValueError(f"faces_per_batch must be an integer ≥ 1 or None, got {self.faces_per_batch!r}")
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


Progress = Callable[[str, int, int], None]
#: scaled latent [B,4,h,w] → image [B,3,H,W] in ≈[−1,1], differentiable (DiffusionBackend.decode_latent's contract)
Decoder = Callable[[torch.Tensor], torch.Tensor]
#: the report's name of the guidance decoder when none is given
CHECKPOINT_VAE = "checkpoint VAE"


def guidance_decoder_name(decoder: Optional[Decoder]) -> str:
    """What decoded x̂₀ for the guidance gradient, for the privacy report: "checkpoint VAE", or the decoder's
    ``name`` (e.g. "taesd"; "custom" when it has none)."""
    return CHECKPOINT_VAE if decoder is None else str(getattr(decoder, "name", "custom"))


@dataclass
class ProtectedFace:
    """One protected face: its 1-based number (reading order), detection box (photo pixels), alignment, the B
    generated aligned crops
    [B,S,S,3] in [0,1] (seam colour matched, as pasted), its keys (key-E + key-I, secret), the guiding
    recognizer's cosine of each result to the source [B], every identity score the gate passed, and whether a
    face is still detected in each result."""

    number: int
    box: tuple[float, float, float, float]
    aligned: faces.AlignedFace
    crops: torch.Tensor
    keys: PrivacyKeys
    similarities: torch.Tensor
    scores: list[IdentityScore]
    face_detected: list[bool]

    def geometry(self) -> FaceGeometry:
        """Where this face sits in its photo, for the whole-photo keys."""
        a = self.aligned
        return FaceGeometry(number=self.number, box=self.box, matrix=a.matrix.tolist(), crop_size=a.size,
                            photo_size=a.source_size, quad=a.quad.tolist())


@dataclass
class ProtectedPhoto:
    """photos [B,H,W,3] in [0,1]: every protected face pasted back (sample b of each face in photo b), every
    fallback face obscured, every other pixel exactly the input's. faces: the protected faces in reading order.
    keys: the whole photo's recovery keys (None when no face was protected by the method, e.g. only fallbacks).
    plan: every detected face with its decision. report: the privacy report (core/report.py). preview: the
    photo with numbered face boxes [H,W,3]."""

    photos: torch.Tensor
    faces: list[ProtectedFace]
    keys: Optional[PhotoKeys]
    plan: FacePlan
    report: PrivacyReport
    preview: torch.Tensor

    @property
    def scores(self) -> list[IdentityScore]:
        return [s for face in self.faces for s in face.scores]


def select_faces(recognizer: Optional[FaceRecognizer], photo: torch.Tensor, selection: FaceSelection = FaceSelection(),
                 reference: Optional[torch.Tensor] = None, verifiers: Sequence[Verifier] = ()) -> FacePlan:
    """Detect every face of ``photo`` [H,W,3] in [0,1] and decide for each what happens (core.selection);
    the reference modes compare each face with ``reference`` [H,W,3] under the SFace verifier when one is
    configured (a recognizer trained for verification), else under the guiding ``recognizer``. Cheap: run it
    first (and show :func:`core.selection.draw_face_numbers`) before the expensive steps.

    Raises the errors of :func:`core.selection.plan_faces`, and InvalidImageError for a reference mode without a
    reference photo.
    """
    photo = faces.ensure_rgb(photo)
    check_reference(selection, reference)
    detections = faces.detect_faces(photo, selection.min_confidence)
    sims = None
    if selection.needs_reference and detections:
        judge = next((v for v in verifiers if v.name == SFaceVerifier.name), None)
        if judge is None and recognizer is not None:
            judge = RecognizerVerifier(recognizer, FaceCrop.official(recognizer), DEFAULT_MATCH_THRESHOLD)
        judge = judge or next(iter(verifiers), None)
        if judge is None:
            raise ValueError(f"face selection {selection.mode!r} needs a face recognizer or verifier to compare "
                             f"faces with the reference photo")
        if selection.threshold is None:
            selection = dataclasses.replace(selection, threshold=float(judge.bound))
        sims = reference_similarities(judge, photo, detections, faces.ensure_rgb(reference))
    return plan_faces(photo, selection, detections=detections, similarities=sims)


def faces_label(first: int, count: int, total: int) -> str:
    """The progress label of a group of faces: "face 2/3" for one, "faces 1–3/5" for several (1-based)."""
    if count == 1:
        return f"face {first}/{total}"
    return f"faces {first}–{first + count - 1}/{total}"


def protect_faces(backend: DiffusionBackend, recognizer: FaceRecognizer, aligned: Sequence[faces.AlignedFace],
                  options: ProtectOptions, *, numbers: Optional[Sequence[int]] = None,
                  boxes: Optional[Sequence[Optional[tuple[float, float, float, float]]]] = None,
                  verifiers: Sequence[Verifier] = (), vision: Optional[VisionEncoder] = None,
                  guidance_decoder: Optional[Decoder] = None, progress: Optional[Progress] = None,
                  cancel: Callable[[], None] | None = None) -> list[ProtectedFace]:
    """The full method on N aligned faces at once, every face in one batch through the UNet and VAE: MSI (N
    independent fits, :func:`core.msi.train_msi_faces`), key-I inversion (face i with its own key-E), guided
    sampling of N·B samples in sample-major order, each face conditioned and guided by its own key-E and source
    embedding (:func:`core.sampling.protect`), one decode per face (its B samples, clamped to [0, 1]) and the seam
    colour match, then the identity gate per face (guiding recognizer and every verifier) on exactly those crops,
    which are what is pasted and output. Each face's result equals what it gets alone (to floating-point
    tolerance; tested).

    ``progress(stage, step, total)`` with stage "msi", "inversion" or "sampling". ``numbers`` (default 1…N) and
    ``boxes`` (default: the bounding box of each aligned square) identify the faces in their photo.
    ``guidance_decoder`` (default: the backend's VAE) decodes x̂₀ for the guidance gradient only, e.g. a
    :class:`core.diffusers_backend.TinyGuidanceDecoder`; the results are decoded, gated and returned through the
    backend's VAE whatever it is.

    Raises:
        ProtectionFailedError: the gate failed for some face (the message names it); nothing is returned.
        ValueError: for an empty list of faces.
    """
    task, size, n = options.task, options.size, len(aligned)
    if n < 1:
        raise ValueError("protect_faces needs at least one aligned face")
    numbers = list(numbers) if numbers is not None else list(range(1, n + 1))
    batch = options.sampling.batch_size

    def stage(name):
        return None if progress is None else (lambda step, total, info=None: progress(name, step, total))

    images = torch.cat([_to_model(a.crop, backend.device) for a in aligned])  # [N,3,S,S]
    fits = msi.train_msi_faces(backend, images, options.msi, vision=vision, progress=stage("msi"), cancel=cancel)
    stage_conds = torch.stack([fit.stage_conds for fit in fits])  # [N,10,77,D]
    with torch.no_grad():
        z0 = torch.cat([fit.source_latent for fit in fits])  # encoded once, by MSI
        z_T = sampling.ddim_invert(backend, z0, stage_conds, options.inversion_steps,
                                   progress=stage("inversion"), cancel=cancel)
    crops = [face_crop_for(options.crop, recognizer, face.crop) for face in aligned]
    # one crop for every face, or ("detect") each face's own box for its samples
    face_crop = crops[0] if all(c == crops[0] for c in crops) else FaceCrops(tuple(crops))
    decode = guidance_decoder if guidance_decoder is not None else backend.decode_latent
    guidance = IdentityGuidance(decode=decode, recognizer=recognizer,
                                crop=face_crop, source_embedding=face_embeddings(recognizer, face_crop, images), mode=task,
                                step_size=StepSizeSchedule.preset(task).scaled(options.step_scale), faces=n)
    background = None
    if options.keep_background and task == "anonymize":
        mask = mask_to_latent(1.0 - faces.face_mask_in_crop(size, device=z0.device), tuple(z0.shape[-2:]))
        background = BackgroundPaste(sampling.sample_major(mask.expand(n, -1, -1, -1), batch),
                                     sampling.sample_major(z0, batch))
    latents = sampling.protect(backend, z0, stage_conds, backend.null_conditioning(), guidance,
                               schedule=EmbeddingSchedule.preset(task), options=options.sampling,
                               background=background, progress=stage("sampling"), cancel=cancel)
    with torch.no_grad():
        # decoded once, face by face (B samples at a time, as one face alone needs), seam colour matched: these
        # crops are what is pasted and output, and exactly what the gate judges
        per_face = []
        for i, face in enumerate(aligned):
            crops = _to_photo(backend.decode_latent(sampling.face_samples(latents, n, i)))
            per_face.append(faces.match_seam_colour(crops, face.crop) if options.seam_colour_match else crops)
        results = torch.stack(per_face, dim=1).reshape(-1, *per_face[0].shape[1:])  # sample-major [N·B,S,S,3]
        pixels = (results.permute(0, 3, 1, 2) * 2.0 - 1.0).to(z0.device)
        similarities = guidance.image_similarities(pixels).detach().cpu()
    scores = []
    for i, face in enumerate(aligned):  # fail closed: any face's failing score fails them all
        scores.append(score_results(task, (recognizer.name, sampling.face_samples(similarities, n, i)), face.crop,
                                    per_face[i], verifiers, options.max_identity_similarity, face=numbers[i]))
    check_identity_gate([s for face_scores in scores for s in face_scores])
    fingerprint = backend.model_fingerprint()
    protected = []
    for i, face in enumerate(aligned):
        crops = per_face[i]
        keys = PrivacyKeys(fits[i].stage_tokens.detach().cpu(), fits[i].stage_conds.detach().cpu(),
                           z_T[i : i + 1].detach().cpu(),
                           KeyMetadata(model_fingerprint=fingerprint, ddim_steps=options.inversion_steps,
                                       schedule="recover", msi_mode=options.msi.mode, image_size=(size, size)))
        box = boxes[i] if boxes is not None and boxes[i] is not None else None
        if box is None:
            (x0, y0), (x1, y1) = face.quad.min(axis=0), face.quad.max(axis=0)
            box = (float(x0), float(y0), float(x1), float(y1))
        protected.append(ProtectedFace(numbers[i], tuple(box), face, crops, keys,
                                       sampling.face_samples(similarities, n, i), scores[i],
                                       faces_still_detected(crops, verifiers)))
    return protected


def faces_per_batch(backend: DiffusionBackend, recognizer: FaceRecognizer, aligned: faces.AlignedFace,
                    options: ProtectOptions, count: int,
                    guidance_decoder: Optional[Decoder] = None) -> tuple[int, str]:
    """How many of ``count`` faces :func:`protect_photo` puts in one batch, and why.

    ``options.faces_per_batch`` when set; else measured
    (:func:`core.speed.faces_that_fit`): the activations autograd keeps for one face in MSI (k timesteps through
    the UNet, :func:`core.msi.face_activation_bytes`) and in a guided step (B samples through decoder and
    recognizer), measured at batch 1 on ``aligned``'s shape and scaled, against the backend's free memory.
    Conservative: every saved tensor is counted as growing with the batch, and without UNet checkpointing or
    bf16 autocast (where memory is short, MSI's own checkpointing decision may still let a batch fit).
    """
    if options.faces_per_batch is not None:
        return min(count, options.faces_per_batch), "set"
    if count == 1:
        return 1, "one face"
    device = torch.device(backend.device)
    batch = options.sampling.batch_size
    image = _to_model(aligned.crop, device)
    shape = msi.latent_shape_of(image)
    face_crop = face_crop_for(options.crop, recognizer, aligned.crop)
    guidance = IdentityGuidance(decode=guidance_decoder if guidance_decoder is not None else backend.decode_latent,
                                recognizer=recognizer, crop=face_crop,
                                source_embedding=face_embeddings(recognizer, face_crop, image),
                                mode=options.task)
    with normal_tensors(grad=True):  # measured with autograd on, also when called inside inference mode
        x0 = torch.zeros(shape, device=device, requires_grad=True)  # activation sizes depend on shapes only
        guided = saved_activation_bytes(lambda: guidance.energy(x0))
    per_face = max(msi.face_activation_bytes(backend, shape, options.msi), batch * guided)
    free = backend_free_bytes(backend)
    return faces_that_fit(count, per_face, free)


def protect_photo(backend: DiffusionBackend, recognizer: FaceRecognizer, photo: torch.Tensor,
                  options: ProtectOptions = ProtectOptions(), *, selection: FaceSelection = FaceSelection(),
                  reference: Optional[torch.Tensor] = None, plan: Optional[FacePlan] = None,
                  verifiers: Sequence[Verifier] = (), vision: Optional[VisionEncoder] = None,
                  guidance_decoder: Optional[Decoder] = None, progress: Optional[Progress] = None,
                  cancel: Callable[[], None] | None = None) -> ProtectedPhoto:
    """Anonymize (or hide) every selected face of ``photo`` [H,W,3] in [0,1]: detection and selection
    (:func:`select_faces`, or a ``plan`` made earlier), then the faces in batches (:func:`protect_faces`; as
    many per batch as :func:`faces_per_batch` says fit into memory), then every result
    pasted into the one photo (seam colour matched, feathered); faces the method cannot process get the
    selection's fallback. ``guidance_decoder``: see :func:`protect_faces` (the report names it).
    ``progress(stage, step, total)`` with stage "face 2/3: msi" (a batch of several:
    "faces 1–3/5: msi"; or inversion, sampling);
    ``vision`` is needed by faithful MSI only.

    Fail closed: if any face fails the identity gate nothing is returned.

    Raises:
        FaceNotFoundError, NoFaceSelectedError, UnprocessableFacesError, InvalidImageError: detection and
            selection (before any expensive step).
        ProtectionFailedError: the identity gate failed for some face (the message names it); nothing is returned.
    """
    started = time.monotonic()
    photo = faces.ensure_rgb(photo)
    if plan is None:
        plan = select_faces(recognizer, photo, selection, reference, verifiers)
    chosen = plan.with_action("protect")
    aligned = [faces.align_face(photo, planned.detection, size=options.size) for planned in chosen]
    protected: list[ProtectedFace] = []
    group, why = (faces_per_batch(backend, recognizer, aligned[0], options, len(chosen), guidance_decoder)
                  if chosen else (0, "no face"))
    for first in range(0, len(chosen), max(group, 1)):
        part = slice(first, first + group)
        label = faces_label(first + 1, len(aligned[part]), len(chosen))
        group_progress = None if progress is None else (lambda stage, step, total, label=label:
                                                        progress(f"{label}: {stage}", step, total))
        protected += protect_faces(backend, recognizer, aligned[part], options,
                                   numbers=[p.number for p in chosen[part]], boxes=[p.box for p in chosen[part]],
                                   verifiers=verifiers, vision=vision, guidance_decoder=guidance_decoder,
                                   progress=group_progress, cancel=cancel)
    photos, changed = compose_photo(photo, [(f.aligned, f.crops) for f in protected],
                                    fallback_alignments(photo, plan), fallback_kind(plan),
                                    options.sampling.batch_size)
    keys = None
    if protected:
        keys = PhotoKeys([f.keys for f in protected], [f.geometry() for f in protected], plan.photo_size)
    entries = [FaceEntry(f.number, f.box, f.scores, f.face_detected) for f in protected]
    entries += [FaceEntry(p.number, p.box, [], [], action=p.action, reason=p.reason)
                for p in plan.faces if p.action != "protect"]
    settings = {**settings_dict(options), "faces_in_one_batch": group, "faces_in_one_batch_reason": why,
                "guidance_decoder": guidance_decoder_name(guidance_decoder),
                # after the loops ran: a graph that failed its check says so here
                "cuda_graphs": getattr(backend, "cuda_graphs_status", "off: this backend has no CUDA graphs")}
    report = PrivacyReport(
        task=options.task, preset=options.label, settings=settings,
        model={"unet": backend.model_fingerprint(), "text_encoder": backend.text_encoder_fingerprint()},
        faces=sorted(entries, key=lambda e: e.index),
        outside_faces=outside_face_metrics(photo, photos, changed),
        seconds=time.monotonic() - started)
    return ProtectedPhoto(photos, protected, keys, plan, report, draw_face_numbers(photo, plan))


#: Side of the alignment that locates a fallback face's region (only its geometry is used, never its pixels).
FALLBACK_ALIGN_SIZE = 64


def fallback_kind(plan_or_selection) -> str:
    """How fallback faces are obscured: the plan's (or selection's) "blur" or "fill" ("fill" if it says "fail",
    which leaves no fallback face in a plan anyway)."""
    return plan_or_selection.fallback if plan_or_selection.fallback != "fail" else "fill"


def fallback_alignments(photo: torch.Tensor, plan: FacePlan) -> list[faces.AlignedFace]:
    """The alignments (geometry) of the plan's fallback faces, in reading order, for :func:`compose_photo`."""
    return [faces.align_face(photo, p.detection, size=FALLBACK_ALIGN_SIZE) for p in plan.with_action("fallback")]


def compose_photo(photo: torch.Tensor, pasted: Sequence[tuple[faces.AlignedFace, torch.Tensor]],
                  fallbacks: Sequence[faces.AlignedFace] = (), fallback: str = "fill", batch: int = 1,
                  feather: float = faces.PASTE_FEATHER) -> tuple[torch.Tensor, torch.Tensor]:
    """Every face's result in the one photo: the fallback faces obscured (:func:`core.faces.obscure_face`,
    ``fallback`` "blur" or "fill"), then each face's crops [B,S,S,3] in [0,1] pasted where its alignment says
    (:func:`core.faces.paste_into`, sample b into photo b, feathered by ``feather``).

    photo: [H,W,3] in [0,1]; batch: B (the number of crops of every pasted face). Returns (photos [B,H,W,3]
    float32, changed [H,W] in [0,1]: the union of the masks of every face region written; everywhere it is 0
    the photos equal ``photo`` exactly). Shared by :func:`protect_photo` and the Face Paste Back node.

    Raises:
        InvalidImageError: a face aligned on a photo of another size, or crops that are not [B,S,S,3].
    """
    photo = photo.float()
    base = photo
    changed = torch.zeros(photo.shape[:2])
    for aligned in fallbacks:
        base = faces.obscure_face(base, aligned, fallback)
        changed = torch.maximum(changed, faces.source_mask(aligned))
    photos = base.unsqueeze(0).repeat(batch, 1, 1, 1)
    for aligned, crops in pasted:
        photos = faces.paste_into(photos, crops, aligned, feather=feather)
        changed = torch.maximum(changed, faces.source_mask(aligned, feather=feather))
    return photos, changed


def faces_still_detected(results: torch.Tensor, verifiers: Sequence[Verifier]) -> list[bool]:
    """Whether each result [B,H,W,3] still shows a face: YuNet when the SFace verifier is configured (the
    stronger detector), else MTCNN."""
    for verifier in verifiers:
        if verifier.name == SFaceVerifier.name:
            return verifier.faces_detected(results)
    return [bool(faces.detect_faces(image)) for image in results]


#: faces recovered in one batch (no gradients: UNet and decoder forward passes only). Our choice.
RECOVER_FACES_PER_BATCH = 8


def recover_faces(backend: DiffusionBackend, keys: Sequence[PrivacyKeys], cancel: Callable[[], None] | None = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> list[torch.Tensor]:
    """The original aligned faces, one [S,S,3] in [0,1] per key set (same checkpoint required): faces whose
    keys share the DDIM step count and latent size are regenerated in batches of up to
    :data:`RECOVER_FACES_PER_BATCH` through the UNet (face i with its own key-E and key-I; equal to recovering
    it alone, to floating-point tolerance), then decoded one face at a time (a decoder's activations at 512 px
    are the larger cost, and inference needs no batch for speed there). ``progress(done, total)`` after each
    batch.

    Raises:
        KeyMismatchError: keys of another base model.
    """
    fingerprint = backend.model_fingerprint()
    for face_keys in keys:
        check_compatible(face_keys, fingerprint)
    groups: dict[tuple, list[int]] = {}
    for i, face_keys in enumerate(keys):
        groups.setdefault((face_keys.metadata.ddim_steps, tuple(face_keys.z_T.shape[1:])), []).append(i)
    out: list[Optional[torch.Tensor]] = [None] * len(keys)
    done = 0
    with torch.no_grad():
        for (steps, _), members in groups.items():
            for first in range(0, len(members), RECOVER_FACES_PER_BATCH):
                part = members[first : first + RECOVER_FACES_PER_BATCH]
                z_T = torch.cat([keys[i].z_T[:1] for i in part]).to(backend.device)  # a key set holds one face
                conds = torch.stack([sampling.stack_stage_conds(keys[i].stage_conds) for i in part])
                z0 = sampling.recover_latent(backend, z_T, conds.to(backend.device), steps, cancel=cancel)
                for row, i in enumerate(part):
                    out[i] = _to_photo(backend.decode_latent(z0[row : row + 1]))[0]
                done += len(part)
                if progress is not None:
                    progress(done, len(keys))
    return out


def recover_face(backend: DiffusionBackend, keys: PrivacyKeys,
                 cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """The original aligned face [S,S,3] in [0,1] from its keys (same checkpoint required;
    :func:`recover_faces` of one)."""
    return recover_faces(backend, [keys], cancel=cancel)[0]


@dataclass
class RecoveredPhoto:
    """photo [H,W,3] in [0,1]: the protected photo with every recovered face pasted back; crops: the recovered
    aligned faces [N,S,S,3] in key order."""

    photo: torch.Tensor
    crops: torch.Tensor


def recover_photo(backend: DiffusionBackend, keys: PhotoKeys, protected: torch.Tensor,
                  cancel: Callable[[], None] | None = None,
                  progress: Optional[Progress] = None) -> RecoveredPhoto:
    """The original photo from the protected photo [H,W,3] in [0,1] and its keys: every face regenerated from
    key-E + key-I (:func:`recover_faces`, in batches) and pasted back where its geometry says, with the protection's feather;
    pixels outside every face region are the protected photo's (which are the original's).

    Raises:
        KeyMismatchError: keys of another base model.
        InvalidImageError: the photo's size differs from the one the keys were made for, or the keys are an
            older single-face set without geometry (recover_face gives its aligned crop).
    """
    if not keys.placed:
        raise InvalidImageError(
            "These keys come from an older single-face key file that does not record where the face sits in the "
            "photo; they recover the aligned face crop only (Recover Original / recover --crop).")
    photo = faces.ensure_rgb(protected)
    if tuple(photo.shape[:2]) != tuple(keys.photo_size):
        height, width = keys.photo_size
        raise InvalidImageError(
            f"The protected photo is {photo.shape[1]}×{photo.shape[0]} px, but these keys belong to a "
            f"{width}×{height} px photo: give the protected photo exactly as it was written (not resized or cropped).")
    out = photo.unsqueeze(0).clone()
    if progress is not None:
        progress("recover", 0, len(keys.faces))
    crops = recover_faces(backend, keys.faces, cancel=cancel,
                          progress=None if progress is None else (lambda done, total: progress("recover", done, total)))
    for crop, geometry in zip(crops, keys.geometry):
        aligned = faces.AlignedFace(crop=crop, matrix=np.asarray(geometry.matrix, dtype=np.float64),
                                    source_size=geometry.photo_size, size=geometry.crop_size,
                                    quad=np.asarray(geometry.quad, dtype=np.float64))
        out = faces.paste_into(out, crop.unsqueeze(0), aligned)
    return RecoveredPhoto(out[0], torch.stack(crops))
