"""The pack inside ComfyUI's sampler stack (docs/comfyui-internals.md §2.1–2.4, docs/method.md §8.7).

* :func:`run_plan_in_comfy` runs a ``core.sampling.SamplingPlan`` (Privacy Sampler, Recover Original) as a
  custom SAMPLER driven by a :class:`PrivacyGuider`, so model loading, patches, previews, progress and
  Cancel are ComfyUI's own while the guided DDIM step itself is the core's.
* :class:`PrivacyGuider` with a guidance factory is the GUIDER output of Identity Energy Guidance: identity
  guidance as an x̂₀ correction.
* :func:`with_timestep_range` writes the per-timestep CONDITIONING entries of the Embedding Scheduler.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import comfy.sample
import comfy.samplers

from ...core import diffusion
from ...core import sampling as core_sampling
from ...core.autograd import as_normal
from .autograd import grad_ready_model
from .models import intermediate_device, model_sampling, scale_latent, torch_device
from .progress import check_interrupt, progress_bar_enabled, sampler_callback


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
class PrivacyGuider(comfy.samplers.CFGGuider):
    """A GUIDER with one scheduled conditioning (CFG 1, as the official method) and optional identity
    guidance applied as an x̂₀ correction, so it also works with core ``SamplerCustomAdvanced`` and any sampler.

    For an Euler/DDIM step σ → σ', shifting x̂₀ by δ moves x' by δ·(1 − σ'/σ); δ is chosen so the step equals
    the official update x'_VP −= ρ(t)·g, i.e. δ = −ρ·g·√(1+σ'²)/(1 − σ'/σ).
    """

    def __init__(self, model_patcher, conditioning, guidance_factory=None):
        super().__init__(model_patcher)
        self.inner_set_conds({"positive": conditioning})
        self.guidance_factory = guidance_factory
        self._guidance = None
        self._host_sigmas: tuple = (None, [])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        denoised = super().predict_noise(x, timestep, model_options, seed)
        if self.guidance_factory is None:
            return denoised
        if self._guidance is None:
            self._guidance = self.guidance_factory()
        sigma = float(timestep.flatten()[0])
        rho = self._guidance.step_size(diffusion.timestep_from_sigma(sigma))
        if rho <= 0:
            return denoised
        sigma_next = self._next_sigma(model_options.get("transformer_options", {}).get("sample_sigmas"), sigma)
        g, _ = self._guidance.gradient(denoised)
        shrink = 1.0 - sigma_next / sigma if sigma > 0 else 1.0
        factor = rho * math.sqrt(1.0 + sigma_next ** 2) / max(shrink, 1e-3)
        return denoised - factor * g.to(denoised.dtype)

    def _next_sigma(self, sigmas, sigma: float) -> float:
        """The σ after ``sigma`` in the run's schedule (copied to the host once per run); 0 when unknown."""
        if sigmas is None:
            return 0.0
        if self._host_sigmas[0] is not sigmas:
            self._host_sigmas = (sigmas, [float(s) for s in sigmas.flatten().cpu()])
        values = self._host_sigmas[1]
        for a, b in zip(values, values[1:]):
            if abs(a - sigma) <= 1e-4 * max(1.0, a):
                return b
        return 0.0


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
