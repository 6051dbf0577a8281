"""Protect Faces (the whole method on every selected face of each photo, one node), Face Selection Preview (which
faces, numbered, before anything expensive runs) and Recover Photo (the original photo from a protected photo and
its keys).

These call the same core functions as the CLI (``core.pipeline.select_faces`` / ``protect_photo`` /
``recover_photo``) on ComfyUI's MODEL, CLIP and VAE through the bridge's ``ComfyBackend``; nothing here
re-implements a step of the method.
"""
from __future__ import annotations

import hashlib

import torch
from comfy_api.latest import io

from ..core import msi
from ..core.autograd import normal_tensors
from ..core.diffusion import MAX_DDIM_STEPS
from ..core.energies import MODES as TASKS
from ..core.errors import InvalidImageError
from ..core.keys import check_compatible, photo_keys_digest
from ..core.pipeline import ProtectOptions, protect_photo, recover_photo, select_faces
from ..core.selection import FALLBACKS, SELECTION_MODES, FaceSelection, draw_face_numbers
from .comfy.autograd import DifferentiableDecoder
from .comfy.backend import ComfyBackend, ComfyVisionEncoder
from .comfy.models import check_guidance_vae, model_fingerprint, release_memory, to_compute_device
from .comfy.progress import check_interrupt, progress_bar
from .convert import check_size, rgb
from .schema import schema
from .types import (GUIDANCE_VAE_NAME, GUIDANCE_VAE_TOOLTIP, PhotoKeysBatch, PhotoKeysType, PrivacyReceipt,
                    ReceiptType, RecognizerType, VerifiersType)

PROTECT_NODE = "Protect Faces"
PREVIEW_NODE = "Face Selection Preview"
RECOVER_NODE = "Recover Photo"
DEFAULTS = ProtectOptions.preset("anonymize")
SELECTION = FaceSelection()

SELECTION_TOOLTIP = ("Which faces to protect. all: every detected face. largest: only the largest. index: the "
                     "numbers in face_numbers (see the preview: faces are numbered in reading order). "
                     "match_reference: faces that match the reference photo. except_reference: everyone except "
                     "the person in the reference photo. Faces left out are reported, never dropped silently.")
NUMBERS_TOOLTIP = "For selection 'index': face numbers from the preview, e.g. 1,3 or 2-4."
FALLBACK_TOOLTIP = ("A selected face the method cannot process (too small, cut by the border): fail = output "
                    "nothing and list those faces; blur / fill = obscure that face's region instead.")
THRESHOLD_TOOLTIP = ("Cosine similarity at or above which a face matches the reference photo; -1 = the judge's "
                     "own same-person bound (SFace 0.363 when a verifier is connected, else 0.5).")


def selection_inputs(optional: bool = False) -> list:
    """The face-selection widgets shared by Protect Faces, Face Selection Preview and Face Align (same names,
    same order). ``optional``: as optional inputs, for a node they were appended to after its first release
    (saved API graphs without them keep validating and get the defaults)."""
    return [
        io.Combo.Input("selection", options=list(SELECTION_MODES), default=SELECTION.mode, tooltip=SELECTION_TOOLTIP,
                       optional=optional),
        io.String.Input("face_numbers", default="", tooltip=NUMBERS_TOOLTIP, optional=optional),
        io.Combo.Input("fallback", options=list(FALLBACKS), default=SELECTION.fallback, tooltip=FALLBACK_TOOLTIP,
                       optional=optional),
        io.Float.Input("match_threshold", default=-1.0, min=-1.0, max=1.0, step=0.01, tooltip=THRESHOLD_TOOLTIP,
                       optional=optional),
    ]


def selection_from(node: str, selection: str, face_numbers: str, fallback: str,
                   match_threshold: float) -> FaceSelection:
    """FaceSelection from the widgets; errors name the node and the widget."""
    try:
        numbers = FaceSelection.parse_numbers(face_numbers) if selection == "index" else ()
        return FaceSelection(selection, numbers=numbers, fallback=fallback,
                             threshold=None if match_threshold <= -1.0 else float(match_threshold))
    except ValueError as exc:
        widget = "face_numbers" if selection == "index" else "selection"
        raise ValueError(f"{node}: {exc} (widget '{widget}').") from None


def _photos(image, what: str):
    photos = rgb(image, what).float().cpu()
    check_size(photos, what)
    return photos


def _reference(reference, node: str):
    if reference is None:
        return None
    return _photos(reference, f"image at {node}'s 'reference' input")[0]


def _verifiers(verifiers):
    return list(verifiers or [])


class FaceSelectionPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FaceSelectionPreview",
            display_name=PREVIEW_NODE,
            description="Finds every face of each photo and draws them numbered in reading order: green = will "
                        "be protected, grey = left alone by the selection, orange = obscured by the fallback, "
                        "red = cannot be processed. Seconds, not minutes: run it before Protect Faces.",
            inputs=[
                io.Image.Input("image", tooltip="The photo(s); every photo of a batch is shown."),
                *selection_inputs(),
                RecognizerType.Input("recognizer", optional=True,
                                     tooltip="Needed by the reference selections (unless a verifier is connected)."),
                io.Image.Input("reference", optional=True, tooltip="A photo of the person, for the reference "
                                                                   "selections."),
                VerifiersType.Input("verifiers", optional=True,
                                    tooltip="SFace here judges the reference match (it is trained for it)."),
            ],
            outputs=[io.Image.Output(display_name="preview", tooltip="Each photo with numbered face boxes."),
                     io.String.Output(display_name="faces", tooltip="One line per face: what will happen to it.")],
        )

    @classmethod
    def execute(cls, image, selection, face_numbers, fallback, match_threshold, recognizer=None, reference=None,
                verifiers=None) -> io.NodeOutput:
        photos = _photos(image, f"image at {PREVIEW_NODE}'s 'image' input")
        choice = selection_from(PREVIEW_NODE, selection, face_numbers, fallback, match_threshold)
        if choice.needs_reference and recognizer is None and not _verifiers(verifiers):
            raise ValueError(f"{PREVIEW_NODE}: selection '{selection}' compares faces with the reference photo; "
                             f"connect a Face Recognizer Loader to 'recognizer' (or a verifier).")
        previews, lines = [], []
        for i, photo in enumerate(photos, start=1):
            plan = select_faces(to_compute_device(recognizer) if recognizer is not None else None, photo, choice,
                                _reference(reference, PREVIEW_NODE), _verifiers(verifiers))
            previews.append(draw_face_numbers(photo, plan))
            lines.append(f"photo {i}:\n" + plan.summary())
        return io.NodeOutput(torch.stack(previews), "\n".join(lines))


class ProtectFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_ProtectFaces",
            display_name=PROTECT_NODE,
            description="The whole Diff-Privacy method on every selected face of each photo: detection, "
                        "selection, MSI, key-I inversion, identity-guided sampling, the identity gate, paste-back "
                        "and the keys. Same core pipeline as the CLI. Outputs nothing unless every face of every "
                        "photo passed the gate. Minutes per face on a GPU (hours on a CPU at 512 px).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x MODEL (Load Checkpoint); recovery needs the same one."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                RecognizerType.Input("recognizer", tooltip="The guiding face recognizer (Face Recognizer Loader)."),
                io.Image.Input("image", tooltip="The photo(s): every photo of a batch is protected."),
                io.Combo.Input("task", options=list(TASKS), default=DEFAULTS.task,
                               tooltip="anonymize: nobody (people or face recognition) recognises the person. "
                                       "hide: people see someone else, face recognition still matches."),
                io.Combo.Input("speed", options=list(msi.SPEEDS), default="default",
                               tooltip="paper: the paper's recipe in fp32. default: the same MSI timesteps four per "
                                       "step (same math, faster). fast: fewer MSI timesteps and a halved sampling "
                                       "grid; its privacy is only known from the identity gate, which still "
                                       "decides every release."),
                *selection_inputs(),
                io.Int.Input("size", default=DEFAULTS.size, min=64, max=2048, step=64,
                             tooltip=f"Side of each aligned face crop (SD1.x: {DEFAULTS.size})."),
                io.Int.Input("msi_steps", default=0, min=0, max=100000,
                             tooltip="MSI optimisation steps per face; 0 = the speed preset's (the paper's lite "
                                     f"recipe sees {msi.LITE_STEPS} timesteps; faithful, with clip_vision, "
                                     f"{msi.FAITHFUL_STEPS})."),
                io.Int.Input("inversion_steps", default=DEFAULTS.inversion_steps, min=2, max=MAX_DDIM_STEPS,
                             tooltip="DDIM steps of key-I's inversion; recovery uses the same."),
                io.Int.Input("steps", default=0, min=0, max=MAX_DDIM_STEPS,
                             tooltip="Guided DDIM steps; 0 = the task's preset (anonymize 50, hide 100)."),
                io.Int.Input("batch_size", default=0, min=0, max=64,
                             tooltip="Results per photo; 0 = the task's preset (anonymize 4, hide 1)."),
                io.Int.Input("seed", default=-1, min=-1, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Sampling seed; -1 = the task's preset seed."),
                io.Float.Input("max_identity_similarity", default=DEFAULTS.max_identity_similarity, min=-1.0,
                               max=1.0, step=0.01,
                               tooltip="Anonymize fails closed when a result's cosine to its source exceeds this."),
                io.Image.Input("reference", optional=True, tooltip="A photo of the person, for the reference "
                                                                   "selections."),
                VerifiersType.Input("verifiers", optional=True,
                                    tooltip="Independent verifiers for the identity gate (Face Verifier Loader)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP ViT-L/14 vision: the paper's faithful MSI (else lite)."),
                io.Vae.Input("guidance_vae", optional=True, tooltip=GUIDANCE_VAE_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="batch_size protected photos per input photo."),
                io.Image.Output(display_name="preview", tooltip="Each input photo with its numbered faces."),
                PhotoKeysType.Output(display_name="keys", tooltip="Recovery keys, one set per photo (secret): "
                                                                  "connect to Save Privacy Keys."),
                ReceiptType.Output(display_name="receipt", tooltip="Proof the gate passed; Save Privacy Keys and "
                                                                   "Save Protected Image take it."),
                io.String.Output(display_name="report", tooltip="The privacy report's summary per photo."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, recognizer, image, task, speed, selection, face_numbers, fallback,
                match_threshold, size, msi_steps, inversion_steps, steps, batch_size, seed, max_identity_similarity,
                reference=None, verifiers=None, clip_vision=None, guidance_vae=None) -> io.NodeOutput:
        if guidance_vae is not None:  # checked before any work
            check_guidance_vae(guidance_vae, PROTECT_NODE)
        photos = _photos(image, f"image at {PROTECT_NODE}'s 'image' input")
        choice = selection_from(PROTECT_NODE, selection, face_numbers, fallback, match_threshold)
        ref = _reference(reference, PROTECT_NODE)
        sampling = {k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v > 0}
        if seed >= 0:
            sampling["seed"] = seed
        mode = "faithful" if clip_vision is not None else "lite"
        try:
            msi_options = msi.MSIOptions.preset(mode, speed, **({"steps": msi_steps} if msi_steps > 0 else {}))
            options = ProtectOptions.preset(task, speed, size=size, msi=msi_options, inversion_steps=inversion_steps,
                                            sampling=sampling, max_identity_similarity=max_identity_similarity)
        except ValueError as exc:
            raise ValueError(f"{PROTECT_NODE}: {exc}") from None
        recognizer = to_compute_device(recognizer)
        verifiers = _verifiers(verifiers)
        # every photo's faces are found and selected first: a bad photo stops the run before any MSI step
        plans = [select_faces(recognizer, photo, choice, ref, verifiers) for photo in photos]
        backend = ComfyBackend(model, clip, vae, trainable=True)
        vision = ComfyVisionEncoder(clip_vision) if clip_vision is not None else None
        bars: dict[str, object] = {}

        def progress(stage: str, step: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress_bar(total, f"{stage} ")
            bars[stage](step, total, None)

        guidance_decoder = None
        if guidance_vae is not None:  # the guidance gradient only; results decode through 'vae'
            guidance_decoder = DifferentiableDecoder(guidance_vae, model)
            guidance_decoder.name = GUIDANCE_VAE_NAME
        results = []
        with normal_tensors():
            for photo, plan in zip(photos, plans):
                results.append(protect_photo(backend, recognizer, photo, options, selection=choice, plan=plan,
                                             verifiers=verifiers, vision=vision, guidance_decoder=guidance_decoder,
                                             progress=progress, cancel=check_interrupt))
        keys = PhotoKeysBatch(tuple(r.keys for r in results if r.keys is not None))
        reports = tuple(r.report for r in results)
        receipt = PrivacyReceipt(keys_digest=batch_digest(keys), model_fingerprint=model_fingerprint(model),
                                 report=reports[0], reports=reports, samples=options.sampling.batch_size)
        summary = "\n".join(f"photo {i}: " + r.report.summary() for i, r in enumerate(results, start=1))
        images = torch.cat([r.photos for r in results])
        previews = torch.stack([r.preview for r in results])
        del backend
        release_memory()
        return io.NodeOutput(images, previews, keys, receipt, summary)


def batch_digest(keys: PhotoKeysBatch) -> str:
    """The receipt's digest of a batch's keys (each photo's :func:`core.keys.photo_keys_digest`, in order)."""
    return hashlib.sha256("|".join(photo_keys_digest(k) for k in keys.photos).encode()).hexdigest()


class RecoverPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_RecoverPhoto",
            display_name=RECOVER_NODE,
            description="Restores the original photo from the protected photo and its keys: every face is "
                        "regenerated from key-E and key-I and pasted back where it was. Needs the checkpoint "
                        "the keys were made with and the protected photo as it was saved (same size).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x MODEL the keys were made with."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                PhotoKeysType.Input("keys", tooltip="From Load Privacy Keys' 'photo_keys' output."),
                io.Image.Input("image", tooltip="The protected photo (Load Image), as it was saved."),
            ],
            outputs=[io.Image.Output(display_name="photo", tooltip="The original photo."),
                     io.Image.Output(display_name="faces", tooltip="The recovered aligned faces.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, keys, image) -> io.NodeOutput:
        what = f"image at {RECOVER_NODE}'s 'image' input"
        photos = _photos(image, what)
        if len(keys.photos) != 1:
            raise ValueError(f"{RECOVER_NODE}: the 'keys' input holds the keys of {len(keys.photos)} photos; "
                             f"recover one photo at a time (Load Privacy Keys opens one key file).")
        photo_keys = keys.photos[0]
        check_compatible(photo_keys.metadata, model_fingerprint(model))
        backend = ComfyBackend(model, clip, vae, trainable=False)
        try:
            outs = [recover_photo(backend, photo_keys, photo, cancel=check_interrupt) for photo in photos]
        except InvalidImageError as exc:
            raise InvalidImageError(f"{RECOVER_NODE}: {exc}") from None
        release_memory()
        return io.NodeOutput(torch.stack([o.photo for o in outs]), outs[0].crops)
