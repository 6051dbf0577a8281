"""A base-model fingerprint that is the same whichever library loaded the checkpoint.

Keys (recovery secrets) are only valid for the exact UNet they were made with. ComfyUI keeps the LDM parameter
names, diffusers renames them, and either may hold fp16, bf16 or fp32 copies; so the fingerprint hashes the
values of the UNet's first and last convolutions (``input_blocks.0.0`` / ``out.2`` in LDM names, ``conv_in`` /
``conv_out`` in diffusers names), rounded through fp16 so that the storage dtype of an fp16 checkpoint does not
change it.
"""
from __future__ import annotations

import hashlib

import torch


def unet_fingerprint(conv_in_weight: torch.Tensor, conv_out_weight: torch.Tensor) -> str:
    """16 hex chars identifying a UNet from its conv_in [C,4,3,3] and conv_out [4,C,3,3] weights."""
    h = hashlib.sha256()
    for w in (conv_in_weight, conv_out_weight):
        values = w.detach().to("cpu", torch.float32).to(torch.float16).contiguous()
        h.update(str(tuple(values.shape)).encode())
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
