"""The effective-model fingerprint: one id for every weight that can change a protection or a recovery.

Keys (recovery secrets) are valid only for the exact denoiser they were made with: a LoRA or any other patch
on one UNet layer changes what DDIM recovers from key-I, and recovery would then silently restore a *different*
face. :func:`unet_fingerprint` therefore streams every floating-point tensor of the UNet through SHA-256, in
name order, with values rounded to float16, so that the same weights stored in fp32 or fp16 and loaded at any
compute dtype give the same id, and any change of any weight beyond fp16 rounding gives another. The text
encoder cannot change a recovery (key-E stores the conditionings themselves, not tokens), so it is not part of
the key's id; :func:`text_encoder_fingerprint` identifies it for the privacy report.

Names are canonical across libraries: UNet tensors by their LDM names (no ``model.diffusion_model.`` prefix;
ComfyUI keeps these, the diffusers backend reads them from the single-file checkpoint) and text-encoder tensors
by their Hugging Face names from ``text_model.`` on (ComfyUI's SD1 CLIP keeps the HF layout). Integer buffers
(position ids) are skipped. Callers compute it once per loaded model and cache it: SD1.5's UNet is ~860 M
parameters, ~1.7 GB of fp16 bytes to hash.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from .errors import IncompatibleWeightsError

#: Prefix of the fingerprint string, naming the scheme so that a future change is recognisable.
SCHEME = "w1"
TEXT_ANCHOR = "text_model."


def _canonical_text_name(name: str) -> str:
    at = name.find(TEXT_ANCHOR)
    return name[at:] if at >= 0 else name


def _update(h, prefix: str, tensors: Mapping[str, torch.Tensor]) -> int:
    count = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        data = t.detach().to(device="cpu", dtype=torch.float16).contiguous()
        h.update(f"{prefix}{name}{tuple(data.shape)}".encode())
        h.update(data.view(torch.int16).numpy().tobytes())
        count += 1
    return count


def unet_fingerprint(unet_sd: Mapping[str, torch.Tensor]) -> str:
    """``"w1:" + 32 hex chars`` identifying a UNet from its LDM-named state dict (every floating tensor).

    Raises:
        IncompatibleWeightsError: the state dict has no floating-point tensor to hash.
    """
    h = hashlib.sha256()
    if _update(h, "unet.", unet_sd) == 0:
        raise IncompatibleWeightsError("The UNet has no weights: cannot fingerprint the model.")
    return f"{SCHEME}:{h.hexdigest()[:32]}"


def text_encoder_fingerprint(text_sd: Mapping[str, torch.Tensor]) -> str:
    """The same kind of id for a CLIP text encoder (HF names, any prefix before ``text_model.``).

    Raises:
        IncompatibleWeightsError: the state dict has no floating-point tensor to hash.
    """
    h = hashlib.sha256()
    if _update(h, "text.", {_canonical_text_name(k): v for k, v in text_sd.items()}) == 0:
        raise IncompatibleWeightsError("The text encoder has no weights: cannot fingerprint it.")
    return f"{SCHEME}:{h.hexdigest()[:32]}"
