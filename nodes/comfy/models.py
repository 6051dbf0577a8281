"""ComfyUI's models as the core sees them: devices, memory, loading, fingerprints, VAE and latent scaling.

Latent scaling is done here and nowhere else. A ComfyUI LATENT dict holds *unscaled* VAE latents
(``{"samples": [B,4,h,w]}``); the core works on *scaled* SD latents (core/backend.py). The conversion is
the model's latent format (``process_in`` / ``process_out``, docs/comfyui-internals.md §2.1); nodes without
a MODEL input (the key nodes) use ComfyUI's SD1.x format, since keys belong to SD1.x checkpoints.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_management as mm

from ...core.fingerprint import unet_fingerprint


# ----------------------------------------------------------------------------------- devices, memory
def torch_device() -> torch.device:
    """ComfyUI's compute device (never a hard-coded "cuda")."""
    return mm.get_torch_device()


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, LATENT) are returned."""
    return mm.intermediate_device()


def load_models(*patchers) -> None:
    """Load ModelPatchers (MODEL, ``vae.patcher``, ``clip.patcher``…) onto the device; None entries are skipped.
    May evict other models."""
    mm.load_models_gpu([p for p in patchers if p is not None])


def release_memory() -> None:
    """Release cached device memory at the end of a heavy node."""
    mm.soft_empty_cache()


def to_compute_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move an auxiliary module (face recognizer, not a ModelPatcher) to the compute device, freeing memory for
    it first."""
    device = torch_device()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    mm.free_memory(size * 2, device)
    return module.to(device)


# --------------------------------------------------------------------------------------- model facts
def model_sampling(model):
    """The MODEL's ``model_sampling`` object (σ table, σ_max, noise scaling), honouring object patches."""
    return model.get_model_object("model_sampling")


def unet(model) -> torch.nn.Module:
    """The MODEL's UNet module (``BaseModel.diffusion_model``)."""
    return model.model.diffusion_model


def model_fingerprint(model) -> str:
    """core.fingerprint of the MODEL's UNet (the same id the diffusers backend gives for the same file)."""
    return unet_fingerprint(unet(model).state_dict())


# ---------------------------------------------------------------------------------- latent scaling
def latent_format(model=None):
    """The latent format that scales ``model``'s latents; ComfyUI's SD1.x format (``latent_formats.SD15``)
    when ``model`` is None (nodes without a MODEL input)."""
    if model is None:
        return comfy.latent_formats.SD15()
    return model.get_model_object("latent_format")


def scale_latent(model, samples: torch.Tensor) -> torch.Tensor:
    """Unscaled VAE latent [B,4,h,w] → scaled SD latent (same shape, device and dtype)."""
    return latent_format(model).process_in(samples)


def unscale_latent(model, z: torch.Tensor) -> torch.Tensor:
    """Scaled SD latent [B,4,h,w] → unscaled VAE latent (same shape, device and dtype); differentiable."""
    return latent_format(model).process_out(z)


def to_scaled_latent(model, latent: dict) -> torch.Tensor:
    """ComfyUI LATENT dict → scaled latent [B,4,h,w] float32 on the compute device.

    ``model`` None uses the SD1.x format (see :func:`latent_format`).
    """
    return scale_latent(model, latent["samples"].to(torch_device(), torch.float32))


def to_comfy_latent(model, z: torch.Tensor) -> dict:
    """Scaled latent [B,4,h,w] → ComfyUI LATENT dict (unscaled float32 samples on the intermediate device).

    ``model`` None uses the SD1.x format (see :func:`latent_format`).
    """
    return {"samples": unscale_latent(model, z.float()).to(intermediate_device())}


# ---------------------------------------------------------------------------------------------- VAE
def encode_image(vae, model, image_bhwc: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,3] in [0,1] → scaled latent [B,4,H/8,W/8] float32 on the compute device (ComfyUI's own
    VAE encode, no gradients)."""
    z = vae.encode(image_bhwc[..., :3])
    return scale_latent(model, z.to(torch_device(), torch.float32))


def decode_to_images(vae, latent_samples: torch.Tensor) -> torch.Tensor:
    """Unscaled latent ``LATENT["samples"]`` → IMAGE [B,H,W,3] in [0,1] (ComfyUI's own decode, no gradients)."""
    images = vae.decode(latent_samples)
    if images.dim() == 5:  # some VAEs return [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images
