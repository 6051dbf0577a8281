"""Face Recognizer Loader and Identity Energy Guidance."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.energies import MODES, TARGETS, IdentityGuidance, StepSizeSchedule
from ..core.gate import check_identity_gate
from ..core.pipeline import GUIDANCE_CROPS, ProtectOptions, face_crop_for, score_results
from ..core.recognizers import FaceCrops, load_recognizer, reference_embedding
from ..core.sampling import face_samples
from .comfy.folders import KNOWN_RECOGNIZER_FILES, list_recognizer_files, missing_recognizer_message, recognizer_path
from .comfy.models import check_model, check_vae, to_compute_device
from .comfy.sampling import EXACT_SAMPLERS, PrivacyGuider
from .convert import rgb, to_model_image
from .schema import schema
from .types import CATEGORY, GuidanceSpec, GuidanceType, RecognizerType

STEP_SCHEDULES = ["official", "constant"]
#: the widgets' defaults are the core's anonymization defaults
DEFAULTS = ProtectOptions.preset("anonymize")
NODE = "Identity Energy Guidance"
SOURCE = "image at Identity Energy Guidance's 'source' input"


def describe_step_sizes(schedule: StepSizeSchedule) -> str:
    """ρ(t) in words: "ρ=1" or "ρ=1.5 for t>600, 2.5 below"."""
    parts = [f"ρ={rho:g} for t>{t}" for t, rho in schedule.steps]
    return ", ".join(parts + [f"{schedule.default:g} below"]) if parts else f"ρ={schedule.default:g}"


STEP_SCHEDULE_TOOLTIP = (f"official: {describe_step_sizes(StepSizeSchedule.preset('anonymize'))} (anonymize); "
                         f"{describe_step_sizes(StepSizeSchedule.preset('hide'))} (hide). "
                         f"constant: ρ=step_scale everywhere.")
GUIDER_TOOLTIP = (f"For SamplerCustomAdvanced (needs model, vae and conditioning), with the "
                  f"{' or '.join(EXACT_SAMPLERS)} sampler only: its x̂₀ correction reproduces the official "
                  f"update exactly for their deterministic first-order step, so other samplers are refused. "
                  f"After sampling it runs the identity gate with this recognizer (anonymize: bounded by "
                  f"max_identity_similarity) and fails, returning nothing, unless every result passes.")


def guider_gate(spec: GuidanceSpec):
    """The identity gate of the GUIDER output: ``gate(guidance, z)`` scores the sampled latents z (scaled)
    with the guiding recognizer through the guidance's own decoder and raises ProtectionFailedError (core/gate.py)
    unless every score passes. No verifier is configured here, so only the guiding scores exist. With N source
    faces the batch is sample-major and each face is scored on its own samples (face i: rows i, i+N, …)."""

    def gate(guidance: IdentityGuidance, z) -> None:
        similarities = guidance.similarities(z)
        scores = []
        for face in range(spec.faces):
            scores += score_results(spec.mode, (spec.recognizer.name, face_samples(similarities, spec.faces, face)),
                                    None, None, (), spec.max_identity_similarity, face=face)
        check_identity_gate(scores)
    return gate


def guidance_crop(mode: str, recognizer, sources: torch.Tensor):
    """The recognizer's view of each source face [N,S,S,3] in [0,1] for crop ``mode``: one FaceCrop when it is
    the same for every face, else FaceCrops (mode "detect": each face's own box)."""
    crops = [face_crop_for(mode, recognizer, source) for source in sources]
    return crops[0] if all(c == crops[0] for c in crops) else FaceCrops(tuple(crops))


class FaceRecognizerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FaceRecognizerLoader",
            display_name="Face Recognizer Loader",
            category=CATEGORY,
            description=f"Loads a face recognizer from models/face_recognition: FaceNet VGGFace2 "
                        f"({KNOWN_RECOGNIZER_FILES['facenet']}) or ArcFace IR-SE50 "
                        f"({KNOWN_RECOGNIZER_FILES['arcface']}). Never downloads.",
            inputs=[
                io.Combo.Input("recognizer_name", options=list_recognizer_files(),
                               tooltip="Weight file in ComfyUI's models/face_recognition folder."),
                io.Combo.Input("kind", options=["auto", "facenet", "arcface"], default="auto",
                               tooltip="Architecture; auto detects it from the file's parameter names."),
            ],
            outputs=[RecognizerType.Output(display_name="recognizer")],
        )

    @classmethod
    def validate_inputs(cls, recognizer_name):
        if recognizer_name not in list_recognizer_files():
            return missing_recognizer_message(recognizer_name)
        return True

    @classmethod
    def execute(cls, recognizer_name, kind) -> io.NodeOutput:
        path = recognizer_path(recognizer_name)
        return io.NodeOutput(load_recognizer(path, kind))


class IdentityEnergyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_IdentityEnergyGuidance",
            display_name="Identity Energy Guidance",
            category=CATEGORY,
            description="Gradient of a face-recognition energy on the predicted clean image at every step: "
                        "anonymize pushes away from the source identity (and the samples apart), hide pulls "
                        "machine identity toward the source. N source faces: each sample of the sampler's "
                        "sample-major batch (sample b of face i at b·N + i) is guided by its own face, and only a "
                        "face's own samples are pushed apart. Also a GUIDER for SamplerCustomAdvanced.",
            inputs=[
                RecognizerType.Input("recognizer", tooltip="From Face Recognizer Loader (paper: ArcFace for "
                                                           "anonymize, FaceNet for hide)."),
                io.Image.Input("source", tooltip="The faces being protected (the same aligned images as MSI Invert): "
                                                 "each sample is guided toward/away from its own face."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULTS.task,
                               tooltip="anonymize: FR must not match the source; hide: FR must still match."),
                io.Combo.Input("step_schedule", options=STEP_SCHEDULES, default="official",
                               tooltip=STEP_SCHEDULE_TOOLTIP),
                io.Float.Input("step_scale", default=DEFAULTS.step_scale, min=0.0, max=100.0, step=0.05,
                               tooltip="Multiplies the official step sizes (or is ρ for 'constant'); 0 = off."),
                io.Float.Input("diversity_weight", default=IdentityGuidance.diversity_weight, min=0.0, max=10.0,
                               step=0.05,
                               tooltip="anonymize only: weight of the term pushing the batch's faces apart."),
                io.Combo.Input("crop", options=list(GUIDANCE_CROPS), default=DEFAULTS.crop,
                               tooltip="official: ArcFace FFHQ crop / FaceNet whole image; detect: MTCNN box on "
                                       "the source, reused for every sample (robust for unaligned inputs)."),
                io.Combo.Input("gradient_target", options=list(TARGETS), default=IdentityGuidance.target,
                               tooltip="x0: through the VAE decoder only (official, cheaper); xt: also through "
                                       "the UNet (FreeDoM-style, ~2× cost)."),
                io.Float.Input("max_grad_norm", default=0.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Per-sample gradient L2 clip; 0 = off (official)."),
                io.Float.Input("max_identity_similarity", default=DEFAULTS.max_identity_similarity, min=-1.0, max=1.0,
                               step=0.01,
                               tooltip="anonymize: fail (no output) if any result's cosine similarity to the "
                                       "source under this recognizer exceeds this (Privacy Sampler and the "
                                       "GUIDER). 1 leaves only the check that every score is a number."),
                io.Model.Input("model", optional=True, tooltip="Only for the GUIDER output."),
                io.Vae.Input("vae", optional=True, tooltip="Only for the GUIDER output."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Only for the GUIDER output (from Embedding Scheduler)."),
            ],
            outputs=[
                GuidanceType.Output(display_name="guidance", tooltip="For Privacy Sampler."),
                io.Guider.Output(display_name="guider", tooltip=GUIDER_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, recognizer, source, mode, step_schedule, step_scale, diversity_weight, crop,
                gradient_target, max_grad_norm, max_identity_similarity, model=None, vae=None,
                conditioning=None) -> io.NodeOutput:
        if model is not None:  # the GUIDER's model: refused before any work, like MSI Invert's and the sampler's
            check_model(model, NODE)
        if vae is not None:
            check_vae(vae, NODE)
        recognizer = to_compute_device(recognizer)
        src = to_model_image(source, SOURCE)  # checks the size first, in the node's terms
        face_crop = guidance_crop(crop, recognizer, rgb(source, SOURCE).float().cpu())
        crops = face_crop.crops if isinstance(face_crop, FaceCrops) else [face_crop] * src.shape[0]
        # one embedding per face (reference_embedding would average several images into one identity)
        embedding = torch.cat([reference_embedding(recognizer, c, src[i : i + 1]) for i, c in enumerate(crops)])
        if step_schedule == "official":
            steps = StepSizeSchedule.preset(mode).scaled(step_scale)
        else:
            steps = StepSizeSchedule.constant(step_scale)
        spec = GuidanceSpec(recognizer=recognizer, crop=face_crop, source_embedding=embedding, mode=mode,
                            diversity_weight=diversity_weight, step_size=steps, target=gradient_target,
                            max_grad_norm=max_grad_norm or None, max_identity_similarity=max_identity_similarity,
                            extra={"source_size": tuple(src.shape[-2:]), "recognizer": recognizer.name})
        guider = None
        if model is not None and vae is not None and conditioning is not None:
            from .privacy_sampler import bind_guidance
            guider = PrivacyGuider(model, conditioning, lambda: bind_guidance(spec, vae, model), gate=guider_gate(spec))
        return io.NodeOutput(spec, guider)
