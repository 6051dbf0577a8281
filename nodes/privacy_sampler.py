"""Privacy Sampler (guided DDIM from a partially noised face, then the identity gate) and Recover (DDIM from
key-I with key-E)."""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..core import sampling
from ..core.diffusion import MAX_DDIM_STEPS
from ..core.energies import BackgroundPaste, IdentityGuidance, mask_to_latent
from ..core.gate import check_identity_gate
from ..core.keys import check_compatible, stage_conds_digest
from ..core.pipeline import CHECKPOINT_VAE, faces_still_detected, score_results
from ..core.report import FaceEntry, PrivacyReport, draw_preview, outside_face_metrics, settings_dict
from ..core.schedules import EmbeddingSchedule
from .comfy.autograd import DifferentiableDecoder
from .comfy.models import (check_guidance_vae, check_model, check_vae, decode_to_images, encode_image, load_models,
                           model_fingerprint, release_memory, to_comfy_latent, to_scaled_latent)
from .comfy.sampling import run_plan_in_comfy
from .convert import mask_batch, to_comfy_image, to_model_image
from .embedding_scheduler import scheduled_conditioning
from .schema import schema
from .types import (CATEGORY, GUIDANCE_VAE_NAME, GUIDANCE_VAE_TOOLTIP, GuidanceType, PrivacyEmbedsType, PrivacyReceipt,
                    ReceiptType, VerifiersType)

#: the widgets' defaults are the official anonymization settings (hide's are in workflows/hide.json)
ANONYMIZE = sampling.SamplingOptions.preset("anonymize")
NODE = "Privacy Sampler"
RECOVER_NODE = "Recover Original"
IMAGE = "image at Privacy Sampler's 'image' input"
#: the report's preset label: the node's widgets are the settings (recorded in full in the report)
REPORT_PRESET = "custom"


def check_embeds_in_conditioning(embeds, conditioning) -> None:
    """Refuse key-E that did not make ``conditioning``: the receipt would vouch for keys of another run.

    Embedding Scheduler copies the stage conditionings of its key-E into the CONDITIONING unchanged, one entry per
    stage holding that stage of every face in order ([N,77,D]), so at least one entry must have N rows, row i
    equal to a stage conditioning of face i of ``embeds``.

    Raises:
        ValueError: naming both inputs and how to connect them.
    """
    stages = embeds.face_conds.detach().float().cpu()  # [N,S,77,D]
    for tensor, _ in conditioning:
        entry = tensor.detach().float().cpu()
        if entry.dim() == 3 and entry.shape[0] == stages.shape[0] and entry.shape[1:] == stages.shape[2:]:
            if all(any(torch.equal(row, stage) for stage in face) for row, face in zip(entry, stages)):
                return
    raise ValueError("Privacy Sampler: the key-E at its 'embeds' input did not make its 'conditioning' (no stage "
                     "conditioning of those embeds is in it, face by face). Connect the same MSI Invert 'embeds' "
                     "output to Embedding Scheduler and to Privacy Sampler's 'embeds' input.")


def check_face_counts(faces: int, guidance, conditioning, embeds, background_mask) -> None:
    """Every per-face input of Privacy Sampler must describe the same N faces as its source, or the sampler would
    guide or condition a face with another face's identity.

    Raises:
        ValueError: naming the input whose face count differs and what to connect.
    """
    def refuse(what: str, count: int) -> None:
        raise ValueError(f"Privacy Sampler: its source ('image' or 'latent') holds {faces} face(s), but {what} "
                         f"holds {count}. Connect the same Face Align 'aligned' output to MSI Invert, Identity "
                         f"Energy Guidance and Privacy Sampler, and its 'background_mask' to Privacy Sampler.")

    if guidance.faces != faces:
        refuse("the guidance from Identity Energy Guidance (its 'source' input)", guidance.faces)
    if embeds is not None and embeds.num_faces != faces:
        refuse("the key-E at its 'embeds' input", embeds.num_faces)
    for tensor, _ in conditioning:
        if tensor.dim() >= 1 and tensor.shape[0] not in (1, faces):
            refuse("an entry of its 'conditioning' (Embedding Scheduler's key-E)", int(tensor.shape[0]))
    if background_mask is not None:
        count = mask_batch(background_mask).shape[0]
        if count not in (1, faces):
            refuse("its 'background_mask'", count)


def face_region(background_mask: torch.Tensor, size: tuple[int, int], face: int = 0) -> torch.Tensor:
    """The face region [H,W] of face ``face``'s aligned crop (1 where its ``background_mask`` < 1, i.e. everything
    the sampler may change), at the results' size; a mask of batch 1 serves every face."""
    masks = mask_batch(background_mask).float().cpu()
    mask = masks[face if masks.shape[0] > 1 else 0].unsqueeze(0)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    return (mask[0, 0] < 1.0).float()


def bind_guidance(spec, vae, model) -> IdentityGuidance:
    """core IdentityGuidance from a GuidanceSpec, decoding through a private copy of ComfyUI's VAE."""
    return IdentityGuidance(decode=DifferentiableDecoder(vae, model), recognizer=spec.recognizer,
                            crop=spec.crop, source_embedding=spec.source_embedding, mode=spec.mode,
                            diversity_weight=spec.diversity_weight, step_size=spec.step_size,
                            target=spec.target, max_grad_norm=spec.max_grad_norm, faces=spec.faces)


class PrivacySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_PrivacySampler",
            display_name="Privacy Sampler",
            category=CATEGORY,
            description="Diff-Privacy's guided DDIM: noises the face to the strength's timestep and denoises it "
                        "with the scheduled conditioning and identity guidance at every step. Then the identity "
                        "gate: every result is scored against the source by the guiding recognizer and every "
                        "verifier; unless all scores are finite and (anonymize) within their bounds, the node "
                        "fails and outputs nothing — no image, no receipt, so no keys are saved. N source faces "
                        "(Face Align's batch) give N×batch_size images, sample-major: sample b of face i is image "
                        "b·N + i, each conditioned, guided, pasted and gated with its own face.",
            inputs=[
                io.Model.Input("model", tooltip="The same SD1.x MODEL used by MSI Invert."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (encodes the source, decodes results, and "
                                            "carries the guidance gradient unless 'guidance_vae' is connected)."),
                io.Conditioning.Input("conditioning", tooltip="From Embedding Scheduler."),
                GuidanceType.Input("guidance", tooltip="From Identity Energy Guidance."),
                io.Int.Input("steps", default=ANONYMIZE.steps, min=2, max=MAX_DDIM_STEPS,
                             tooltip="DDIM grid size (paper: 50 anonymize, 100 hide); denoising runs "
                                     "int(strength·steps) of them."),
                io.Float.Input("strength", default=ANONYMIZE.strength, min=0.01, max=1.0, step=0.01,
                               tooltip="How far the face is noised (paper: 0.6 anonymize → t=601, 0.8 hide → 801)."),
                io.Int.Input("batch_size", default=ANONYMIZE.batch_size, min=1, max=64,
                             tooltip="Samples B of each source face, sample b with seeded noise b as a face alone "
                                     "gets (paper: 4 / 1)."),
                io.Int.Input("seed", default=ANONYMIZE.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (paper: 125 anonymize, 100162 hide)."),
                io.Int.Input("paste_below_timestep", default=BackgroundPaste.below_timestep, min=0, max=1000, step=100,
                             tooltip="With a background mask: paste the source background back while "
                                     "⌊t/100⌋ < this/100 (paper: 300)."),
                io.Image.Input("image", optional=True,
                               tooltip="The aligned source face(s) from Face Align (or give a LATENT)."),
                io.Latent.Input("latent", optional=True, tooltip="The source as a LATENT instead of an IMAGE."),
                io.Mask.Input("background_mask", optional=True,
                              tooltip="1 = background to keep from the source (Face Align's mask: one "
                                      "per face, or one for every face)."),
                VerifiersType.Input("verifiers", optional=True,
                                    tooltip="Independent recognizers (Face Verifier Loader) that must also find "
                                            "that no result matches the source, each at its own bound."),
                PrivacyEmbedsType.Input("embeds", optional=True,
                                        tooltip="key-E from MSI Invert (the one Embedding Scheduler uses): the "
                                                "receipt then vouches for these keys, so Save Privacy Keys "
                                                "accepts it."),
                io.Vae.Input("guidance_vae", optional=True, tooltip=GUIDANCE_VAE_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="N×batch_size protected faces, sample-major (image b·N + i is sample b of "
                                        "face i)."),
                io.Latent.Output(display_name="latent"),
                ReceiptType.Output(display_name="receipt",
                                   tooltip="Proof that the identity gate passed, for Save Privacy Keys (and the "
                                           "report sidecar of Save Protected Image)."),
                io.String.Output(display_name="report", tooltip="The privacy report's summary."),
                io.Image.Output(display_name="preview",
                                tooltip="Each source face boxed green (gate passed) with its worst scores."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, conditioning, guidance, steps, strength, batch_size, seed, paste_below_timestep,
                image=None, latent=None, background_mask=None, verifiers=None, embeds=None,
                guidance_vae=None) -> io.NodeOutput:
        started = time.monotonic()
        check_model(model, NODE)
        check_vae(vae, NODE)
        if guidance_vae is not None:
            check_guidance_vae(guidance_vae, NODE)
        verifiers = tuple(verifiers or ())
        load_models(model)
        sources = None
        if latent is not None:
            z0 = to_scaled_latent(model, latent)
        elif image is not None:
            pixels = to_comfy_image(to_model_image(image, IMAGE))
            z0 = encode_image(vae, model, pixels)
            sources = pixels.float().cpu()
        else:
            raise ValueError("Privacy Sampler needs the source face: connect 'image' (or 'latent').")
        faces = int(z0.shape[0])
        check_face_counts(faces, guidance, conditioning, embeds, background_mask)
        if embeds is not None:
            check_embeds_in_conditioning(embeds, conditioning)
        options = sampling.SamplingOptions(steps=steps, strength=strength, batch_size=batch_size, seed=seed)
        # sample-major (sample b of face i at b·N + i): ComfyUI tiles the N-face conditioning the same way
        plan = sampling.faces_protection_plan(z0, options)
        bound = bind_guidance(guidance, guidance_vae if guidance_vae is not None else vae, model)
        background = None
        if background_mask is not None:
            mask = mask_to_latent(mask_batch(background_mask).to(z0.device), tuple(z0.shape[-2:]))
            mask = mask.expand(faces, -1, -1, -1)
            background = BackgroundPaste(sampling.sample_major(mask, batch_size), sampling.sample_major(z0, batch_size),
                                         below_timestep=paste_below_timestep)
        z = run_plan_in_comfy(model, conditioning, plan, seed, guidance=bound, background=background,
                              grad_through_unet=guidance.target == "xt")
        out = to_comfy_latent(model, z)
        images = decode_to_images(vae, out["samples"])
        # the gate judges the images that are output: decoded by 'vae' (never by a guidance_vae), once
        with torch.no_grad():
            pixels = images.float().to(z.device).permute(0, 3, 1, 2) * 2.0 - 1.0
            similarities = bound.image_similarities(pixels).cpu()
        if sources is None:  # a LATENT source: judge against what it decodes to
            sources = decode_to_images(vae, to_comfy_latent(model, z0)["samples"]).float().cpu()
        results = images.float().cpu()
        # the gate (core/gate.py), every face on its own samples: nothing below runs, and nothing is output,
        # unless every score of every face passes
        scores = []
        for face in range(faces):
            scores += score_results(guidance.mode, (guidance.recognizer.name,
                                                    sampling.face_samples(similarities, faces, face)),
                                    sources[face], sampling.face_samples(results, faces, face), verifiers,
                                    guidance.max_identity_similarity, face=face)
        scores = check_identity_gate(scores)
        height, width = results.shape[1:3]
        outside = []
        if background_mask is not None:
            for k in range(results.shape[0]):  # in the order of the images output (sample-major)
                outside += outside_face_metrics(sources[k % faces], results[k : k + 1],
                                                face_region(background_mask, (height, width), k % faces))
        fingerprint = model_fingerprint(model)
        # face k of the report (FaceEntry.index, IdentityScore.face) is image k of the source input (0-based)
        entries = [FaceEntry(face, (0.0, 0.0, float(width), float(height)), [s for s in scores if s.face == face],
                             faces_still_detected(sampling.face_samples(results, faces, face), verifiers))
                   for face in range(faces)]
        report = PrivacyReport(
            task=guidance.mode, preset=REPORT_PRESET,
            settings=report_settings(options, guidance, paste_below_timestep, background_mask is not None, verifiers,
                                     faces, guidance_vae is not None),
            model={"unet": fingerprint}, faces=entries, outside_faces=outside,
            seconds=time.monotonic() - started)
        receipt = PrivacyReceipt(keys_digest="" if embeds is None else stage_conds_digest(embeds.stage_conds),
                                 model_fingerprint=fingerprint, report=report)
        preview = torch.stack([draw_preview(sources[face], dataclasses.replace(report, faces=[entries[face]]))
                               for face in range(faces)])
        release_memory()
        return io.NodeOutput(images, out, receipt, report.summary(), preview)


def report_settings(options, guidance, paste_below_timestep: int, background: bool, verifiers, faces: int = 1,
                    own_guidance_vae: bool = False) -> dict:
    """The run's settings for the privacy report: numbers and names only (JSON-safe)."""
    return {"sampling": settings_dict(options), "faces": int(faces), "paste_below_timestep": int(paste_below_timestep),
            "guidance_decoder": GUIDANCE_VAE_NAME if own_guidance_vae else CHECKPOINT_VAE,
            "background_kept": bool(background),
            "guidance": {"mode": guidance.mode, "recognizer": guidance.recognizer.name,
                         "step_size": settings_dict(guidance.step_size), "diversity_weight": guidance.diversity_weight,
                         "gradient_target": guidance.target, "max_grad_norm": guidance.max_grad_norm,
                         "max_identity_similarity": guidance.max_identity_similarity},
            "verifiers": [{"name": v.name, "bound": float(v.bound)} for v in verifiers]}


class Recover(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_Recover",
            display_name="Recover Original",
            category=CATEGORY,
            description="Restores the original face from its keys: DDIM from key-I with the key-E stage "
                        "conditionings at every step. Needs the same checkpoint the keys were made with.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x MODEL the keys were made with."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                PrivacyEmbedsType.Input("embeds", tooltip="key-E from Load Privacy Keys (or MSI Invert)."),
                io.Latent.Input("key_latent", tooltip="key-I from Load Privacy Keys (or MSI Invert)."),
            ],
            outputs=[io.Image.Output(display_name="image",
                                     tooltip="The recovered aligned face(s), one per face of the keys.")],
        )

    @classmethod
    def execute(cls, model, vae, embeds, key_latent) -> io.NodeOutput:
        check_model(model, RECOVER_NODE)
        check_vae(vae, RECOVER_NODE)
        load_models(model)
        meta = embeds.metadata
        check_compatible(meta, model_fingerprint(model))
        z_T = to_scaled_latent(model, key_latent)
        if z_T.shape[0] != embeds.num_faces:
            raise ValueError(f"Recover Original: its 'key_latent' holds {z_T.shape[0]} latent(s) but its 'embeds' the "
                             f"key-E of {embeds.num_faces} face(s); connect both outputs of the same Load Privacy Keys "
                             f"(or MSI Invert).")
        plan = sampling.recovery_plan(z_T, meta.ddim_steps)
        # key-E of N faces is a conditioning of batch N over N latents: face i's key-E recovers latent i
        conditioning = scheduled_conditioning(embeds, None, EmbeddingSchedule.preset("recover"))
        z0 = run_plan_in_comfy(model, conditioning, plan, seed=0)
        images = decode_to_images(vae, to_comfy_latent(model, z0)["samples"])
        release_memory()
        return io.NodeOutput(images)
