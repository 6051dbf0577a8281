"""nodes.bridge against the plain-Python core: the same checkpoint gives the same model through ComfyUI and
through the diffusers backend, so keys made in one work in the other."""
from __future__ import annotations

import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def loaded(comfy_inprocess, tiny_checkpoint, comfyui_dir):
    """(bridge module, ComfyBackend, DiffusersBackend) on the tiny checkpoint, loaded as ComfyUI's executor does."""
    import comfy.sd

    from core.diffusers_backend import DiffusersBackend

    bridge = sys.modules[comfy_inprocess.node_classes["DiffPrivacy_PrivacySampler"].__module__.rsplit(".", 1)[0]
                         + ".bridge"]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        comfy_backend = bridge.ComfyBackend(model, clip, vae, trainable=True)
    plain = DiffusersBackend.from_single_file(tiny_checkpoint, tokenizer_dir=comfyui_dir / "comfy" / "sd1_tokenizer")
    return bridge, model, comfy_backend, plain


def test_fingerprint_is_backend_independent(loaded):
    bridge, model, comfy_backend, plain = loaded
    assert bridge.model_fingerprint(model) == plain.model_fingerprint() == comfy_backend.model_fingerprint()


def test_same_noise_prediction_and_conditioning(loaded):
    _, _, comfy_backend, plain = loaded
    g = torch.Generator().manual_seed(3)
    tokens = 0.02 * torch.randn(2, 768, generator=g)
    with torch.inference_mode():
        c_comfy = comfy_backend.encode_stage_tokens(tokens)
        c_plain = plain.encode_stage_tokens(tokens)
        torch.testing.assert_close(c_comfy, c_plain, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(comfy_backend.null_conditioning(), plain.null_conditioning(), atol=2e-3, rtol=2e-3)
        z = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([650, 120])
        torch.testing.assert_close(comfy_backend.predict_eps(z, t, c_plain), plain.predict_eps(z, t, c_plain),
                                   atol=2e-3, rtol=2e-3)


def test_stage_token_gradient_flows_through_comfy_models(loaded):
    """What MSI Invert needs inside ComfyUI: d ε-loss / d token through CLIP and the UNet under inference mode."""
    _, _, comfy_backend, _ = loaded
    with torch.inference_mode():
        z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode(False):
        tokens = (0.02 * torch.randn(1, 768)).requires_grad_(True)
        eps = comfy_backend.predict_eps(z.clone(), torch.tensor([500]), comfy_backend.encode_stage_tokens(tokens))
        (grad,) = torch.autograd.grad(eps.square().mean(), tokens)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_interrupt_stops_msi_and_sampling(loaded):
    """ComfyUI's Cancel (interrupt flag) stops MSI training at the next step and the sampler before its next
    step, through the bridge's check_interrupt."""
    import comfy.model_management as mm

    from core import msi

    bridge, model, comfy_backend, _ = loaded
    sampler_module = sys.modules[bridge.__name__.rsplit(".", 1)[0] + ".privacy_sampler"]
    seen = []

    def progress(step, total, info):
        seen.append(step)
        if step == 2:
            mm.interrupt_current_processing(True)

    image = torch.zeros(1, 3, 64, 64)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            msi.train_msi(comfy_backend, image, mode="lite", steps=20, progress=progress, cancel=bridge.check_interrupt)
        assert max(seen) == 2  # stopped at the first check after the flag was set
        with torch.inference_mode():
            z0 = torch.zeros(1, 4, 8, 8)
            from core import sampling
            x, sigmas, timesteps = sampling.img2img_start(z0, 10, 0.6, 1, 0)
            conditioning = [[torch.zeros(1, 77, 768), {}]]
            mm.interrupt_current_processing(True)
            with pytest.raises(mm.InterruptProcessingException):
                sampler_module.sample_in_comfy(model, conditioning, x, sigmas, timesteps, 0)
    finally:
        mm.interrupt_current_processing(False)
