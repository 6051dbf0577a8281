"""The pack inside ComfyUI's sampler stack (docs/comfyui-internals.md §2.1–2.4, docs/method.md §8.7).

* :func:`run_plan_in_comfy` runs a ``core.sampling.SamplingPlan`` (Privacy Sampler, Recover Original) as a
  custom SAMPLER driven by a :class:`PrivacyGuider`, so model loading, patches, previews, progress and
  Cancel are ComfyUI's own while the guided DDIM step itself is the core's.
* :class:`PrivacyGuider` with a guidance factory is the GUIDER output of Identity Energy Guidance: identity
  guidance as an x̂₀ correction for ComfyUI's own ``euler`` / ``ddim`` samplers.
* :func:`with_timestep_range` writes the per-timestep CONDITIONING entries of the Embedding Scheduler.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.sample
import comfy.samplers

from ...core import diffusion
from ...core import sampling as core_sampling
from ...core.autograd import as_normal
from .autograd import grad_ready_model
from .models import intermediate_device, model_sampling, scale_latent, torch_device
from .progress import check_interrupt, progress_bar_enabled, sampler_callback

#: ComfyUI samplers for which the GUIDER's x̂₀ correction equals the official update: both run the
#: deterministic first-order step x' = x̂₀ + σ'·(x − x̂₀)/σ ("ddim" is ComfyUI's Euler with another inpaint noise).
EXACT_SAMPLERS = ("euler", "ddim")


# ------------------------------------------------------------------------------------ conditioning
def with_timestep_range(conditioning: list, start: float, end: float) -> list:
    """Copy of a CONDITIONING with ``start_percent``/``end_percent`` set on every entry, as ComfyUI's
    ConditioningSetTimestepRange does (docs/comfyui-internals.md §2.8)."""
    out = []
    for tensor, extras in conditioning:
        extras = dict(extras)
        extras["start_percent"] = float(start)
        extras["end_percent"] = float(end)
        out.append([tensor, extras])
    return out


# ------------------------------------------------------------------------------------- start noise
def start_noise(model, x_sigma: torch.Tensor, sigma0: float) -> torch.Tensor:
    """The NOISE [B,4,h,w] (float32) for which KSAMPLER's start over an empty latent (``noise_scaling``) is
    exactly ``x_sigma``: ComfyUI multiplies by σ₀, or by √(1+σ₀²) when σ₀ reaches the model's σ_max
    ("max denoise")."""
    sigma_max = float(model_sampling(model).sigma_max)
    at_max = math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max
    return (x_sigma / (math.sqrt(1.0 + sigma0 * sigma0) if at_max else sigma0)).float()


# ------------------------------------------------------------------------------------------ guider
def sampler_name(sampler) -> str:
    """A SAMPLER's name as KSamplerSelect lists it, as far as it can be told ("dpmpp_2m", "euler", …)."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        return type(sampler).__name__
    name = getattr(function, "__name__", repr(function))
    return name[len("sample_"):] if name.startswith("sample_") else name


def _churn(sampler) -> float:
    """The ``s_churn`` option of a KSAMPLER (Euler's stochastic variant when > 0)."""
    return float((getattr(sampler, "extra_options", None) or {}).get("s_churn", 0.0))


def is_exact_sampler(sampler) -> bool:
    """Whether ``sampler`` is ComfyUI's ``euler`` or ``ddim`` without churn, i.e. a KSAMPLER running
    ``k_diffusion.sampling.sample_euler`` deterministically (see :data:`EXACT_SAMPLERS`)."""
    return (isinstance(sampler, comfy.samplers.KSAMPLER)
            and sampler.sampler_function is k_diffusion_sampling.sample_euler and _churn(sampler) == 0.0)


def check_exact_sampler(sampler) -> None:
    """Refuse a sampler for which Identity Energy Guidance's GUIDER cannot reproduce the official update.

    Raises:
        ValueError: naming the sampler in use and the supported ones.
    """
    if is_exact_sampler(sampler):
        return
    used = sampler_name(sampler) + (f" with s_churn={_churn(sampler):g}" if _churn(sampler) else "")
    raise ValueError(
        f"Identity Energy Guidance's 'guider' output works with the samplers {' and '.join(EXACT_SAMPLERS)} "
        f"only (their deterministic first-order step is the one its x̂₀ correction reproduces exactly); "
        f"this run uses {used!r}. Select {EXACT_SAMPLERS[0]!r} or {EXACT_SAMPLERS[1]!r} in KSamplerSelect, "
        f"or use the Privacy Sampler node.")


def step_index(schedule: list[float], sigma: float) -> int:
    """The index i of the step that starts at ``sigma``: schedule[i] == σ (to float32 precision), i < n.

    Raises:
        ValueError: when σ is not one of the schedule's step sigmas (a sampler evaluating the model between
            them, which :func:`check_exact_sampler` rules out).
    """
    starts = schedule[:-1]
    i = min(range(len(starts)), key=lambda k: abs(starts[k] - sigma))
    if not math.isclose(starts[i], sigma, rel_tol=1e-5, abs_tol=1e-8):
        raise ValueError(f"the sampler evaluated the model at σ={sigma:.6g}, which is not a step of its schedule "
                         f"{[round(s, 6) for s in schedule]}; Identity Energy Guidance's GUIDER needs a sampler "
                         f"that steps from one sigma to the next ({', '.join(EXACT_SAMPLERS)})")
    return i


def x0_shift_factor(rho: float, sigma: float, sigma_next: float) -> float:
    """f with x̂₀ ← x̂₀ + f·g reproducing the official update for a step σ → σ' < σ.

    An Euler/DDIM step x' = x̂₀ + σ'·(x − x̂₀)/σ moves x' by δ·(1 − σ'/σ) when x̂₀ moves by δ; the official
    update is x' −= ρ·g·√(1+σ'²) in σ space (docs/method.md §4.1), so f = −ρ·√(1+σ'²)/(1 − σ'/σ).
    """
    return -rho * math.sqrt(1.0 + sigma_next * sigma_next) / (1.0 - sigma_next / sigma)


class PrivacyGuider(comfy.samplers.CFGGuider):
    """A GUIDER with one scheduled conditioning at CFG 1 (as the official method) and, with a
    ``guidance_factory`` (→ core IdentityGuidance, built on first use), identity guidance applied as an x̂₀
    correction (:func:`x0_shift_factor`).

    The correction is exact for ComfyUI's ``euler`` and ``ddim`` samplers only (:data:`EXACT_SAMPLERS`);
    :meth:`sample` refuses any other. Each step's σ' is the next entry of the run's own schedule
    (``transformer_options["sample_sigmas"]``, copied to the host once per run), so any scheduler works.
    Without a factory it is a plain CFG-1 guider for any sampler.

    With a ``gate`` (``gate(guidance, z)``, z the sampled latents as scaled SD latents [B,4,h,w] float32 on the
    compute device), :meth:`sample` calls it on what it is about to return; the gate raises (the identity gate,
    core/gate.py) to keep the latents from ever leaving the sampler.
    """

    def __init__(self, model_patcher, conditioning, guidance_factory: Callable | None = None,
                 gate: Callable | None = None):
        super().__init__(model_patcher)
        self.inner_set_conds({"positive": conditioning})
        self.guidance_factory = guidance_factory
        self.gate = gate
        self._guidance = None
        self._schedule: tuple = (None, [])

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if self.guidance_factory is not None:
            check_exact_sampler(sampler)
        out = super().sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask, callback=callback,
                             disable_pbar=disable_pbar, seed=seed)
        if self.gate is not None:
            if self._guidance is None:
                self._guidance = self.guidance_factory()
            self.gate(self._guidance, scale_latent(self.model_patcher, out.to(torch_device(), torch.float32)))
        return out

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        denoised = super().predict_noise(x, timestep, model_options, seed)
        if self.guidance_factory is None:
            return denoised
        if self._guidance is None:
            self._guidance = self.guidance_factory()
        schedule = self._run_schedule(model_options)
        i = step_index(schedule, float(timestep.flatten()[0]))
        sigma, sigma_next = schedule[i], schedule[i + 1]
        rho = self._guidance.step_size(diffusion.timestep_from_sigma(sigma))
        if rho <= 0:
            return denoised
        g, _ = self._guidance.gradient(denoised)
        return denoised + x0_shift_factor(rho, sigma, sigma_next) * g.to(denoised.dtype)

    def _run_schedule(self, model_options: dict) -> list[float]:
        """The run's σ schedule on the host, copied once per run (keyed by the sigma tensor ComfyUI passes)."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            raise RuntimeError("ComfyUI did not pass the run's sigmas (transformer_options['sample_sigmas']) to "
                               "Identity Energy Guidance's GUIDER; this ComfyUI version is not supported.")
        if self._schedule[0] is not sigmas:
            self._schedule = (sigmas, core_sampling.host_sigmas(sigmas))
        return self._schedule[1]


# ---------------------------------------------------------------------------------- core plans
def guided_ddim_sampler(run_loop: Callable) -> comfy.samplers.KSAMPLER:
    """Wrap ``run_loop(denoise, x, sigmas, callback)`` (a core σ-space loop) as a ComfyUI SAMPLER.

    ``denoise(x_σ, σ, t)`` calls ComfyUI's wrapped model with a normal-tensor σ batch (autograd may save it,
    guidance target "xt"); ``callback(info)`` forwards core's per-step info to ComfyUI's callback.
    """

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_sigma, sigma, t):
            return model(x_sigma, as_normal(s_in * float(sigma)), **extra_args)

        def step_callback(info):
            if callback is not None:
                callback({"i": info["i"], "denoised": info["denoised"], "x": info["x"],
                          "sigma": info["sigma"], "sigma_hat": info["sigma"]})
        return run_loop(denoise, x, sigmas, step_callback)

    return comfy.samplers.KSAMPLER(sample)


def run_guider(guider, noise: torch.Tensor, latent_samples: torch.Tensor, sampler, sigmas: torch.Tensor,
               seed: int, preview_steps: int, denoise_mask=None) -> torch.Tensor:
    """``guider.sample`` with ComfyUI's latent previews and progress bar; returns the unscaled latent
    [B,4,h,w] on the intermediate device."""
    callback = sampler_callback(guider.model_patcher, preview_steps)
    latent_samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_samples)
    out = guider.sample(noise, latent_samples, sampler, sigmas, denoise_mask=denoise_mask, callback=callback,
                        disable_pbar=not progress_bar_enabled(), seed=seed)
    return out.to(intermediate_device())


def run_plan_in_comfy(model, conditioning, plan: core_sampling.SamplingPlan, seed: int, *, guidance=None,
                      background=None, grad_through_unet: bool = False) -> torch.Tensor:
    """Run ``core.sampling.run_plan`` inside ComfyUI's sampler stack with ``conditioning`` (a CONDITIONING,
    e.g. the Embedding Scheduler's) at CFG 1.

    The start latent x_σ is handed to ComfyUI as the NOISE over an empty latent that ComfyUI's own start
    turns back into exactly x_σ (:func:`start_noise`). ``grad_through_unet`` makes the UNet differentiable
    (guidance target "xt"). Returns the VP scaled latents [B,4,h,w] float32 on the compute device at the
    plan's last σ. Cancel raises ComfyUI's InterruptProcessingException before the next step.
    """
    sampler_model = grad_ready_model(model) if grad_through_unet else model
    guider = PrivacyGuider(sampler_model, conditioning)

    def run_loop(denoise, x, _device_sigmas, callback):
        return core_sampling.run_plan(denoise, dataclasses.replace(plan, x=x), guidance=guidance,
                                      background=background, callback=callback, cancel=check_interrupt)

    noise = start_noise(model, plan.x, float(plan.sigmas[0]))
    unscaled = run_guider(guider, noise, torch.zeros_like(plan.x), guided_ddim_sampler(run_loop),
                          plan.sigmas.float(), seed, preview_steps=plan.num_steps)
    return scale_latent(model, unscaled.to(torch_device(), torch.float32))
