"""Tiny deterministic stand-ins for SD 1.x and a face recognizer (pure torch, random weights, CPU-fast).

``ToyBackend`` implements :class:`core.backend.DiffusionBackend` on 8×-downsampled latents (a 64×64 image
gives a 4×8×8 latent). Its ε-predictor is the exact posterior-mean denoiser of a Gaussian prior N(μθ, s²I)
around a learned conditional mean μθ(z_t, t, c) (s = ``data_std``, default 1):

    x̂₀ = μθ + √ᾱ_t·s²/v_t·(z_t − √ᾱ_t·μθ),  v_t = ᾱ_t·s² + 1 − ᾱ_t   ⇔   ε̂ = √(1−ᾱ_t)·(z_t − √ᾱ_t·μθ)/v_t

so x̂₀ stays bounded at every noise level (like a real denoiser), the probability-flow ODE is smooth (DDIM
inversion is meaningful), and the conditioning matters most at high noise, where x̂₀ ≈ μθ. μθ is a 3-layer
conv net with FiLM from a sinusoidal timestep embedding and the token-mean of the conditioning; the toy text
encoder spreads the "*" token over all later positions, so that mean depends on it clearly.

``ToyRecognizer`` is an odd (bias-free, tanh) conv net, so unrelated images get weakly correlated
embeddings and identity similarity has room to move both ways.

Both take ``inside_inference_mode=True`` to create every weight under ``torch.inference_mode()``, as
ComfyUI does for the models it loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from core.diffusion import LATENT_SCALE, alphas_cumprod

SEQ_LEN = 77
LATENT_CHANNELS = 4
DOWNSCALE = 8
COND_GAIN = 3.0  # how strongly the conditioning drives μθ (calibrated: other stage conds → 30% recovery error)


def _fill_seeded(module: nn.Module, seed: int) -> None:
    """Deterministic N(0, 1/fan_in) weights and zero biases from one CPU generator, in parameter order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _construction_context(inside_inference_mode: bool):
    return torch.inference_mode() if inside_inference_mode else contextlib.nullcontext()


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of timesteps t [B] → [B, dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ToyBackend(nn.Module):
    """A few-thousand-parameter conditional latent diffusion model implementing ``DiffusionBackend``.

    Images [B,3,H,W] in [−1,1] with H, W multiples of 8. Latents follow SD's scaling convention: the encoder
    multiplies its raw output (std ≈ 5) by LATENT_SCALE = 0.18215, the decoder divides by it first.
    Conditionings [B,77,D]. Computations run in the parameters' dtype (float64 after ``.double()``), and so
    do the outputs (float32 by default).
    """

    def __init__(self, token_dim: int = 32, hidden: int = 32, seed: int = 0, *, data_std: float = 1.0,
                 inside_inference_mode: bool = False, device: str | torch.device = "cpu"):
        super().__init__()
        self.data_std = float(data_std)
        self.token_dim = token_dim
        self.hidden = hidden
        self.seed = seed
        with _construction_context(inside_inference_mode):
            # μθ(z, t, c)
            self.time_proj = nn.Linear(16, hidden)
            self.cond_proj = nn.Linear(token_dim, hidden)
            self.film = nn.Linear(hidden, 4 * hidden)
            self.conv_in = nn.Conv2d(LATENT_CHANNELS, hidden, 3, padding=1)
            self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.conv_out = nn.Conv2d(hidden, LATENT_CHANNELS, 3, padding=1)
            # VAE: 8× average pool + 1×1 conv; decoder = pseudo-inverse + a small learned detail branch
            self.enc = nn.Conv2d(3, LATENT_CHANNELS, 1, bias=False)
            self.dec_detail_in = nn.Conv2d(LATENT_CHANNELS, 16, 1)
            self.dec_detail_out = nn.Conv2d(16, 3, 3, padding=1)
            # "text encoder": prompt embedding, positions, causal running-mean mixing
            self.prompt = nn.Parameter(torch.empty(SEQ_LEN, token_dim))
            self.positions = nn.Parameter(torch.empty(SEQ_LEN, token_dim))
            self.mix = nn.Linear(token_dim, token_dim)
            self.mix_out = nn.Linear(token_dim, token_dim)
            _fill_seeded(self, seed)
            with torch.no_grad():
                self.prompt.mul_(0.5 * math.sqrt(token_dim))  # O(1) entries, like token embeddings
                self.positions.mul_(0.1 * math.sqrt(token_dim))
                self.enc.weight.mul_(3.0 / LATENT_SCALE)     # raw latents ~5×, scaled ones O(1)
                self.dec_detail_out.weight.mul_(0.1)
                self.cond_proj.weight.mul_(COND_GAIN)
            self.register_buffer("alphas_cumprod", alphas_cumprod().float(), persistent=False)
            self.to(device)

    # -- protocol attributes
    @property
    def device(self) -> torch.device:
        return self.prompt.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt.dtype

    # -- denoiser
    def prior_mean(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """μθ(z_t, t, c) [B,4,h,w]: the conditional mean the toy's x̂₀ falls back on at high noise."""
        emb = F.silu(self.time_proj(sinusoidal_embedding(t, 16).to(self.dtype)) + self.cond_proj(cond.mean(dim=1)))
        scale1, shift1, scale2, shift2 = self.film(emb)[:, :, None, None].chunk(4, dim=1)
        h = torch.tanh(self.conv_in(0.5 * z_t) * (1 + scale1) + shift1)
        h = torch.tanh(self.conv_mid(h) * (1 + scale2) + shift2)
        return self.conv_out(h)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ = √(1−ᾱ_t)·(z_t − √ᾱ_t·μθ)/v_t, v_t = ᾱ_t·s² + 1 − ᾱ_t, for VP latents z_t [B,4,h,w], t [B] long,
        cond [B,77,D] (the posterior-mean denoiser of the prior N(μθ, s²I), s = ``data_std``)."""
        z_t = z_t.to(self.dtype)
        a = self.alphas_cumprod[t.long()].to(self.dtype).view(-1, 1, 1, 1)
        mu = self.prior_mean(z_t, t, cond.to(self.dtype))
        v = a * self.data_std ** 2 + (1 - a)
        return (1 - a).sqrt() * (z_t - a.sqrt() * mu) / v

    # -- VAE
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [−1,1] → scaled latents [B,4,H/8,W/8]."""
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[-1] % DOWNSCALE or image.shape[-2] % DOWNSCALE:
            raise ValueError(f"toy encoder needs [B,3,H,W] with H, W multiples of 8, got {tuple(image.shape)}")
        return LATENT_SCALE * self.enc(F.avg_pool2d(image.to(self.dtype), DOWNSCALE))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,4,h,w] → images [B,3,8h,8w] ≈ [−1,1], differentiable, not clamped."""
        raw = z.to(self.dtype) / LATENT_SCALE
        w = self.enc.weight.view(LATENT_CHANNELS, 3)
        base = torch.einsum("cl,blhw->bchw", torch.linalg.pinv(w), raw)  # inverts encode on pooled colours
        detail = self.dec_detail_out(torch.tanh(self.dec_detail_in(raw)))
        return F.interpolate(base + detail, scale_factor=DOWNSCALE, mode="bilinear", align_corners=False)

    # -- text side
    def _text_encoder(self, embeds: torch.Tensor) -> torch.Tensor:
        """[S,77,D] input embeddings → [S,77,D] conditioning, causal (position i sees positions ≤ i).

        Every position from 1 on also receives the position-1 ("*") features, a caricature of CLIP, where the
        end and padding tokens attend strongly to the subject word; pooled conditionings then depend on it.
        """
        h = embeds + self.positions
        counts = torch.arange(1, SEQ_LEN + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
        running_mean = h.cumsum(dim=1) / counts
        subject = torch.zeros_like(h[:, :, :1])
        subject[:, 1:] = 1.0
        h = h + self.mix_out(torch.tanh(self.mix(running_mean + subject * h[:, 1:2])))
        return F.layer_norm(h, (self.token_dim,))

    def encode_stage_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [S,D] replacing prompt position 1 (the "*") → conditionings [S,77,D], differentiable."""
        if tokens.dim() != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"tokens must have shape [S, {self.token_dim}], got {tuple(tokens.shape)}")
        s = tokens.shape[0]
        embeds = self.prompt.unsqueeze(0).expand(s, -1, -1)
        tok = tokens.to(self.dtype).unsqueeze(1)
        embeds = torch.cat([embeds[:, :1], tok, embeds[:, 2:]], dim=1)
        return self._text_encoder(embeds)

    def null_conditioning(self) -> torch.Tensor:
        """Conditioning of the empty prompt → [1,77,D] (the prompt embedding without a "*" token)."""
        with torch.no_grad():
            return self._text_encoder(self.prompt.unsqueeze(0)).clone()

    def token_embedding(self, word: str) -> torch.Tensor:
        """A deterministic pseudo-embedding [D] of ``word`` (seeded by its SHA-256), scaled like the prompt."""
        seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        vec = 0.5 * torch.randn(self.token_dim, generator=gen)
        return vec.to(device=self.device, dtype=self.dtype)

    def text_encoder_fingerprint(self) -> str:
        """The toy has no text encoder: stage tokens map to conditionings by a fixed rule."""
        return "toy-text"

    def model_fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the denoiser weights, independent of how they were built."""
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters()):
            if name.startswith(("time_proj", "cond_proj", "film", "conv_")):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class ToyRecognizer(nn.Module):
    """Face-recognizer stand-in: [B,3,32,32] crops in ≈[−1,1] → L2-normalised embeddings [B,512]."""

    input_size = 32

    def __init__(self, embedding_dim: int = 512, seed: int = 1, *, inside_inference_mode: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__()
        with _construction_context(inside_inference_mode):
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
            self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
            self.fc = nn.Linear(64 * 4 * 4, embedding_dim, bias=False)
            _fill_seeded(self, seed)
            with torch.no_grad():
                for conv in (self.conv1, self.conv2, self.conv3):
                    conv.weight.mul_(2.0)  # keeps tanh out of its linear range
            self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"ToyRecognizer expects {self.input_size}×{self.input_size} crops, got {tuple(x.shape[-2:])}")
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        h = torch.tanh(self.conv3(h))
        return F.normalize(self.fc(h.flatten(1)), dim=-1)


def toy_crop(image: torch.Tensor, size: int = ToyRecognizer.input_size) -> torch.Tensor:
    """Whole-image face "crop" for the toy recognizer: area resize [B,3,H,W] → [B,3,size,size]."""
    return F.adaptive_avg_pool2d(image, size)


def toy_face_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A smooth deterministic test image [1,3,size,size] in [−1,1] (random low-frequency blobs)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=gen) * 2 - 1
    fine = torch.rand(1, 3, size // 4, size // 4, generator=gen) * 2 - 1
    img = 0.8 * F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    img = img + 0.3 * F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    return img.clamp(-1, 1)
