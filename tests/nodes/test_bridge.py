"""The bridge (``nodes/comfy``) against the plain-Python core: the same checkpoint gives the same model through
ComfyUI and through the diffusers backend, so keys made in one work in the other; the GUIDER's step is the
core's guided step."""
from __future__ import annotations

import sys

import pytest
import torch

from core import sampling as core_sampling

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def loaded(comfy_inprocess, tiny_checkpoint, comfyui_dir):
    """(bridge package, MODEL, ComfyBackend, DiffusersBackend) on the tiny checkpoint, loaded as ComfyUI's
    executor does; the bridge's modules are attributes of the package (``bridge.backend``, ``bridge.models``…)."""
    import comfy.sd

    from core.diffusers_backend import DiffusersBackend

    nodes_package = comfy_inprocess.node_classes["DiffPrivacy_PrivacySampler"].__module__.rsplit(".", 1)[0]
    bridge = sys.modules[nodes_package + ".comfy"]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        comfy_backend = bridge.backend.ComfyBackend(model, clip, vae, trainable=True)
    plain = DiffusersBackend.from_single_file(tiny_checkpoint, tokenizer_dir=comfyui_dir / "comfy" / "sd1_tokenizer")
    return bridge, model, comfy_backend, plain


def test_fingerprint_is_backend_independent(loaded):
    bridge, model, comfy_backend, plain = loaded
    assert bridge.models.model_fingerprint(model) == plain.model_fingerprint() == comfy_backend.model_fingerprint()


def test_same_noise_prediction_and_conditioning(loaded):
    _, _, comfy_backend, plain = loaded
    dev = comfy_backend.device  # CUDA under scripts/gpu_check.sh; the plain backend stays on the CPU
    g = torch.Generator().manual_seed(3)
    tokens = 0.02 * torch.randn(2, 768, generator=g)
    with torch.inference_mode():
        c_comfy = comfy_backend.encode_stage_tokens(tokens.to(dev)).cpu()
        c_plain = plain.encode_stage_tokens(tokens)
        torch.testing.assert_close(c_comfy, c_plain, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(comfy_backend.null_conditioning().cpu(), plain.null_conditioning(),
                                   atol=2e-3, rtol=2e-3)
        z = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([650, 120])
        eps_comfy = comfy_backend.predict_eps(z.to(dev), t.to(dev), c_plain.to(dev)).float().cpu()
        torch.testing.assert_close(eps_comfy, plain.predict_eps(z, t, c_plain), atol=2e-3, rtol=2e-3)


def test_stage_token_gradient_flows_through_comfy_models(loaded):
    """What MSI Invert needs inside ComfyUI: d ε-loss / d token through CLIP and the UNet under inference mode."""
    _, _, comfy_backend, _ = loaded
    dev = comfy_backend.device
    with torch.inference_mode():
        z = torch.randn(1, 4, 8, 8, device=dev)
    with torch.inference_mode(False):
        tokens = (0.02 * torch.randn(1, 768, device=dev)).requires_grad_(True)
        eps = comfy_backend.predict_eps(z.clone(), torch.tensor([500], device=dev),
                                        comfy_backend.encode_stage_tokens(tokens))
        (grad,) = torch.autograd.grad(eps.square().mean(), tokens)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_msi_and_inversion_replay_real_cuda_graphs_on_a_gpu(loaded):  # required by scripts/gpu_check.py
    """On CUDA (scripts/gpu_check.sh), MSI Invert's loops replay the UNet step as CUDA graphs by default, each
    checked against the eager step, and give what the same loops give eagerly (ComfyUI's fp16/bf16 UNet: a
    loose bound). The CPU runs the same logic with stand-in captures (tests/nodes/test_speed.py)."""
    from core import msi, sampling
    from core.autograd import normal_tensors

    _, _, comfy_backend, _ = loaded
    if comfy_backend.device.type != "cuda":
        assert comfy_backend.cuda_graphs_status.startswith("off: CUDA graphs need a CUDA device")
        pytest.skip("real CUDA graphs need ComfyUI on a CUDA device (scripts/gpu_check.sh)")
    image = torch.linspace(-1, 1, 3 * 64 * 64, device=comfy_backend.device).view(1, 3, 64, 64)
    options = msi.MSIOptions.preset("lite", steps=6, timesteps_per_step=2, seed=5)

    def run():  # each loop opens its own scope, as in MSI Invert
        with torch.inference_mode():
            with normal_tensors():
                result = msi.train_msi(comfy_backend, image, options)
            return result, sampling.ddim_invert(comfy_backend, result.source_latent, result.stage_conds, 6)

    with comfy_backend.unet_graphs(enabled=False, why="the test's eager reference"):
        eager = run()
    before = comfy_backend._graphs.stats.captures
    graphed = run()
    stats = comfy_backend._graphs.stats
    assert comfy_backend._graphs.failed is None, comfy_backend.cuda_graphs_status
    assert stats.captures - before == 2 and max(stats.verified) < 2e-2
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert rel(graphed[0].stage_conds, eager[0].stage_conds) < 5e-2
    assert rel(graphed[1], eager[1]) < 5e-2


def test_interrupt_stops_msi_and_sampling(loaded):
    """ComfyUI's Cancel (interrupt flag) stops MSI training at the next step and the sampler before its next
    step, through the bridge's check_interrupt."""
    import comfy.model_management as mm

    from core import msi
    from core.msi import MSIOptions

    bridge, model, comfy_backend, _ = loaded
    seen = []

    def progress(step, total, info):
        seen.append(step)
        if step == 2:
            mm.interrupt_current_processing(True)

    image = torch.zeros(1, 3, 64, 64, device=comfy_backend.device)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            msi.train_msi(comfy_backend, image, MSIOptions.preset("lite", steps=20), progress=progress,
                          cancel=bridge.progress.check_interrupt)
        assert seen == [1, 2]  # stopped at the first check after the flag was set
        with torch.inference_mode():
            z0 = torch.zeros(1, 4, 8, 8, device=comfy_backend.device)
            from core import sampling
            plan = sampling.protection_plan(z0, sampling.SamplingOptions(10, 0.6, 1, 0))
            conditioning = [[torch.zeros(1, 77, 768, device=comfy_backend.device), {}]]
            mm.interrupt_current_processing(True)
            with pytest.raises(mm.InterruptProcessingException):
                bridge.sampling.run_plan_in_comfy(model, conditioning, plan, 0)
    finally:
        mm.interrupt_current_processing(False)


@pytest.mark.slow
def test_clip_vision_hidden_states_follow_the_hf_convention(loaded, comfyui_dir):
    """MSI's CLIP depths 3/7/11/15/24 mean the same thing through ComfyUI's CLIP_VISION (bridge) and through
    transformers (plain core): index 0 = embeddings after the pre-LayerNorm, index i = after layer i.
    Full ViT-L/14 shapes with random weights, loaded into ComfyUI's own model class from its vitl config."""
    import comfy.clip_vision

    from core.diffusers_backend import ClipVisionEncoder

    bridge = loaded[0]
    hf = ClipVisionEncoder.from_config(seed=0)
    for p in hf.model.parameters():  # transformers leaves LayerNorms at identity; randomise them too
        p.data.add_(0.02 * torch.randn_like(p))
    state = {k if k.startswith("vision_model.") else "vision_model." + k: v.clone()
             for k, v in hf.model.state_dict().items()}
    with torch.inference_mode():
        comfy_vision = comfy.clip_vision.ClipVisionModel(str(comfyui_dir / "comfy" / "clip_vision_config_vitl.json"))
        missing, _ = comfy_vision.load_sd(state)
        assert not [k for k in missing if not k.startswith("visual_projection")], missing
        pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        ours = bridge.backend.ComfyVisionEncoder(comfy_vision).hidden_states(pixels)
        ref = hf.hidden_states(pixels)
    assert len(ours) == len(ref) == 25
    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    # ComfyUI runs this tower in fp16 on the CPU: ~1e-3 relative error; a neighbouring layer is far off
    for i in (0, 3, 7, 11, 15, 24):
        assert rel(ours[i], ref[i]) < 5e-3, i
        assert rel(ours[i], ref[i - 1 if i else 1]) > 2e-2, i

    # MSI Invert's faithful mode end to end on ComfyUI's models: the vision features feed the stage tokens
    from core import msi
    from core.msi import MSIOptions
    comfy_backend = loaded[2]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode(False):
        result = msi.train_msi(comfy_backend, image, MSIOptions.preset("faithful", steps=2, seed=5),
                               vision=bridge.backend.ComfyVisionEncoder(comfy_vision))
    assert result.stage_tokens.shape == (10, 768) and result.stage_conds.shape == (10, 77, 768)
    assert torch.isfinite(result.stage_conds).all()
    assert (result.stage_tokens[0] - result.stage_tokens[9]).abs().max() > 1e-4


def test_image_conversions(loaded):
    """nodes.convert: grayscale and RGBA IMAGEs become RGB, sizes round to multiples of 8, sizes outside the core's
    one policy (64..8192 px) are refused with a message naming the node input the image came from."""
    bridge = loaded[0]
    convert = sys.modules[bridge.__name__.rsplit(".", 1)[0] + ".convert"]
    gray = torch.full((1, 70, 90, 1), 0.25)
    assert convert.rgb(gray).shape == (1, 70, 90, 3)
    rgba = torch.cat([torch.zeros(1, 64, 64, 3), torch.full((1, 64, 64, 1), 0.5)], dim=-1)
    torch.testing.assert_close(convert.rgb(rgba), torch.full((1, 64, 64, 3), 0.5))  # composited over white
    x = convert.to_model_image(gray)
    assert x.shape == (1, 3, 64, 88) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert convert.to_model_image(torch.zeros(1, 64, 4104, 3)).shape == (1, 3, 64, 4104)  # the CLI accepts it too
    for bad in (torch.zeros(1, 32, 32, 3), torch.zeros(1, 64, 8200, 3), torch.full((1, 64, 64, 3), float("nan")),
                torch.zeros(1, 64, 64, 2)):
        with pytest.raises(Exception) as err:
            convert.to_model_image(bad)
        assert type(err.value).__name__ == "InvalidImageError"
    with pytest.raises(Exception) as err:
        convert.to_model_image(torch.zeros(1, 32, 48, 3), "photo at Face Align's 'image' input")
    assert "Face Align's 'image' input is 48×32 px" in str(err.value)
    assert "use Face Align" not in str(err.value).lower()
    # floats from 16-bit data keep their precision; unscaled 16-bit values are refused, naming the input
    sixteen = torch.arange(64 * 64 * 3, dtype=torch.float32).reshape(1, 64, 64, 3) % 65536 / 65535
    torch.testing.assert_close(convert.to_model_image(sixteen), sixteen.permute(0, 3, 1, 2) * 2 - 1)
    with pytest.raises(Exception) as err:
        convert.to_model_image(sixteen * 65535, "photo at Face Align's 'image' input")
    assert type(err.value).__name__ == "InvalidImageError"
    assert "Face Align's 'image' input has values from 0 to 1.229e+04" in str(err.value)


def test_gradient_checkpointing_keeps_the_gradient_and_is_removed(loaded):
    """MSI's UNet checkpointing on ComfyUI's model: same gradient, and the shared modules are restored."""
    _, model, comfy_backend, _ = loaded
    unet = model.model.diffusion_model
    dev = comfy_backend.device
    with torch.inference_mode():
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)).to(dev)

    def grad():
        with torch.inference_mode(False):
            tokens = (0.02 * torch.ones(1, 768, device=dev)).requires_grad_(True)
            eps = comfy_backend.predict_eps(z.clone(), torch.tensor([300], device=dev),
                                            comfy_backend.encode_stage_tokens(tokens))
            return torch.autograd.grad(eps.square().mean(), tokens)[0]

    plain = grad()
    comfy_backend.enable_gradient_checkpointing(True)
    try:
        assert "_dp_plain_forward" in unet.input_blocks[0].__dict__
        checkpointed = grad()
    finally:
        comfy_backend.enable_gradient_checkpointing(False)
    assert not any("_dp_plain_forward" in b.__dict__ for b in unet.input_blocks)
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_start_noise_reproduces_the_start_latent(loaded):
    """ComfyUI's KSAMPLER start (noise_scaling over an empty latent) gives back our σ-space start latent, also
    when σ₀ is the model's σ_max (999-step grid, strength 1), where ComfyUI scales by √(1+σ²) instead of σ."""
    from types import SimpleNamespace

    import comfy.samplers

    from core import diffusion

    bridge, model, _, _ = loaded
    ms = bridge.models.model_sampling(model)
    wrap = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=ms))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    for t in (581, 999):
        sigma0 = torch.tensor([diffusion.sigma_at(t)])
        noise = bridge.sampling.start_noise(model, x, float(sigma0))
        at_max = comfy.samplers.KSAMPLER(None).max_denoise(wrap, sigma0)  # ComfyUI's own rule
        assert at_max == (t == 999)
        started = ms.noise_scaling(sigma0, noise.clone(), torch.zeros_like(x), at_max)
        torch.testing.assert_close(started, x, atol=1e-5, rtol=1e-5)


def test_latent_scaling_is_the_models_format_and_sd1_without_a_model(loaded):
    """One pair of conversions between LATENT dicts and scaled latents; without a MODEL (the key nodes) it is
    ComfyUI's SD1.x format, which is this SD1.x checkpoint's."""
    from core.diffusion import LATENT_SCALE

    bridge, model, _, _ = loaded
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    latent = bridge.models.to_comfy_latent(model, z)
    torch.testing.assert_close(latent["samples"] * LATENT_SCALE, z)
    torch.testing.assert_close(bridge.models.to_scaled_latent(model, latent).cpu(), z)
    torch.testing.assert_close(bridge.models.to_scaled_latent(None, latent).cpu(), z)
    torch.testing.assert_close(bridge.models.to_comfy_latent(None, z)["samples"], latent["samples"])


class _FixedGuidance:
    """Stands in for core IdentityGuidance in the sampler: ρ(t) = 0.7 and g = tanh(x̂₀) (depends on x̂₀)."""

    target = "x0"

    def __init__(self, rho: float = 0.7):
        from core.energies import StepSizeSchedule

        self.step_size = StepSizeSchedule.constant(rho)
        self.calls = 0

    def gradient(self, x0):
        self.calls += 1
        return torch.tanh(x0.float()), None


def _guided_setup(seed: int = 6):
    from core import sampling

    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        z0 = torch.randn(1, 4, 8, 8, generator=g)
        conditioning = [[0.5 * torch.randn(1, 77, 768, generator=g), {}]]
        plan = sampling.protection_plan(z0, sampling.SamplingOptions(10, 0.6, 2, 3))
    return conditioning, plan


@pytest.mark.parametrize("sampler_name", ["euler", "ddim"])
def test_guider_step_equals_the_core_guided_step(loaded, sampler_name):
    """The GUIDER's x̂₀ correction with ComfyUI's own euler/ddim sampler gives the core's guided DDIM run
    (σ' read from the run's schedule, official update x' −= ρ·g·√(1+σ'²)) through the same model."""
    import comfy.samplers

    from core.diffusion import sigma_to_vp_space

    bridge, model, _, _ = loaded
    conditioning, plan = _guided_setup()
    core_guidance, guider_guidance = _FixedGuidance(), _FixedGuidance()
    with torch.inference_mode():
        unguided = bridge.sampling.run_plan_in_comfy(model, conditioning, plan, 0).cpu()
        by_core = bridge.sampling.run_plan_in_comfy(model, conditioning, plan, 0, guidance=core_guidance).cpu()
        guider = bridge.sampling.PrivacyGuider(model, conditioning, lambda: guider_guidance)
        noise = bridge.sampling.start_noise(model, plan.x, float(plan.sigmas[0]))
        unscaled = bridge.sampling.run_guider(guider, noise, torch.zeros_like(plan.x),
                                              comfy.samplers.sampler_object(sampler_name), plan.sigmas.float(),
                                              seed=0, preview_steps=plan.num_steps)
        by_guider = sigma_to_vp_space(bridge.models.scale_latent(model, unscaled.float()), float(plan.sigmas[-1]))
    assert core_guidance.calls == guider_guidance.calls == plan.num_steps
    assert (by_core - unguided).abs().max() > 0.1  # the guidance matters here
    torch.testing.assert_close(by_guider.cpu(), by_core, atol=1e-5, rtol=1e-5)  # measured 7e-7 apart on the CPU


@pytest.mark.parametrize("make", ["dpmpp_2m", "euler_ancestral", "euler_with_churn"])
def test_guider_refuses_samplers_it_cannot_serve_exactly(loaded, make):
    """Identity Energy Guidance's GUIDER names the supported samplers instead of guiding inexactly."""
    import comfy.k_diffusion.sampling
    import comfy.samplers

    bridge, model, _, _ = loaded
    conditioning, plan = _guided_setup()
    if make == "euler_with_churn":
        sampler = comfy.samplers.KSAMPLER(comfy.k_diffusion.sampling.sample_euler, {"s_churn": 1.0})
    else:
        sampler = comfy.samplers.sampler_object(make)
    guidance = _FixedGuidance()
    guider = bridge.sampling.PrivacyGuider(model, conditioning, lambda: guidance)
    with torch.inference_mode(), pytest.raises(ValueError) as err:
        bridge.sampling.run_guider(guider, torch.zeros_like(plan.x), torch.zeros_like(plan.x), sampler,
                                   plan.sigmas.float(), seed=0, preview_steps=1)
    message = str(err.value)
    assert "'euler'" in message and "'ddim'" in message and "KSamplerSelect" in message
    used = {"dpmpp_2m": "'dpmpp_2m'", "euler_ancestral": "'euler_ancestral'",
            "euler_with_churn": "'euler with s_churn=1'"}
    assert f"this run uses {used[make]}" in message
    assert guidance.calls == 0


def test_guider_schedule_lookup(loaded):
    """The GUIDER reads σ' from the run's schedule by σ's exact index and refuses σ values off the schedule."""
    bridge = loaded[0]
    schedule = core_sampling.host_sigmas(torch.tensor([14.6, 3.1, 0.7, 0.0]))
    assert bridge.sampling.step_index(schedule, float(torch.tensor(3.1))) == 1
    assert bridge.sampling.step_index(schedule, 0.7) == 2
    for off in (2.0, 0.0):  # between two steps; the final σ, where no step starts
        with pytest.raises(ValueError, match="not a step of its schedule"):
            bridge.sampling.step_index(schedule, off)
    with pytest.raises(ValueError, match="strictly descending"):
        core_sampling.host_sigmas(torch.tensor([3.0, 3.0, 0.0]))
    assert bridge.sampling.x0_shift_factor(1.0, 2.0, 0.0) == -1.0  # last step to σ' = 0: x' = x̂₀
