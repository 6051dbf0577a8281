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
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .autograd import as_normal
from .backend import DiffusionBackend
from .cuda_graphs import graph_scope
from .diffusion import (
    NUM_STAGES,
    NUM_TRAIN_TIMESTEPS,
    alpha_bar,
    check_num_steps,
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
from .msi import SPEEDS
from .schedules import EmbeddingSchedule

#: denoise(x_σ [B,4,h,w], σ, t) → x̂₀ [B,4,h,w]
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
Progress = Callable[[int, int, dict], None]


def host_sigmas(sigmas) -> list[float]:
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


def faces_stage_conds(stage_conds) -> torch.Tensor:
    """Stage conditionings of N faces as one tensor [N,10,77,D], from one face's ([10,77,D] or a sequence,
    :func:`stack_stage_conds`; N = 1) or several faces' [N,10,77,D]."""
    if isinstance(stage_conds, torch.Tensor) and stage_conds.dim() == 4:
        if stage_conds.shape[0] < 1 or stage_conds.shape[1] != NUM_STAGES:
            raise ValueError(f"stage conditionings of N faces must have shape [N, {NUM_STAGES}, 77, D], "
                             f"got {tuple(stage_conds.shape)}")
        return stage_conds
    return stack_stage_conds(stage_conds).unsqueeze(0)


def stage_cond_rows(conds: torch.Tensor, stage: int, batch: int) -> torch.Tensor:
    """The conditioning of every row of a sample-major batch of ``batch`` rows at ``stage``: [batch,77,D] with row
    b·N + i = conds[i, stage] for N faces' conds [N,10,77,D] (one face: a view of its row, no copy).

    Raises:
        ValueError: if ``batch`` is not a multiple of N.
    """
    faces = conds.shape[0]
    if batch % faces:
        raise ValueError(f"a batch of {batch} latents cannot hold the same number of samples of {faces} faces")
    if faces == 1:
        return conds[0, stage : stage + 1].expand(batch, -1, -1)
    return conds[:, stage].repeat(batch // faces, 1, 1)


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
    Returns the σ-space latent at sigmas[-1] (``sigma_to_vp_space(x, sigmas[-1])`` gives the VP latent).
    """
    sig = host_sigmas(sigmas)
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
    schedules that never ask for it (recovery). ``stage_conds`` is one face's [10,77,D] (every row) or N faces'
    [N,10,77,D] for a sample-major batch (row b·N + i is sample b of face i, :func:`stage_cond_rows`).
    """
    conds = faces_stage_conds(stage_conds)
    if batch_size % conds.shape[0]:
        raise ValueError(f"denoiser batch size {batch_size} is not a multiple of the {conds.shape[0]} faces")
    if null_cond is not None and (null_cond.dim() != 3 or null_cond.shape[0] != 1 or null_cond.shape[1:] != conds.shape[2:]):
        raise ValueError(f"null conditioning must have shape [1, {conds.shape[2]}, {conds.shape[3]}], "
                         f"got {tuple(null_cond.shape)}")
    cache: dict = {}
    bases: dict = {}
    t_vectors: dict = {}

    def cond_for(stage: int | None, device: torch.device) -> torch.Tensor:
        # grad-enabled calls (target "xt") must not feed inference tensors to ops that save them
        needs_normal = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        key = (stage, device, needs_normal)
        if key not in cache:
            if stage is None:
                if null_cond is None:
                    raise ValueError("the embedding schedule asks for the null conditioning but none was given")
                c = null_cond.to(device)
                c = (as_normal(c) if needs_normal else c).expand(batch_size, -1, -1)
            else:
                if (device, needs_normal) not in bases:  # every face's conditionings moved (and cloned) once
                    base = conds.to(device)
                    bases[(device, needs_normal)] = as_normal(base) if needs_normal else base
                c = stage_cond_rows(bases[(device, needs_normal)], stage, batch_size)
            cache[key] = c
        return cache[key]

    def denoise(x: torch.Tensor, sigma: float, t: int) -> torch.Tensor:
        if x.shape[0] != batch_size:
            raise ValueError(f"denoiser was built for batch size {batch_size}, got a latent batch of {x.shape[0]}")
        z_t = sigma_to_vp_space(x, sigma)
        key = (int(t), x.device)
        if key not in t_vectors:  # one small tensor per timestep, made once (a grid visits each t once per run)
            t_vectors[key] = torch.full((batch_size,), int(t), dtype=torch.long, device=x.device)
        eps = backend.predict_eps(z_t, t_vectors[key], cond_for(schedule.stage_for(t), x.device))
        return x - sigma * eps.to(x.dtype)

    return denoise


# ------------------------------------------------------------------------------------- run plans
@dataclass(frozen=True)
class SamplingOptions:
    """How a protection run samples (docs/method.md §8.6): DDIM grid size, strength, samples per face, seed.

    Attributes:
        steps: DDIM grid size N in [1, 999] (official: 50 anonymize, 100 hide).
        strength: fraction of the grid that is re-noised, in (0, 1] (official: 0.6 / 0.8); denoising runs
            int(strength·N) steps (:func:`core.diffusion.strength_start`).
        batch_size: samples B of each source face, ≥ 1 (official: 4 / 1).
        seed: noise seed ≥ 0; sample b uses ``seeded_noise(seed, b)`` (official: 125 / 100162).

    Raises:
        ValueError: on any value outside those ranges (when constructed).
    """

    steps: int
    strength: float
    batch_size: int
    seed: int

    def __post_init__(self):
        check_num_steps(self.steps, "steps")
        strength_start(self.steps, self.strength)  # raises for a strength outside (0, 1] or one leaving no step
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer ≥ 1, got {self.batch_size}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {self.seed}")

    @property
    def denoising_steps(self) -> int:
        """How many steps a run takes: int(strength·steps) (:func:`core.diffusion.strength_start`)."""
        return len(strength_start(self.steps, self.strength).denoise_timesteps)

    @classmethod
    def preset(cls, task: str, speed: str = "default") -> "SamplingOptions":
        """The settings of ``task`` ("anonymize" or "hide"): the official ones from the released notebooks for
        speed "paper" and "default", the halved grid of :data:`FAST_SAMPLING_PRESETS` for "fast"."""
        if task not in SAMPLING_PRESETS:
            raise ValueError(f"task must be one of {sorted(SAMPLING_PRESETS)}, got {task!r}")
        if speed not in SPEEDS:
            raise ValueError(f"speed must be one of {SPEEDS}, got {speed!r}")
        return (FAST_SAMPLING_PRESETS if speed == "fast" else SAMPLING_PRESETS)[task]


#: Official sampling settings per task (Anonymization.ipynb / Visual identity information hiding.ipynb).
SAMPLING_PRESETS = {
    "anonymize": SamplingOptions(steps=50, strength=0.6, batch_size=4, seed=125),
    "hide": SamplingOptions(steps=100, strength=0.8, batch_size=1, seed=100162),
}
#: The "fast" recipe (our choice, docs/method.md §8.8): the official strength, batch and seed on half the grid,
#: so half the guided steps (anonymize 15 instead of 30, hide 40 instead of 80).
FAST_SAMPLING_PRESETS = {
    "anonymize": SamplingOptions(steps=25, strength=0.6, batch_size=4, seed=125),
    "hide": SamplingOptions(steps=50, strength=0.8, batch_size=1, seed=100162),
}


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a σ-space run needs before its first step, computed on the host once.

    Attributes:
        x: σ-space start latent [B,4,h,w] on the source's device and dtype.
        sigmas: descending σ grid, float64 CPU [n+1]; the last entry is σ_final = σ(0) (official last step).
        timesteps: the integer DDPM timestep of each of the first n sigmas.
    """

    x: torch.Tensor
    sigmas: torch.Tensor
    timesteps: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def protection_plan(z0: torch.Tensor, options: SamplingOptions) -> SamplingPlan:
    """The official img2img start for B = ``options.batch_size`` samples of one source latent z0 [1,4,h,w].

    z_τ^(b) = √ᾱ_τ·z₀ + √(1−ᾱ_τ)·ε^(b) with τ = grid[int(strength·N)] and ε^(b) = seeded_noise(seed, b), read in
    σ space at the first denoising timestep (LDM's off-by-one, docs/method.md §8.5): x_σ = a·z₀ + b·σ_first·ε.

    Raises:
        ValueError: if z0 is not one latent [1,4,h,w].
    """
    if z0.dim() != 4 or z0.shape[0] != 1:
        raise ValueError(f"source latent must have shape [1,4,h,w], got {tuple(z0.shape)}")
    start = strength_start(options.steps, options.strength)
    first = start.denoise_timesteps[0]
    a, b = img2img_start_scales(start.noise_timestep, first)
    noise = torch.stack([seeded_noise(tuple(z0.shape[1:]), options.seed, i) for i in range(options.batch_size)])
    noise = noise.to(device=z0.device, dtype=z0.dtype)
    x = a * z0 + (b * sigma_at(first)) * noise
    return SamplingPlan(x, sampling_sigmas(start.denoise_timesteps), tuple(start.denoise_timesteps))


def faces_protection_plan(z0: torch.Tensor, options: SamplingOptions) -> SamplingPlan:
    """:func:`protection_plan` for N source latents z0 [N,4,h,w] at once, in sample-major order: row b·N + i
    of ``x`` [N·B,4,h,w] is sample b of face i, started from the same seeded noise ε^(b) as a one-face plan of
    that face (so each face's samples equal its own one-face run). Sample-major is the order in which ComfyUI
    repeats a conditioning of batch N over a latent batch of N·B (``comfy.utils.repeat_to_batch_size`` tiles:
    row k gets cond k % N), so face i's key-E conditions exactly its own samples.

    Raises:
        ValueError: if z0 is not [N,4,h,w] with N ≥ 1.
    """
    if z0.dim() != 4 or z0.shape[0] < 1:
        raise ValueError(f"source latents must have shape [N,4,h,w], got {tuple(z0.shape)}")
    plans = [protection_plan(z0[i : i + 1], options) for i in range(z0.shape[0])]
    x = torch.stack([p.x for p in plans], dim=1).reshape(-1, *z0.shape[1:])  # [B,N,...] → row b·N + i
    return SamplingPlan(x, plans[0].sigmas, plans[0].timesteps)


def sample_major(per_face: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-face values [N,...] repeated for B = ``batch_size`` samples each in sample-major order → [N·B,...]
    (row b·N + i = per_face[i]), e.g. each face's source latent and background mask for the whole batch."""
    return per_face.repeat(batch_size, *([1] * (per_face.dim() - 1)))


def face_samples(batch: torch.Tensor, faces: int, face: int) -> torch.Tensor:
    """The B samples [B,...] of face ``face`` (0-based) in a sample-major batch [N·B,...] of ``faces`` faces."""
    if batch.shape[0] % faces:
        raise ValueError(f"a batch of {batch.shape[0]} cannot hold the same number of samples of {faces} faces")
    return batch[face::faces]


def recovery_plan(z_T: torch.Tensor, num_steps: int) -> SamplingPlan:
    """Recovery from key-I: the full descending grid of ``num_steps`` (must equal the inversion's) down to
    σ_final = σ(0), starting from z_T [B,4,h,w] (VP) read in σ space at the top of the grid."""
    grid = ddim_timesteps(num_steps)
    return SamplingPlan(vp_to_sigma_space(z_T, sigma_at(grid[0])), sampling_sigmas(grid), tuple(grid))


def progress_callback(progress: Progress | None, total: int) -> Callable[[dict], None] | None:
    """Adapt a ``progress(step, total, info)`` callback (step = 1 … total; info: t, sigma, energy) to the
    per-step ``callback(info)`` of :func:`sample_guided_ddim`."""
    if progress is None:
        return None
    return lambda info: progress(info["i"] + 1, total, {"t": info["t"], "sigma": info["sigma"],
                                                        "energy": info["energy"]})


def run_plan(denoise: Denoiser, plan: SamplingPlan, *, guidance: IdentityGuidance | None = None,
             background: BackgroundPaste | None = None, callback: Callable[[dict], None] | None = None,
             cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Run :func:`sample_guided_ddim` over a plan with any denoiser (a backend's, or ComfyUI's model inside
    its sampler stack); returns the VP latent [B,4,h,w] at the plan's last σ."""
    x = sample_guided_ddim(denoise, plan.x, plan.sigmas, timesteps=plan.timesteps, guidance=guidance,
                           background=background, callback=callback, cancel=cancel)
    return sigma_to_vp_space(x, float(plan.sigmas[-1]))


# ------------------------------------------------------------------------------ inversion / recovery
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
    the last step, t_last + 1 (as in the official code). No CFG. ``stage_conds`` is one face's [10,77,D] (for
    every row) or N faces' [N,10,77,D] with z0 [N,4,h,w] (row i inverted with face i's; every face in one batch).

    Raises:
        ValueError: for a step count outside [1, 999], stage conditionings not shaped [10,77,D] or
            [N,10,77,D], or N faces' conditionings for a batch of other than N latents.
    """
    conds = faces_stage_conds(stage_conds).to(z0.device)
    batch = z0.shape[0]
    if conds.shape[0] not in (1, batch):
        raise ValueError(f"stage conditionings of {conds.shape[0]} faces cannot invert a batch of {batch} latents")
    grid = ddim_timesteps(num_steps)[::-1]
    nexts = grid[1:] + [min(grid[-1] + 1, NUM_TRAIN_TIMESTEPS - 1)]
    # constants of the loop, made once: each stage's conditioning as a batch, every step's timestep vector
    stage_cond = {s: stage_cond_rows(conds, s, batch) for s in {stage_of_timestep(t) for t in grid}}
    t_all = torch.tensor(grid, dtype=torch.long).to(z0.device).view(-1, 1).expand(-1, batch)
    x = z0
    with graph_scope(backend):
        for i, (t, t_next) in enumerate(zip(grid, nexts)):
            if cancel is not None:
                cancel()
            eps = backend.predict_eps(x, t_all[i], stage_cond[stage_of_timestep(t)]).to(x.dtype)
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
    """Identity recovery: plain DDIM from the key z_T [B,4,h,w] (VP) with the stage conditionings at every step
    (:func:`recovery_plan`); returns the VP latent at σ(0), the recovered scaled latent. N faces recover in one
    batch: z_T [N,4,h,w] with their conditionings [N,10,77,D] (row i with face i's)."""
    plan = recovery_plan(z_T, num_steps)
    denoise = make_backend_denoiser(backend, EmbeddingSchedule.preset("recover"), stage_conds, None, z_T.shape[0])
    with graph_scope(backend):
        return run_plan(denoise, plan, callback=progress_callback(progress, plan.num_steps), cancel=cancel)


# -------------------------------------------------------------------------------------- protection
def protect(
    backend: DiffusionBackend,
    z0: torch.Tensor,
    stage_conds,
    null_cond: torch.Tensor | None,
    guidance: IdentityGuidance | None,
    *,
    schedule: EmbeddingSchedule,
    options: SamplingOptions,
    background: BackgroundPaste | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Anonymize or hide: :func:`faces_protection_plan`, scheduled conditionings, guided DDIM → VP latents
    [N·B,4,h,w] for N source faces z0 [N,4,h,w] with their stage conditionings ([10,77,D] for one face,
    [N,10,77,D] for N), sample-major (row b·N + i is sample b of face i; :func:`face_samples` picks a face's).
    Each face's samples equal its own one-face run (to floating-point tolerance); ``guidance`` and
    ``background`` must be built for the same N faces (IdentityGuidance ``faces``, sample-major BackgroundPaste).

    ``guidance`` None gives the unguided run with the same noise (a baseline). ``progress(step, total, info)``
    gets info keys t, sigma and energy (scalar tensor or None).

    Raises:
        ValueError: if the conditionings are not one face's or z0's N faces'.
    """
    conds = faces_stage_conds(stage_conds)
    if conds.shape[0] != z0.shape[0]:
        raise ValueError(f"{z0.shape[0]} source latents need the stage conditionings of as many faces, "
                         f"got {conds.shape[0]}")
    plan = faces_protection_plan(z0, options)
    denoise = make_backend_denoiser(backend, schedule, conds, null_cond, plan.x.shape[0])
    with graph_scope(backend):
        return run_plan(denoise, plan, guidance=guidance, background=background,
                        callback=progress_callback(progress, plan.num_steps), cancel=cancel)
