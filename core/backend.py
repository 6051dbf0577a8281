"""What the algorithm needs from a Stable Diffusion 1.x implementation.

Two implementations exist: ``core.diffusers_backend.DiffusersBackend`` (plain Python: a single-file SD1.x
checkpoint through diffusers/transformers) and the ComfyUI bridge in ``nodes/comfy/backend.py`` (MODEL/CLIP/VAE from
ComfyUI's own loaders). The MSI trainer, DDIM inversion and recovery are written against this protocol only.

Conventions: latents are *scaled* SD latents (×0.18215) [B, 4, H/8, W/8]; images are float [B, 3, H, W] in
[−1, 1]; conditionings are [B, 77, D] with D = 768 for SD1.x; timesteps are integer DDPM steps in [0, 999].
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class DiffusionBackend(Protocol):
    device: torch.device
    #: Width of one text token / conditioning channel (768 for SD1.x).
    token_dim: int

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ for VP-space latents z_t [B,4,h,w] at integer timesteps t [B] (long) under cond [B,77,D].

        Differentiable w.r.t. ``cond`` and ``z_t`` when grad is enabled. Returns float32 [B,4,h,w].
        """

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean of image [B,3,H,W] in [−1,1], scaled by 0.18215 → [B,4,H/8,W/8] float32."""

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE decode of scaled latents → [B,3,H,W] float32, ≈[−1,1], not clamped."""

    def encode_stage_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text conditioning of the prompt ``"*"`` with the ``*`` token embedding replaced by each row of
        tokens [S, D] → [S, 77, D]. Differentiable w.r.t. ``tokens``."""

    def null_conditioning(self) -> torch.Tensor:
        """Conditioning of the empty prompt "" → [1, 77, D] float32."""

    def token_embedding(self, word: str) -> torch.Tensor:
        """Input embedding [D] of the first token of ``word`` (used to initialise lite MSI tokens)."""

    def model_fingerprint(self) -> str:
        """Hash of every denoiser weight as it runs (core/fingerprint.py), stored in key metadata."""

    def text_encoder_fingerprint(self) -> str:
        """Hash of every text-encoder weight, for the privacy report."""


@runtime_checkable
class VisionEncoder(Protocol):
    """CLIP ViT-L/14 vision tower."""

    device: torch.device

    def hidden_states(self, pixel_values: torch.Tensor) -> Sequence[torch.Tensor]:
        """All hidden states for CLIP-normalised pixels [B,3,224,224]: a sequence of 25 tensors [B,257,1024],
        index 0 = embedding output, index i = output of transformer layer i (HF ``output_hidden_states``)."""
