"""Discrete-time diffusion math for Stable Diffusion 1.x (ε-prediction, 1000 DDPM steps).

Two parametrisations of the same noisy latent are used throughout:

* VP / DDPM space (the paper's):  x_t = √ᾱ_t · x₀ + √(1−ᾱ_t) · ε
* σ space (ComfyUI / k-diffusion): x_σ = x₀ + σ · ε,  with σ = √((1−ᾱ)/ᾱ)

so x_σ = x_t · √(1+σ²). Timesteps ``t`` are integers in [0, 999]. Latents are the *scaled* SD latents
(VAE mean × 0.18215), shape [B, 4, H/8, W/8]. Tables are float64 on the CPU; callers move the few
scalars they need to the device once per run, so sampling loops never sync with the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LATENT_SCALE = 0.18215
STAGE_WIDTH = 100
NUM_STAGES = NUM_TRAIN_TIMESTEPS // STAGE_WIDTH
MAX_DDIM_STEPS = NUM_TRAIN_TIMESTEPS - 1


def scaled_linear_betas() -> torch.Tensor:
    """SD's "scaled linear" β schedule: linspace(√0.00085, √0.012, 1000)², float64 [1000]."""
    return torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2


@lru_cache(maxsize=None)
def _alphas_cumprod_cached() -> torch.Tensor:
    return torch.cumprod(1.0 - scaled_linear_betas(), dim=0)


@lru_cache(maxsize=None)
def _log_sigmas_cached() -> torch.Tensor:
    return sigma_table().log()


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), float64 [1000], decreasing from 0.99915 to 0.0047."""
    return _alphas_cumprod_cached().clone()


@lru_cache(maxsize=None)
def _alphas_cumprod_host() -> tuple[float, ...]:
    return tuple(_alphas_cumprod_cached().tolist())


def alpha_bar(t: int) -> float:
    """ᾱ at integer timestep t ∈ [0, 999] (a Python float from a host table: no tensor read per call)."""
    return _alphas_cumprod_host()[int(t)]


def sigma_from_alpha_bar(a: float | torch.Tensor):
    """σ = √((1−ᾱ)/ᾱ)."""
    if isinstance(a, torch.Tensor):
        return ((1 - a) / a).sqrt()
    return math.sqrt((1.0 - a) / a)


def sigma_at(t: int) -> float:
    """σ of integer timestep t (float64 precision)."""
    return sigma_from_alpha_bar(alpha_bar(t))


def sigma_table() -> torch.Tensor:
    """σ_t for t = 0..999, float64 [1000], increasing (0.0292 … 14.61)."""
    return sigma_from_alpha_bar(_alphas_cumprod_cached())


def timestep_from_sigma(sigma: float) -> int:
    """Nearest integer timestep to σ in log-σ (the same lookup ComfyUI's ModelSamplingDiscrete uses)."""
    return int((_log_sigmas_cached() - math.log(max(float(sigma), 1e-12))).abs().argmin())


def check_num_steps(num_steps: int, what: str = "num_steps") -> int:
    """Validate a DDIM step count and return it as an int.

    Raises:
        ValueError: unless 1 ≤ num_steps ≤ 999. 1000 steps would put the offset grid (below) at t = 1000, past
            the ᾱ table; LDM's own DDIM fails there too.
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= int(num_steps) <= MAX_DDIM_STEPS:
        raise ValueError(f"{what} must be an integer in [1, {MAX_DDIM_STEPS}], got {num_steps}")
    return int(num_steps)


def ddim_timesteps(num_steps: int) -> list[int]:
    """DDIM grid with steps_offset = 1, descending: 50 → [981, 961, …, 21, 1]; 100 → [991, …, 1].

    Same as LDM's ``make_ddim_timesteps(uniform)`` + 1 and diffusers' DDIMScheduler(steps_offset=1).

    Raises:
        ValueError: from :func:`check_num_steps`.
    """
    num_steps = check_num_steps(num_steps)
    stride = NUM_TRAIN_TIMESTEPS // num_steps
    return [k * stride + 1 for k in range(num_steps)][::-1]


@dataclass(frozen=True)
class StrengthStart:
    """Where an img2img run with a given strength starts on the DDIM grid.

    ``noise_timestep``: the timestep the clean latent is forward-noised to (official: grid[k] ascending).
    ``denoise_timesteps``: the descending timesteps that are then denoised (first one = grid[k−1]).
    """

    noise_timestep: int
    denoise_timesteps: tuple[int, ...]


def strength_start(num_steps: int, strength: float) -> StrengthStart:
    """Official LDM/Diff-Privacy strength semantics: k = int(strength·N), noise to grid[k] (ascending grid),
    then denoise grid[k−1], …, grid[0].

    50 steps × 0.6 → noise to t = 601, denoise 581, 561, …, 1 (30 steps);
    100 steps × 0.8 → noise to 801, denoise 791, …, 1 (80 steps).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    ascending = ddim_timesteps(num_steps)[::-1]
    k = int(strength * num_steps)
    if k < 1:
        raise ValueError(f"strength {strength} × {num_steps} steps leaves no denoising step")
    if k >= num_steps:  # strength 1: start from the top of the grid, noising to it
        k = num_steps - 1
        return StrengthStart(ascending[k], tuple(ascending[: k + 1][::-1]))
    return StrengthStart(ascending[k], tuple(ascending[:k][::-1]))


def final_sigma() -> float:
    """σ reached by the official DDIM's last step (ᾱ_prev = ᾱ₀, set_alpha_to_one=False): ≈ 0.0292."""
    return sigma_at(0)


def sampling_sigmas(timesteps: list[int] | tuple[int, ...], *, to_zero: bool = False) -> torch.Tensor:
    """σ grid for a descending DDIM run over ``timesteps``: [σ(t) for t in timesteps] + [σ_final], float64.

    σ_final = σ(0) ≈ 0.0292 reproduces the official last step (ᾱ_prev = ᾱ₀); ``to_zero`` ends at 0 instead
    (what ComfyUI's schedulers append).
    """
    sig = [sigma_at(t) for t in timesteps]
    sig.append(0.0 if to_zero else final_sigma())
    return torch.tensor(sig, dtype=torch.float64)


def img2img_start_scales(noise_timestep: int, first_timestep: int) -> tuple[float, float]:
    """Coefficients (a, b) so that the σ-space start latent x = a·z₀ + b·σ_first·ε is the official one.

    Official: z_τ = √ᾱ_τ·z₀ + √(1−ᾱ_τ)·ε is noised to τ = ``noise_timestep`` but then denoised as if it sat at
    ``first_timestep`` (the LDM img2img off-by-one). In σ space at σ_first that latent is z_τ/√ᾱ_first, so
    a = √(ᾱ_τ/ᾱ_first) and b = √((1−ᾱ_τ)/(1−ᾱ_first)). With τ = first both are 1 (ComfyUI's own
    ``latent + σ·noise``).
    """
    a_tau, a_first = alpha_bar(noise_timestep), alpha_bar(first_timestep)
    return math.sqrt(a_tau / a_first), math.sqrt((1.0 - a_tau) / (1.0 - a_first))


# ----------------------------------------------------------------------------------- per-step math
def predict_x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t  (VP space)."""
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, a_prev: float) -> torch.Tensor:
    """η = 0 DDIM update in VP space: x_{prev} = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂."""
    return math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps


def eps_from_denoised(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε̂ = (x_σ − x̂₀)/σ  (σ space)."""
    return (x_sigma - x0) / sigma


def ddim_step_sigma(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """η = 0 DDIM update in σ space: x_{σ'} = x̂₀ + σ'·ε̂ (identical to deterministic Euler)."""
    return x0 + sigma_next * eps_from_denoised(x_sigma, x0, sigma)


def vp_to_sigma_space(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_σ = x_t·√(1+σ²)."""
    return x_t * math.sqrt(1.0 + sigma * sigma)


def sigma_to_vp_space(x_sigma: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_t = x_σ/√(1+σ²)."""
    return x_sigma / math.sqrt(1.0 + sigma * sigma)


def alpha_bar_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ᾱ_t for t = 0..999 as a [1000] tensor on ``device`` (cached per device and dtype, so a loop indexes it on
    the device without copying the table each step). Treat it as read-only."""
    return _alpha_bar_table(str(torch.device(device)), dtype)


@lru_cache(maxsize=None)
def _alpha_bar_table(device: str, dtype: torch.dtype) -> torch.Tensor:
    return _alphas_cumprod_cached().to(device=device, dtype=dtype)


def q_sample(z0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Forward noising in VP space (DDPM, Ho et al. 2020, eq. 4): z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε.

    Args:
        z0: clean scaled latents [B,C,h,w].
        noise: ε, same shape as ``z0``.
        t: one integer timestep in [0, 999], or a long tensor [B] of per-sample timesteps on ``z0``'s device
            (ᾱ is then gathered on the device, no host round trip).

    Returns:
        z_t, same shape and dtype as ``z0``.
    """
    if isinstance(t, torch.Tensor):
        a = alpha_bar_table(z0.device, torch.float32)[t.long()].view(-1, *([1] * (z0.dim() - 1)))
        return (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(z0.dtype)
    a = alpha_bar(t)
    return math.sqrt(a) * z0 + math.sqrt(1.0 - a) * noise


def stage_of_timestep(t: int, stage_width: int = STAGE_WIDTH) -> int:
    """Stage index s = ⌊t/stage_width⌋, clamped to [0, NUM_STAGES−1]."""
    return min(int(t) // stage_width, NUM_STAGES - 1)


def seeded_noise(shape: tuple[int, ...], seed: int, batch_index: int = 0) -> torch.Tensor:
    """Standard normal noise, float32 CPU, reproducible per (seed, batch_index) on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1_000_003 * int(batch_index))
    return torch.randn(shape, generator=gen, dtype=torch.float32)
