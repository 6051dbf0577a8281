"""A base-model fingerprint that is the same whichever library loaded the checkpoint.

Keys (recovery secrets) are only valid for the exact UNet they were made with. ComfyUI keeps the LDM parameter
names; the diffusers backend converts from the same single-file state dict. The fingerprint hashes a few UNet
tensors by their LDM names, with values rounded to float16, so a model stored in fp32 or fp16 and loaded at any
compute dtype gives the same id.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from .errors import IncompatibleWeightsError

#: UNet tensors (LDM names, no ``model.diffusion_model.`` prefix) that are hashed; the first cross-attention
#: key projection is added to them (it ties the denoiser to its text encoder).
FINGERPRINT_KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def unet_fingerprint(unet_sd: Mapping[str, torch.Tensor]) -> str:
    """16 hex chars identifying a UNet from its LDM-named state dict (name, shape and fp16-rounded values)."""
    names = list(FINGERPRINT_KEYS) + sorted(k for k in unet_sd if k.endswith("attn2.to_k.weight"))[:1]
    h = hashlib.sha256()
    for name in names:
        if name not in unet_sd:
            raise IncompatibleWeightsError(f"UNet tensor {name!r} missing: cannot fingerprint the model.")
        t = unet_sd[name].detach().to(device="cpu", dtype=torch.float16).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
