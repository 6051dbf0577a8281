"""The guided DDIM sampler, DDIM inversion and identity recovery (docs/method.md §4.1, §5, §8.2, §8.5).

The sampler runs in σ space (k-diffusion / ComfyUI convention, x_σ = x₀ + σ·ε, see core/diffusion.py),
with a denoiser that returns x̂₀. η = 0 DDIM is then the Euler step x_{σ'} = x̂₀ + σ'·(x_σ − x̂₀)/σ. The
official guidance update lives in VP space, x_{t−1} −= ρ(t)·g, which in σ space reads
x_{σ'} −= ρ(t)·g·√(1+σ'²). Inversion works in VP space like the official code.

All σ and t bookkeeping is done on the host with Python floats/ints before a loop starts: no per-step
device synchronisation.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .backend import DiffusionBackend
from .diffusion import (
    NUM_STAGES,
    NUM_TRAIN_TIMESTEPS,
    alpha_bar,
    ddim_step,
    ddim_step_sigma,
    ddim_timesteps,
    img2img_start_scales,
    predict_x0_from_eps,
    sampling_sigmas,
    seeded_noise,
    sigma_at,
    sigma_to_vp_space,
    stage_of_timestep,
    strength_start,
    timestep_from_sigma,
    vp_to_sigma_space,
)
from .energies import BackgroundPaste, IdentityGuidance
from .schedules import EmbeddingSchedule

#: denoise(x_σ [B,4,h,w], σ, t) → x̂₀ [B,4,h,w]
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
Progress = Callable[[int, int, dict], None]


def to_vp(x: torch.Tensor, sigma_last: float) -> torch.Tensor:
    """σ-space latent at σ_last → VP latent x_t = x_σ/√(1+σ_last²) (identity for σ_last = 0)."""
    return sigma_to_vp_space(x, float(sigma_last))


def _host_sigmas(sigmas) -> list[float]:
    """σ grid as Python floats (one host copy per run), checked: ≥ 2 entries, descending, positive but the last."""
    values = sigmas.detach().cpu().double().tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 entries (start and end), got {len(values)}")
    if any(not math.isfinite(s) for s in values) or any(s <= 0.0 for s in values[:-1]) or values[-1] < 0.0:
        raise ValueError("sigmas must be finite, positive (the last may be 0)")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be strictly descending")
    return values


def stack_stage_conds(stage_conds) -> torch.Tensor:
    """The 10 stage conditionings as one tensor [10,77,D], from a tensor or a sequence of [1,77,D]/[77,D]."""
    if not isinstance(stage_conds, torch.Tensor):
        stage_conds = torch.cat([c.reshape(1, *c.shape[-2:]) for c in stage_conds], dim=0)
    if stage_conds.dim() != 3 or stage_conds.shape[0] != NUM_STAGES:
        raise ValueError(f"stage conditionings must have shape [{NUM_STAGES}, 77, D], got {tuple(stage_conds.shape)}")
    return stage_conds


# ----------------------------------------------------------------------------------- sampling loop
def sample_guided_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    timesteps: Sequence[int] | None = None,
    guidance: IdentityGuidance | None = None,
    background: BackgroundPaste | None = None,
    callback: Callable[[dict], None] | None = None,
    cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """η = 0 DDIM from sigmas[0] to sigmas[-1] in σ space, with optional identity guidance and background paste.

    ``x`` [B,4,h,w] is the σ-space latent at sigmas[0]; ``sigmas`` a descending 1-D sequence of N+1 values
    (the last may be 0 or σ_final); ``timesteps`` the integer DDPM timestep of each of the first N sigmas
    (default: the nearest one in log σ). Per step i with t = timesteps[i]:
    x̂₀ = denoise(x, σ_i, t), x ← x̂₀ + σ_{i+1}·(x − x̂₀)/σ_i, then x ← x − ρ(t)·g·√(1+σ_{i+1}²) with g the
    energy gradient (w.r.t. x̂₀ for target "x0", w.r.t. the VP latent for "xt"), then the background paste.
    ``cancel()`` is called before each step (it raises to abort); ``callback(info)`` after each step with
    keys i, t, sigma, x (the new latent), denoised (x̂₀) and energy (scalar tensor or None).
    Returns the σ-space latent at sigmas[-1] (use :func:`to_vp` for the VP latent).
    """
    sig = _host_sigmas(sigmas)
    n = len(sig) - 1
    ts = [timestep_from_sigma(s) for s in sig[:-1]] if timesteps is None else [int(t) for t in timesteps]
    if len(ts) != n:
        raise ValueError(f"got {len(ts)} timesteps for {n} sampling steps ({n + 1} sigmas)")
    through_denoiser = guidance is not None and guidance.target == "xt"

    for i in range(n):
        if cancel is not None:
            cancel()
        t, s, s_next = ts[i], sig[i], sig[i + 1]
        rho = guidance.step_size(t) if guidance is not None else 0.0
        g = energy = None
        if rho > 0.0 and through_denoiser:
            g, energy, x0 = guidance.gradient_through(lambda leaf: denoise(leaf, s, t), x)
            g = g * math.sqrt(1.0 + s * s)  # ∂E/∂x_σ → ∂E/∂x_t, since x_σ = x_t·√(1+σ²)
        else:
            with torch.no_grad():
                x0 = denoise(x, s, t)
            if rho > 0.0:
                g, energy = guidance.gradient(x0)
        x_next = ddim_step_sigma(x, x0, s, s_next)
        if g is not None:
            x_next = x_next - (rho * math.sqrt(1.0 + s_next * s_next)) * g.to(x_next.dtype)
        if background is not None:
            x_next = background.apply(x_next, t, s_next)
        if callback is not None:
            callback({"i": i, "t": t, "sigma": s, "x": x_next, "denoised": x0, "energy": energy})
        x = x_next
    return x


# ------------------------------------------------------------------------------------ backend glue
def make_backend_denoiser(
    backend: DiffusionBackend,
    schedule: EmbeddingSchedule,
    stage_conds,
    null_cond: torch.Tensor | None,
    batch_size: int,
) -> Denoiser:
    """denoise(x_σ, σ, t) → x̂₀ for a :class:`DiffusionBackend` (ε-prediction on VP latents, no CFG).

    z_t = x_σ/√(1+σ²); cond = stage_conds[s] or ``null_cond`` as ``schedule.stage_for(t)`` says, expanded to
    the batch; ε̂ = backend.predict_eps(z_t, t, cond); x̂₀ = x_σ − σ·ε̂. ``null_cond`` [1,77,D] may be None for
    schedules that never ask for it (recovery).
    """
    conds = stack_stage_conds(stage_conds)
    if null_cond is not None and (null_cond.dim() != 3 or null_cond.shape[0] != 1 or null_cond.shape[1:] != conds.shape[1:]):
        raise ValueError(f"null conditioning must have shape [1, {conds.shape[1]}, {conds.shape[2]}], "
                         f"got {tuple(null_cond.shape)}")
    cache: dict = {}

    def cond_for(stage: int | None, device: torch.device) -> torch.Tensor:
        # grad-enabled calls (target "xt") must not feed inference tensors to ops that save them
        needs_clone = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        key = (stage, device, needs_clone)
        if key not in cache:
            if stage is None:
                if null_cond is None:
                    raise ValueError("the embedding schedule asks for the null conditioning but none was given")
                c = null_cond
            else:
                c = conds[stage : stage + 1]
            c = c.to(device)
            if needs_clone and c.is_inference():
                c = c.clone()
            cache[key] = c.expand(batch_size, -1, -1)
        return cache[key]

    def denoise(x: torch.Tensor, sigma: float, t: int) -> torch.Tensor:
        if x.shape[0] != batch_size:
            raise ValueError(f"denoiser was built for batch size {batch_size}, got a latent batch of {x.shape[0]}")
        z_t = sigma_to_vp_space(x, sigma)
        t_vec = torch.full((batch_size,), int(t), dtype=torch.long, device=x.device)
        eps = backend.predict_eps(z_t, t_vec, cond_for(schedule.stage_for(t), x.device))
        return x - sigma * eps.to(x.dtype)

    return denoise


# ------------------------------------------------------------------------------ inversion / recovery
def _check_num_steps(num_steps: int) -> None:
    if not 1 <= int(num_steps) < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be in [1, {NUM_TRAIN_TIMESTEPS - 1}] for inversion/recovery, got {num_steps}")


@torch.no_grad()
def ddim_invert(
    backend: DiffusionBackend,
    z0: torch.Tensor,
    stage_conds,
    num_steps: int,
    *,
    progress: Progress | None = None,
    cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Official DDIM inversion of the scaled latent z0 [B,4,h,w] → z_T (VP space, same shape and dtype).

    Ascends the DDIM grid 1, 1+c, …, with c = 1000 // num_steps. At each t: ε̂ = ε(x, t, c_{⌊t/100⌋}),
    x̂₀ = (x − √(1−ᾱ_t)ε̂)/√ᾱ_t, x ← √ᾱ_next·x̂₀ + √(1−ᾱ_next)·ε̂ with "next" the following grid point and, for
    the last step, t_last + 1 (as in the official code). No CFG.
    """
    _check_num_steps(num_steps)
    conds = stack_stage_conds(stage_conds).to(z0.device)
    grid = ddim_timesteps(num_steps)[::-1]
    nexts = grid[1:] + [min(grid[-1] + 1, NUM_TRAIN_TIMESTEPS - 1)]
    batch = z0.shape[0]
    x = z0
    for i, (t, t_next) in enumerate(zip(grid, nexts)):
        if cancel is not None:
            cancel()
        cond = conds[stage_of_timestep(t)].unsqueeze(0).expand(batch, -1, -1)
        t_vec = torch.full((batch,), t, dtype=torch.long, device=z0.device)
        eps = backend.predict_eps(x, t_vec, cond).to(x.dtype)
        x0 = predict_x0_from_eps(x, eps, alpha_bar(t))
        x = ddim_step(x0, eps, alpha_bar(t_next))
        if progress is not None:
            progress(i + 1, num_steps, {"t": t})
    return x


def recover_latent(
    backend: DiffusionBackend,
    z_T: torch.Tensor,
    stage_conds,
    num_steps: int,
    *,
    progress: Progress | None = None,
    cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Identity recovery: plain DDIM from the key z_T [B,4,h,w] (VP) with the stage conditionings at every step.

    Descends the full grid of ``num_steps`` (must equal the inversion's) to σ_final = σ(0), as the official
    code does, and returns the VP latent there (the recovered scaled latent).
    """
    _check_num_steps(num_steps)
    grid = ddim_timesteps(num_steps)
    sigmas = sampling_sigmas(grid)
    denoise = make_backend_denoiser(backend, EmbeddingSchedule.preset("recover"), stage_conds, None, z_T.shape[0])
    x = vp_to_sigma_space(z_T, sigma_at(grid[0]))
    total = len(grid)
    report = None if progress is None else (lambda info: progress(info["i"] + 1, total, {"t": info["t"]}))
    x = sample_guided_ddim(denoise, x, sigmas, timesteps=grid, callback=report, cancel=cancel)
    return to_vp(x, float(sigmas[-1]))


# -------------------------------------------------------------------------------------- protection
def img2img_start(
    z0: torch.Tensor, num_steps: int, strength: float, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Official img2img start for B samples of one source latent z0 [1,4,h,w].

    z_τ^(b) = √ᾱ_τ·z₀ + √(1−ᾱ_τ)·ε^(b) with τ = grid[int(strength·N)] and ε^(b) = seeded_noise(seed, b), read in
    σ space at the first denoising timestep (LDM's off-by-one): x_σ = a·z₀ + b·σ_first·ε.
    Returns (x_σ [B,4,h,w] on z0's device/dtype, sigmas float64 [n+1] ending at σ(0), timesteps [n]).
    """
    if z0.dim() != 4 or z0.shape[0] != 1:
        raise ValueError(f"source latent must have shape [1,4,h,w], got {tuple(z0.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    start = strength_start(num_steps, strength)
    first = start.denoise_timesteps[0]
    a, b = img2img_start_scales(start.noise_timestep, first)
    noise = torch.stack([seeded_noise(tuple(z0.shape[1:]), seed, i) for i in range(batch_size)])
    noise = noise.to(device=z0.device, dtype=z0.dtype)
    x = a * z0 + (b * sigma_at(first)) * noise
    return x, sampling_sigmas(start.denoise_timesteps), list(start.denoise_timesteps)


def protect(
    backend: DiffusionBackend,
    z0: torch.Tensor,
    stage_conds,
    null_cond: torch.Tensor | None,
    guidance: IdentityGuidance | None,
    *,
    task_schedule: EmbeddingSchedule,
    num_steps: int,
    strength: float,
    batch_size: int,
    seed: int,
    background: BackgroundPaste | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Anonymize or hide: img2img start, scheduled conditionings, guided DDIM → VP latents [B,4,h,w].

    ``guidance`` None gives the unguided run with the same noise (a baseline). ``progress(step, total, info)``
    gets info keys t, sigma and energy (scalar tensor or None).
    """
    x, sigmas, timesteps = img2img_start(z0, num_steps, strength, batch_size, seed)
    denoise = make_backend_denoiser(backend, task_schedule, stage_conds, null_cond, batch_size)
    total = len(timesteps)
    report = None if progress is None else (
        lambda info: progress(info["i"] + 1, total, {"t": info["t"], "sigma": info["sigma"], "energy": info["energy"]}))
    x = sample_guided_ddim(denoise, x, sigmas, timesteps=timesteps, guidance=guidance, background=background,
                           callback=report, cancel=cancel)
    return to_vp(x, float(sigmas[-1]))
