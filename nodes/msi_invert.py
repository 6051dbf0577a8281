"""MSI Invert: learn the 10 stage conditionings of each face (key-E) and DDIM-invert it (key-I).

N aligned faces give N independent fits, run as one batch through the UNet, text encoder and VAE (each what that
face alone gives with the same seed, to floating-point tolerance): key-E of N faces ([N,10,…], one face keeps the
single-face layout) and key-I [N,4,h,w], in the order of the images."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import msi, sampling
from ..core.autograd import as_normal, normal_tensors
from ..core.diffusion import MAX_DDIM_STEPS
from ..core.keys import KeyMetadata
from ..core.pipeline import ProtectOptions, faces_label
from .comfy.backend import ComfyBackend, ComfyVisionEncoder
from .comfy.models import check_clip, check_model, check_vae, release_memory, to_comfy_latent
from .comfy.progress import check_interrupt, progress_bar
from .convert import to_model_image
from .schema import schema
from .types import CATEGORY, PrivacyEmbeds, PrivacyEmbedsType

#: the widgets' defaults are the core's: faithful MSI's default recipe, the pipeline's inversion steps
MSI_DEFAULTS = msi.MSIOptions.preset("faithful")
LITE_DEFAULTS = msi.MSIOptions.preset("lite")
PAPER = msi.MSIOptions.preset("faithful", "paper")
INVERSION_STEPS = ProtectOptions().inversion_steps
NODE = "MSI Invert"
IMAGE = "image at MSI Invert's 'image' input"


class MSIInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_MSIInvert",
            display_name="MSI Invert",
            category=CATEGORY,
            description="Trains the per-image MSI conditionings (key-E) against this checkpoint's UNet and "
                        "DDIM-inverts the face with them (key-I), for every face of the batch on its own. Minutes "
                        "of GPU work per face: the result is cached.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x MODEL from Load Checkpoint; protection and recovery "
                                                "must use the same checkpoint."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (text encoder)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                io.Image.Input("image", tooltip="The aligned faces (Face Align's 'aligned'): every image of the "
                                                "batch is one face, fitted on its own. 512×512 as in the paper."),
                io.Combo.Input("mode", options=list(msi.MODES), default=MSI_DEFAULTS.mode,
                               tooltip="faithful: the paper's MSI network on CLIP-vision features (needs "
                                       "clip_vision). lite: 10 stage tokens learned directly (faster)."),
                io.Int.Input("steps", default=MSI_DEFAULTS.steps, min=1, max=100000,
                             tooltip=f"Optimisation steps. Default: the paper's {MSI_DEFAULTS.timesteps_seen} "
                                     f"timesteps in steps of {MSI_DEFAULTS.timesteps_per_step} (faithful); lite: "
                                     f"{LITE_DEFAULTS.steps}. The paper ran {PAPER.steps} steps of 1 timestep."),
                io.Float.Input("learning_rate", default=MSI_DEFAULTS.lr, min=1e-6, max=1.0, step=1e-5, round=1e-6,
                               tooltip=f"AdamW learning rate (faithful default {MSI_DEFAULTS.lr:g}, lite "
                                       f"{LITE_DEFAULTS.lr:g}: the batch-1 rate ×√timesteps_per_step; the paper: "
                                       f"{PAPER.lr:g} at 1 timestep per step)."),
                io.Int.Input("inversion_steps", default=INVERSION_STEPS, min=2, max=MAX_DDIM_STEPS,
                             tooltip="DDIM steps of the inversion that makes key-I; recovery uses the same."),
                io.Int.Input("timesteps_per_step", default=MSI_DEFAULTS.timesteps_per_step, min=1, max=64,
                             tooltip="Timesteps drawn per optimisation step (same expected gradient, less time "
                                     "per timestep; memory grows with it, and UNet checkpointing turns on by "
                                     "itself when memory runs short). Keep steps × this = the timesteps seen."),
                io.Int.Input("seed", default=MSI_DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=True,
                             tooltip=f"Seed of the timestep and noise draws (paper: {MSI_DEFAULTS.seed})."),
                io.Boolean.Input("official_uint8_quirk", default=MSI_DEFAULTS.uint8_quirk,
                                 tooltip="Reproduce the released code's broken CLIP preprocessing (uint8 cast "
                                         "of [-1,1] pixels). Off = correct preprocessing."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP ViT-L/14 vision model (CLIPVisionLoader); required by faithful."),
            ],
            outputs=[
                PrivacyEmbedsType.Output(display_name="embeds",
                                         tooltip="key-E: stage tokens and conditionings of every face."),
                io.Latent.Output(display_name="key_latent",
                                 tooltip="key-I: the DDIM-inverted latent z_T of every face [N,4,h,w]."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, mode, steps, learning_rate, inversion_steps, timesteps_per_step,
                seed, official_uint8_quirk, clip_vision=None) -> io.NodeOutput:
        check_model(model, NODE)  # the model family first: an inpainting or SDXL MODEL never reaches the UNet
        check_vae(vae, NODE)
        check_clip(clip, NODE)
        if mode == "faithful" and clip_vision is None:
            raise ValueError("MSI Invert in 'faithful' mode needs a CLIP ViT-L/14 vision model: add a "
                             "Load CLIP Vision node (models/clip_vision) and connect it, or switch mode to 'lite'.")
        backend = ComfyBackend(model, clip, vae, trainable=True)
        sources = to_model_image(image, IMAGE).to(backend.device)
        vision = ComfyVisionEncoder(clip_vision) if clip_vision is not None else None
        options = msi.MSIOptions(mode=mode, steps=steps, lr=learning_rate, seed=seed,
                                 timesteps_per_step=timesteps_per_step, uint8_quirk=official_uint8_quirk)
        faces = sources.shape[0]
        # N independent fits (core.msi.train_msi_faces: each face what it gets alone, same seed), as many faces
        # per batch as fit into the memory ComfyUI reports
        with normal_tensors():  # measured with autograd on, outside ComfyUI's inference mode
            group, _ = msi.msi_faces_per_batch(backend, sources, options)
        results = []
        for first in range(0, faces, group):
            part = sources[first : first + group]
            label = "MSI " if faces == 1 else f"{faces_label(first + 1, part.shape[0], faces)}: MSI "
            with normal_tensors():  # MSI's parameters and optimizer state must be normal tensors
                results += msi.train_msi_faces(backend, part, options, vision=vision,
                                               progress=progress_bar(steps, label), cancel=check_interrupt)
        z0 = torch.cat([result.source_latent for result in results])  # encoded once, by MSI
        stage_conds = torch.stack([result.stage_conds for result in results])
        z_T = sampling.ddim_invert(backend, z0, stage_conds, inversion_steps,
                                   progress=progress_bar(inversion_steps), cancel=check_interrupt)
        tokens = [as_normal(result.stage_tokens.detach().float().cpu()) for result in results]
        conds = [as_normal(result.stage_conds.detach().float().cpu()) for result in results]
        metadata = KeyMetadata(model_fingerprint=backend.model_fingerprint(), ddim_steps=inversion_steps,
                               schedule="recover", msi_mode=mode, image_size=tuple(sources.shape[-2:]))
        embeds = PrivacyEmbeds.of_faces(tokens, conds, metadata)
        latent = to_comfy_latent(model, z_T)
        del backend
        release_memory()
        return io.NodeOutput(embeds, latent)
