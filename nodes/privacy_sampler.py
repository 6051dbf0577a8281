"""Privacy Sampler (guided DDIM from a partially noised face) and Recover (DDIM from key-I with key-E)."""
from __future__ import annotations

from comfy_api.latest import io

from ..core import sampling
from ..core.diffusion import MAX_DDIM_STEPS
from ..core.energies import BackgroundPaste, IdentityGuidance, mask_to_latent
from ..core.keys import check_compatible
from ..core.pipeline import check_protected
from ..core.schedules import EmbeddingSchedule
from .comfy.autograd import DifferentiableDecoder
from .comfy.models import (decode_to_images, encode_image, load_models, model_fingerprint, release_memory,
                           to_comfy_latent, to_scaled_latent)
from .comfy.sampling import run_plan_in_comfy
from .convert import mask_batch, to_comfy_image, to_model_image
from .embedding_scheduler import scheduled_conditioning
from .types import CATEGORY, GuidanceType, PrivacyEmbedsType

#: the widgets' defaults are the official anonymization settings (hide's are in workflows/hide.json)
ANONYMIZE = sampling.SamplingOptions.preset("anonymize")
IMAGE = "image at Privacy Sampler's 'image' input"


def bind_guidance(spec, vae, model) -> IdentityGuidance:
    """core IdentityGuidance from a GuidanceSpec, decoding through a private copy of ComfyUI's VAE."""
    return IdentityGuidance(decode=DifferentiableDecoder(vae, model), recognizer=spec.recognizer,
                            crop=spec.crop, source_embedding=spec.source_embedding, mode=spec.mode,
                            diversity_weight=spec.diversity_weight, step_size=spec.step_size,
                            target=spec.target, max_grad_norm=spec.max_grad_norm)


class PrivacySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacy_PrivacySampler",
            display_name="Privacy Sampler",
            category=CATEGORY,
            description="Diff-Privacy's guided DDIM: noises the face to the strength's timestep and denoises it "
                        "with the scheduled conditioning and identity guidance at every step.",
            inputs=[
                io.Model.Input("model", tooltip="The same SD1.x MODEL used by MSI Invert."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (encodes the source, decodes results, and "
                                            "carries the guidance gradient)."),
                io.Conditioning.Input("conditioning", tooltip="From Embedding Scheduler."),
                GuidanceType.Input("guidance", tooltip="From Identity Energy Guidance."),
                io.Int.Input("steps", default=ANONYMIZE.steps, min=2, max=MAX_DDIM_STEPS,
                             tooltip="DDIM grid size (paper: 50 anonymize, 100 hide); denoising runs "
                                     "int(strength·steps) of them."),
                io.Float.Input("strength", default=ANONYMIZE.strength, min=0.01, max=1.0, step=0.01,
                               tooltip="How far the face is noised (paper: 0.6 anonymize → t=601, 0.8 hide → 801)."),
                io.Int.Input("batch_size", default=ANONYMIZE.batch_size, min=1, max=64,
                             tooltip="Samples of the one source, each with its own seeded noise (paper: 4 / 1)."),
                io.Int.Input("seed", default=ANONYMIZE.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (paper: 125 anonymize, 100162 hide)."),
                io.Int.Input("paste_below_timestep", default=BackgroundPaste.below_timestep, min=0, max=1000, step=100,
                             tooltip="With a background mask: paste the source background back while "
                                     "⌊t/100⌋ < this/100 (paper: 300)."),
                io.Image.Input("image", optional=True, tooltip="The aligned source face (or give a LATENT)."),
                io.Latent.Input("latent", optional=True, tooltip="The source as a LATENT instead of an IMAGE."),
                io.Mask.Input("background_mask", optional=True,
                              tooltip="1 = background to keep from the source (e.g. Face Align's mask)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="batch_size protected faces."),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def execute(cls, model, vae, conditioning, guidance, steps, strength, batch_size, seed, paste_below_timestep,
                image=None, latent=None, background_mask=None) -> io.NodeOutput:
        load_models(model)
        if latent is not None:
            z0 = to_scaled_latent(model, latent)[:1]
        elif image is not None:
            z0 = encode_image(vae, model, to_comfy_image(to_model_image(image[:1], IMAGE)))
        else:
            raise ValueError("Privacy Sampler needs the source face: connect 'image' (or 'latent').")
        options = sampling.SamplingOptions(steps=steps, strength=strength, batch_size=batch_size, seed=seed)
        plan = sampling.protection_plan(z0, options)
        bound = bind_guidance(guidance, vae, model)
        background = None
        if background_mask is not None:
            mask = mask_to_latent(mask_batch(background_mask)[:1].to(z0.device), tuple(z0.shape[-2:]))
            background = BackgroundPaste(mask, z0, below_timestep=paste_below_timestep)
        z = run_plan_in_comfy(model, conditioning, plan, seed, guidance=bound, background=background,
                              grad_through_unet=guidance.target == "xt")
        if guidance.mode == "anonymize" and guidance.max_identity_similarity < 1.0:
            check_protected(bound.similarities(z), guidance.max_identity_similarity)
        out = to_comfy_latent(model, z)
        images = decode_to_images(vae, out["samples"])
        release_memory()
        return io.NodeOutput(images, out)


class Recover(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
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
            outputs=[io.Image.Output(display_name="image", tooltip="The recovered face.")],
        )

    @classmethod
    def execute(cls, model, vae, embeds, key_latent) -> io.NodeOutput:
        load_models(model)
        meta = embeds.metadata
        check_compatible(meta, model_fingerprint(model))
        plan = sampling.recovery_plan(to_scaled_latent(model, key_latent), meta.ddim_steps)
        conditioning = scheduled_conditioning(embeds, None, EmbeddingSchedule.preset("recover"))
        z0 = run_plan_in_comfy(model, conditioning, plan, seed=0)
        images = decode_to_images(vae, to_comfy_latent(model, z0)["samples"])
        release_memory()
        return io.NodeOutput(images)

