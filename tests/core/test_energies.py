"""Identity energies, step-size schedules, the guidance gradient and the background paste."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.diffusion import alpha_bar, q_sample, sigma_at, sigma_to_vp_space
from core.energies import (
    BackgroundPaste,
    IdentityGuidance,
    StepSizeSchedule,
    anonymization_energy,
    cosine_to_source,
    hiding_energy,
    mask_to_latent,
    pairwise_cosines,
    prepare_for_autograd,
    straight_through_clamp,
)
from tests.support.toy_models import ToyBackend, ToyRecognizer, toy_crop, toy_face_image


def _embeddings(b: int, d: int = 16, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=gen, dtype=dtype) * 3.0  # deliberately not unit-norm
    src = torch.randn(1, d, generator=gen, dtype=dtype) * 0.5
    return f, src


# ------------------------------------------------------------------------------------------ energies
def test_cosine_hand_computed_scale_invariant_and_accepts_flat_reference():
    # 3-4-5 triangle, orthogonal, opposite and diagonal vectors against a source on the x axis
    f = torch.tensor([[3.0, 4.0], [0.0, -2.0], [-5.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    src = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_to_source(f, src), torch.tensor([0.6, 0.0, -1.0, math.sqrt(0.5)],
                                                                      dtype=torch.float64))
    f, src = _embeddings(3)
    cos = cosine_to_source(f, src)
    assert cos.shape == (3,)
    torch.testing.assert_close(cos, cosine_to_source(f * 7.0, src[0] * 0.1))


def test_half_precision_embeddings_give_float32_energy():
    f, src = _embeddings(2, dtype=torch.float16)
    assert anonymization_energy(f, src).dtype == torch.float32
    assert hiding_energy(f, src).dtype == torch.float32


@pytest.mark.parametrize("diversity_weight", [1.0, 0.7, 0.0])
def test_anonymization_energy_gradcheck(diversity_weight):
    f, src = _embeddings(4, seed=1)
    f.requires_grad_(True)
    src.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: anonymization_energy(a, b, diversity_weight), (f, src))


def test_hiding_energy_gradcheck():
    f, src = _embeddings(3, seed=2)
    f.requires_grad_(True)
    src.requires_grad_(True)
    assert torch.autograd.gradcheck(hiding_energy, (f, src))


def test_energies_hand_computed():
    # source e1; samples e1, 3·(e1+e2), e2, −0.5·e1 (norms deliberately not 1), r = 1/√2:
    # cosines to the source 1, r, 0, −1 → hinge sum 1 + r; hiding Σ(1 − cos) = 0 + (1 − r) + 1 + 2 = 4 − r
    # pairs (0,1) r, (0,2) 0, (0,3) −1, (1,2) r, (1,3) −r, (2,3) 0 → hinge sum 2r
    src = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    f = torch.tensor([[1.0, 0.0, 0.0], [3.0, 3.0, 0.0], [0.0, 1.0, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    r = math.sqrt(0.5)
    assert float(anonymization_energy(f, src, 0.0)) == pytest.approx(1 + r, abs=1e-12)
    assert float(anonymization_energy(f, src, 0.5)) == pytest.approx(1 + r + 0.5 * 2 * r, abs=1e-12)
    assert float(anonymization_energy(f, src)) == pytest.approx(1 + r + 2 * r, abs=1e-12)  # official λ_div = 1
    assert float(hiding_energy(f, src)) == pytest.approx(4 - r, abs=1e-12)


def test_energy_ranges():
    for seed in range(20):
        f, src = _embeddings(4, seed=seed)
        assert float(anonymization_energy(f, src)) >= 0.0
        e = float(hiding_energy(f, src))
        assert 0.0 <= e <= 8.0
    f, src = _embeddings(3, seed=0)
    same = src.expand(3, -1) * 2.0
    assert float(hiding_energy(same, src)) == pytest.approx(0.0, abs=1e-12)
    assert float(hiding_energy(-same, src)) == pytest.approx(6.0, abs=1e-12)


def test_relu_hinge_gives_zero_gradient_when_all_cosines_are_non_positive():
    # three directions 120° apart in the plane orthogonal to the source, tilted slightly away from it:
    # every cosine to the source and every pairwise cosine is negative
    src = torch.zeros(1, 8, dtype=torch.float64)
    src[0, 0] = 1.0
    f = torch.zeros(3, 8, dtype=torch.float64)
    for k in range(3):
        f[k, 0] = -0.1
        f[k, 1] = math.cos(2 * math.pi * k / 3)
        f[k, 2] = math.sin(2 * math.pi * k / 3)
    assert (cosine_to_source(f, src) < 0).all() and (pairwise_cosines(f).triu(1) <= 0).all()
    f.requires_grad_(True)
    energy = anonymization_energy(f, src)
    (g,) = torch.autograd.grad(energy, f)
    assert float(energy.detach()) == 0.0
    assert torch.count_nonzero(g) == 0
    # the hinge is not trivially zero: flipping one sample toward the source produces a gradient
    f2 = f.detach().clone()
    f2[0, 0] = 1.0
    f2.requires_grad_(True)
    (g2,) = torch.autograd.grad(anonymization_energy(f2, src), f2)
    assert g2[0].abs().sum() > 0


def test_bad_reference_shape_is_reported():
    f, _ = _embeddings(2, d=16)
    with pytest.raises(ValueError, match="source embedding"):
        cosine_to_source(f, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="source embedding"):
        cosine_to_source(f, torch.zeros(1, 8))


# --------------------------------------------------------------------------------------- step sizes
def test_step_size_presets():
    hide = StepSizeSchedule.preset("hide")
    assert hide(999) == 1.5 and hide(601) == 1.5
    assert hide(600) == 2.5 and hide(1) == 2.5 and hide(0) == 2.5
    anon = StepSizeSchedule.preset("anonymize")
    assert all(anon(t) == 1.0 for t in (0, 1, 281, 581, 999))
    with pytest.raises(ValueError):
        StepSizeSchedule.preset("recover")


def test_step_size_constant_scaled_and_ordering():
    assert StepSizeSchedule.constant(0.0)(500) == 0.0
    assert StepSizeSchedule.preset("hide").scaled(2.0)(700) == 3.0
    assert StepSizeSchedule.preset("hide").scaled(2.0)(100) == 5.0
    # thresholds given out of order are still evaluated from the highest down
    s = StepSizeSchedule(((200, 2.0), (800, 0.5)), default=3.0)
    assert (s(900), s(801), s(800), s(201), s(200), s(0)) == (0.5, 0.5, 2.0, 2.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        StepSizeSchedule(((100, -1.0),))
    with pytest.raises(ValueError):
        StepSizeSchedule.constant(float("nan"))


# ------------------------------------------------------------------------------------ the guidance
def _toy_guidance(mode="anonymize", dtype=torch.float64, **kw):
    backend = ToyBackend(seed=3).to(dtype)
    rec = ToyRecognizer(seed=4).to(dtype)
    with torch.no_grad():
        z_src = backend.encode_image(toy_face_image(0, size=32).to(dtype))
        src = rec(toy_crop(backend.decode_latent(z_src)))
    guidance = IdentityGuidance(backend.decode_latent, rec, toy_crop, src, mode=mode, **kw)
    gen = torch.Generator().manual_seed(11)
    x0 = (z_src + 0.7 * torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64).to(dtype))
    return guidance, x0, backend, rec


@pytest.mark.parametrize("mode", ["anonymize", "hide"])
def test_energy_gradcheck_through_decoder_and_recognizer(mode):
    guidance, x0, _, _ = _toy_guidance(mode)
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(guidance.energy, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["anonymize", "hide"])
def test_gradient_matches_float64_autograd(mode):
    guidance64, x0, _, _ = _toy_guidance(mode)
    x = x0.clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(guidance64.energy(x), x)
    guidance32, _, _, _ = _toy_guidance(mode, dtype=torch.float32)
    g, energy = guidance32.gradient(x0.float())
    assert g.dtype == torch.float32 and g.shape == x0.shape
    assert energy.dim() == 0 and not energy.requires_grad
    torch.testing.assert_close(energy.double(), guidance64.energy(x0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-5)
    assert g.abs().sum() > 0


def test_similarities_report_cosines_without_grad():
    guidance, x0, backend, rec = _toy_guidance("hide")
    sims = guidance.similarities(x0)
    assert sims.shape == (3,) and not sims.requires_grad
    f = rec(toy_crop(backend.decode_latent(x0)))
    torch.testing.assert_close(sims, F.cosine_similarity(f, guidance.source_embedding, dim=-1))  # torch's, not ours
    assert float(guidance.energy(x0).detach()) == pytest.approx(float((1 - sims).sum()))
    # the pipeline decodes its results once and scores the decoded images: the same cosines
    torch.testing.assert_close(guidance.image_similarities(backend.decode_latent(x0)), sims)


def test_max_grad_norm_clips_per_sample():
    guidance, x0, _, _ = _toy_guidance("anonymize", dtype=torch.float32)
    x0 = x0.float()
    g_free, _ = guidance.gradient(x0)
    norms = g_free.flatten(1).norm(dim=1)
    limit = float(norms.min()) * 0.5
    guidance.max_grad_norm = limit
    g_clip, _ = guidance.gradient(x0)
    torch.testing.assert_close(g_clip.flatten(1).norm(dim=1), torch.full((3,), limit), rtol=1e-5, atol=1e-7)
    cos = F.cosine_similarity(g_clip.flatten(1), g_free.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(3), rtol=1e-5, atol=1e-5)
    # a generous limit leaves the gradient unchanged
    guidance.max_grad_norm = float(norms.max()) * 2
    torch.testing.assert_close(guidance.gradient(x0)[0], g_free)


def test_straight_through_clamp():
    x = torch.tensor([-3.0, -0.5, 0.2, 2.0], requires_grad=True)
    y = straight_through_clamp(x)
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, -0.5, 0.2, 1.0]))
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 5.0)).sum(), x)
    torch.testing.assert_close(g, torch.arange(1.0, 5.0))


def test_clamp_decoded_changes_the_forward_pass_only():
    guidance, x0, backend, _ = _toy_guidance("hide", dtype=torch.float32)
    x0 = x0.float() * 4.0  # decodes well outside [−1, 1]
    assert backend.decode_latent(x0).abs().max() > 1.5
    e_free = guidance.energy(x0)
    guidance.clamp_decoded = True
    e_clamped = guidance.energy(x0)
    f_clamped = guidance.recognizer(toy_crop(backend.decode_latent(x0).clamp(-1, 1)))
    expected = (1 - F.cosine_similarity(f_clamped, guidance.source_embedding, dim=-1)).sum()  # E_hide by hand
    torch.testing.assert_close(e_clamped, expected)
    assert not torch.isclose(e_free, e_clamped)
    g, _ = guidance.gradient(x0)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_decode_dtype_casts_the_latent_and_keeps_float32_results():
    backend = ToyBackend(seed=3)
    rec = ToyRecognizer(seed=4)
    seen = []

    def decode(z):
        seen.append(z.dtype)
        return backend.decode_latent(z)  # the toy decoder computes in its own dtype

    with torch.no_grad():
        z = backend.encode_image(toy_face_image(0, size=32))
        src = rec(toy_crop(backend.decode_latent(z)))
    guidance = IdentityGuidance(decode, rec, toy_crop, src, decode_dtype=torch.bfloat16)
    g, energy = guidance.gradient(z.expand(2, -1, -1, -1))
    assert seen == [torch.bfloat16]
    assert g.dtype == torch.float32 and energy.dtype == torch.float32


def test_invalid_guidance_settings_are_rejected():
    rec = ToyRecognizer()
    ok = dict(decode=lambda z: z, recognizer=rec, crop=toy_crop, source_embedding=torch.zeros(1, 512))
    with pytest.raises(ValueError, match="mode"):
        IdentityGuidance(**ok, mode="blur")
    with pytest.raises(ValueError, match="target"):
        IdentityGuidance(**ok, target="eps")
    with pytest.raises(ValueError, match="max_grad_norm"):
        IdentityGuidance(**ok, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="source_embedding"):
        IdentityGuidance(**{**ok, "source_embedding": torch.zeros(2, 512)})
    assert IdentityGuidance(**ok, mode="hide").step_size == StepSizeSchedule.preset("hide")


# ------------------------------------------------------------------------- autograd in inference mode
def _inference_mode_setup():
    with torch.inference_mode():
        backend = ToyBackend(seed=3, inside_inference_mode=True)
        rec = ToyRecognizer(seed=4, inside_inference_mode=True)
        z = backend.encode_image(toy_face_image(0, size=32))
        src = rec(toy_crop(backend.decode_latent(z)))
        x0 = z.expand(2, -1, -1, -1) + 0.3
    assert backend.conv_in.weight.is_inference() and src.is_inference() and x0.is_inference()
    return backend, rec, src, x0


def test_gradient_works_with_everything_created_in_inference_mode():
    backend, rec, src, x0 = _inference_mode_setup()
    guidance = IdentityGuidance(backend.decode_latent, rec, toy_crop, src, autograd_modules=(backend,))
    with torch.inference_mode():  # how ComfyUI calls a node
        g, energy = guidance.gradient(x0)
        sims = guidance.similarities(x0)
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and torch.isfinite(energy)
    assert sims.shape == (2,)
    # same numbers as with normally built models
    ref_backend, ref_rec = ToyBackend(seed=3), ToyRecognizer(seed=4)
    ref = IdentityGuidance(ref_backend.decode_latent, ref_rec, toy_crop, src.clone())
    g_ref, e_ref = ref.gradient(x0.clone())
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(energy, e_ref)


def test_missing_autograd_module_gives_an_actionable_error():
    backend, rec, src, x0 = _inference_mode_setup()
    guidance = IdentityGuidance(backend.decode_latent, rec, toy_crop, src)  # decoder weights not listed
    with torch.inference_mode(), pytest.raises(RuntimeError, match="autograd_modules"):
        guidance.gradient(x0)


def test_prepare_for_autograd_swaps_only_inference_tensors():
    with torch.inference_mode():
        rec = ToyRecognizer(seed=4, inside_inference_mode=True)
    before = {k: v.clone() for k, v in rec.state_dict().items()}
    assert prepare_for_autograd(rec) == len(list(rec.parameters()))
    assert not any(p.is_inference() for p in rec.parameters())
    for k, v in rec.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert prepare_for_autograd(rec) == 0


# ------------------------------------------------------------------------------- background paste
def _paste_case(renoise=False):
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 8, 8, generator=gen) > 0.5).float()
    z0 = torch.randn(1, 4, 8, 8, generator=gen)
    x = torch.randn(3, 4, 8, 8, generator=gen) * 5
    return BackgroundPaste(mask, z0, renoise=renoise), mask.bool().expand(3, 4, -1, -1), z0, x


@pytest.mark.parametrize("t", [281, 299, 201, 101, 1])
def test_background_paste_official_rule_when_active(t):
    paste, keep, z0, x = _paste_case()
    t_next = max(t - 20, 0)
    out = paste.apply(x, t, sigma_at(t_next))
    assert torch.equal(out[~keep], x[~keep])
    # official: in VP space the background is the clean source latent, x_{t−1} = z₀. The VP latent is the
    # σ-space one times √ᾱ (σ² = (1−ᾱ)/ᾱ), so check through ᾱ rather than the σ formula the paste uses.
    torch.testing.assert_close(out[keep] * math.sqrt(alpha_bar(t_next)), z0.expand_as(x)[keep])


@pytest.mark.parametrize("t", [300, 301, 381, 581, 981])
def test_background_paste_inactive_from_300(t):
    paste, _, _, x = _paste_case()
    assert torch.equal(paste.apply(x, t, sigma_at(t - 20)), x)


def test_background_paste_below_timestep_uses_stage_floor():
    paste, _, _, x = _paste_case()
    paste.below_timestep = 450  # ⌊t/100⌋ < 4
    assert paste.active(399) and not paste.active(400) and not paste.active(449)


def test_background_renoise_uses_one_fixed_noise():
    paste, keep, z0, x = _paste_case(renoise=True)
    s1, s2 = sigma_at(261), sigma_at(241)
    a, b = paste.apply(x, 281, s1), paste.apply(x, 261, s2)
    eps_a = (a - z0) / s1
    eps_b = (b - z0) / s2
    torch.testing.assert_close(eps_a[keep], eps_b[keep])
    # it is q_sample(z₀, ε, t_next) read in σ space
    torch.testing.assert_close(sigma_to_vp_space(a, s1)[keep], q_sample(z0.expand_as(x), eps_a, 261)[keep])
    given = torch.ones_like(x)
    torch.testing.assert_close(paste.apply(x, 281, s1, noise=given)[keep], (z0 + s1 * given).expand_as(x)[keep])


def test_background_paste_validates_shapes():
    with pytest.raises(ValueError, match="mask_to_latent"):
        BackgroundPaste(torch.ones(1, 1, 64, 64), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="1,h,w"):
        BackgroundPaste(torch.ones(1, 8, 8), torch.zeros(1, 4, 8, 8))


def test_mask_to_latent_nearest():
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    mask[:8, 40:48] = 1.0
    lat = mask_to_latent(mask, (8, 8))
    assert lat.shape == (1, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[:, :4] = 1.0
    expected[0, 5] = 1.0
    torch.testing.assert_close(lat[0, 0], expected)
    assert mask_to_latent(mask.expand(2, -1, -1), (8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_latent(mask * 255, (8, 8))
