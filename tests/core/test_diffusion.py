"""core.diffusion: the schedule, DDIM grid and strength semantics equal the official (LDM / Diff-Privacy) values."""
import math

import pytest
import torch

from core import diffusion as d
from tests.support.prerequisites import require_module


def test_scaled_linear_betas_and_alpha_bar():
    betas = d.scaled_linear_betas()
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert math.isclose(float(betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(betas[-1]), 0.012, rel_tol=1e-12)
    a = d.alphas_cumprod()
    assert a.shape == (1000,) and bool((a[1:] < a[:-1]).all())  # strictly decreasing
    assert math.isclose(d.alpha_bar(0), 1 - 0.00085, rel_tol=1e-12)
    # published: SD's terminal √ᾱ_T = 0.068265 (Lin et al., "Common Diffusion Noise Schedules and Sample Steps
    # Are Flawed", Table 1) and k-diffusion's SD 1.x σ range 0.0292 … 14.6146
    assert round(math.sqrt(d.alpha_bar(999)), 6) == 0.068265
    assert round(d.sigma_at(0), 4) == 0.0292 and round(d.sigma_at(999), 4) == 14.6146
    # docs/method.md §4.4: √ᾱ₆₀₁ ≈ 0.40, √(1−ᾱ₆₀₁) ≈ 0.92; √ᾱ₈₀₁ ≈ 0.19, √(1−ᾱ₈₀₁) ≈ 0.98
    assert round(math.sqrt(d.alpha_bar(601)), 2) == 0.40 and round(math.sqrt(1 - d.alpha_bar(601)), 2) == 0.92
    assert round(math.sqrt(d.alpha_bar(801)), 2) == 0.19 and round(math.sqrt(1 - d.alpha_bar(801)), 2) == 0.98


def test_ddim_grid_has_offset_one():
    assert d.ddim_timesteps(50) == list(range(981, 0, -20))
    assert d.ddim_timesteps(100) == list(range(991, 0, -10))
    assert d.ddim_timesteps(999)[0] == 999 and d.ddim_timesteps(999)[-1] == 1
    with pytest.raises(ValueError):
        d.ddim_timesteps(1000)  # would reach t = 1000, past the table
    with pytest.raises(ValueError):
        d.ddim_timesteps(0)


@pytest.mark.parametrize("steps,strength,noise_t,first,count", [
    (50, 0.6, 601, 581, 30),   # official anonymization
    (100, 0.8, 801, 791, 80),  # official visual identity hiding
    (50, 1.0, 981, 981, 50),   # strength 1: the whole grid
])
def test_strength_start_matches_official(steps, strength, noise_t, first, count):
    start = d.strength_start(steps, strength)
    assert start.noise_timestep == noise_t
    assert start.denoise_timesteps[0] == first and start.denoise_timesteps[-1] == 1
    assert len(start.denoise_timesteps) == count
    assert list(start.denoise_timesteps) == sorted(start.denoise_timesteps, reverse=True)


def test_schedule_grid_and_strength_match_diffusers():
    """An independent implementation: diffusers' DDIMScheduler as SD 1.x ships it (scaled_linear β from 0.00085
    to 0.012, steps_offset 1) and its img2img pipeline's rule for which timesteps a strength denoises."""
    diffusers = require_module("diffusers", "a project dependency; run scripts/setup_env.sh")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    # diffusers keeps ᾱ in float32
    torch.testing.assert_close(d.alphas_cumprod(), scheduler.alphas_cumprod.double(), rtol=2e-6, atol=1e-7)
    for n in (1, 2, 3, 7, 10, 50, 100, 999):
        scheduler.set_timesteps(n)
        assert d.ddim_timesteps(n) == scheduler.timesteps.tolist(), n
    # StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(N·strength), N), denoise timesteps[N − init:]
    # (diffusers also *noises* to the first of those; the official LDM code noises one grid step higher)
    for n, strength in ((50, 0.6), (100, 0.8), (50, 1.0), (10, 0.35), (7, 0.5)):
        scheduler.set_timesteps(n)
        init = min(int(n * strength), n)
        expected = scheduler.timesteps[n - init:].tolist()
        assert list(d.strength_start(n, strength).denoise_timesteps) == expected, (n, strength)


def test_strength_errors():
    with pytest.raises(ValueError):
        d.strength_start(50, 0.0)
    with pytest.raises(ValueError):
        d.strength_start(50, 0.01)  # int(0.5) = 0 steps


def test_sigma_timestep_round_trip():
    for t in (0, 1, 21, 400, 581, 601, 981, 999):
        assert d.timestep_from_sigma(d.sigma_at(t)) == t
    sig = d.sigma_table()
    assert bool((sig[1:] > sig[:-1]).all())
    assert math.isclose(d.final_sigma(), math.sqrt(0.00085 / (1 - 0.00085)), rel_tol=1e-12)
    grid = d.ddim_timesteps(50)
    sigmas = d.sampling_sigmas(grid)
    assert len(sigmas) == 51 and math.isclose(float(sigmas[-1]), d.final_sigma())
    assert float(d.sampling_sigmas(grid, to_zero=True)[-1]) == 0.0


def test_vp_and_sigma_space_agree():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, t_prev = 581, 561
    a, a_prev = d.alpha_bar(t), d.alpha_bar(t_prev)
    s, s_prev = d.sigma_at(t), d.sigma_at(t_prev)
    x_t = d.q_sample(z0, eps, t)
    torch.testing.assert_close(d.vp_to_sigma_space(x_t, s), z0 + s * eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, eps, a), z0)
    # one DDIM step in VP space equals the Euler step in σ space
    x0_hat, eps_hat = 0.9 * z0, eps + 0.1
    x_t = d.q_sample(x0_hat, eps_hat, t)
    vp = d.ddim_step(x0_hat, eps_hat, a_prev)
    sig = d.ddim_step_sigma(d.vp_to_sigma_space(x_t, s), x0_hat, s, s_prev)
    torch.testing.assert_close(d.sigma_to_vp_space(sig, s_prev), vp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.q_sample(z0, eps, torch.tensor([t, t])), d.q_sample(z0, eps, t))


def test_img2img_start_scales_reproduce_official_start():
    """x_σ = a·z₀ + b·σ_first·ε is the official z_τ (noised to 601) read at σ(581)."""
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    a, b = d.img2img_start_scales(601, 581)
    x_sigma = a * z0 + b * d.sigma_at(581) * eps
    official = d.q_sample(z0, eps, 601)
    torch.testing.assert_close(d.sigma_to_vp_space(x_sigma, d.sigma_at(581)), official)
    assert d.img2img_start_scales(581, 581) == (1.0, 1.0)


def test_stage_of_timestep_and_seeded_noise():
    assert [d.stage_of_timestep(t) for t in (0, 99, 100, 581, 999)] == [0, 0, 1, 5, 9]
    n1, n2 = d.seeded_noise((4, 8, 8), 125, 0), d.seeded_noise((4, 8, 8), 125, 1)
    torch.testing.assert_close(n1, d.seeded_noise((4, 8, 8), 125, 0))
    assert not torch.equal(n1, n2)
