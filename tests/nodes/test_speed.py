"""Speed-ups of the ComfyUI bridge against its reference paths, in a real ComfyUI on the CPU: the guidance
decoder is a copy of the VAE's decoder only, MSI Invert's no-grad inversion does not run through the
trainable (weight-wrapping) UNet, the trainable UNet does not copy weights ComfyUI already copied, and the
guided loop inside ComfyUI's sampler stack reads nothing back per step."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.support.syncs import count_host_reads
from tests.support.toy_models import ToyRecognizer, toy_crop

pytestmark = pytest.mark.comfyui


def _pack(comfy_inprocess):
    return comfy_inprocess.node_classes["DiffPrivacy_PrivacySampler"].__module__.split(".nodes.", 1)[0]


def _load(path):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]


@pytest.fixture(scope="module")
def pack(comfy_inprocess):
    root = _pack(comfy_inprocess)
    return lambda name: sys.modules[f"{root}.{name}"]


@pytest.mark.parametrize("vae", ["taesd", "kl"])
def test_guidance_decoder_copies_the_decoder_only(pack, make_tiny_checkpoint, vae):
    autograd, models = pack("nodes.comfy.autograd"), pack("nodes.comfy.models")
    model, _, comfy_vae = _load(make_tiny_checkpoint(vae=vae))
    original = comfy_vae.first_stage_model
    before = {name for name, _ in original.named_parameters()}
    decoder = autograd.DifferentiableDecoder(comfy_vae, model)
    full = autograd.private_copy(original, models.torch_device(), decoder.dtype)  # the reference: whole VAE
    kept = {name for name, _ in decoder.module.named_parameters()}
    assert kept and not any(name.split(".")[0] in autograd.ENCODER_PARTS for name in kept)
    assert kept < before and {name for name, _ in original.named_parameters()} == before  # original untouched
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = full.decode(models.unscale_latent(model, z.clone()).to(decoder.dtype)).float()
    leaf = z.clone().requires_grad_(True)
    image = decoder(leaf)
    torch.testing.assert_close(image.detach(), expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(image.square().mean(), leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.fixture(scope="module")
def counted(pack, tiny_checkpoint):
    """A trainable ComfyBackend whose weight wrapper records, per call, whether it copied the weight."""
    autograd, backend_module = pack("nodes.comfy.autograd"), pack("nodes.comfy.backend")
    real = autograd._clone_weight
    calls = []

    def spy(w):
        out = real(w)
        calls.append(out is not w)
        return out

    autograd._clone_weight = spy  # grad_ready_model registers whatever the name holds when it runs
    try:
        model, clip, vae = _load(tiny_checkpoint)
        with torch.inference_mode():
            trainable = backend_module.ComfyBackend(model, clip, vae, trainable=True)
            plain = backend_module.ComfyBackend(model, clip, vae)
    finally:
        autograd._clone_weight = real
    return trainable, plain, calls


def test_no_grad_inversion_bypasses_the_trainable_unet(pack, counted):
    trainable, plain, calls = counted
    sampling = pack("core.sampling")
    g = torch.Generator().manual_seed(1)
    z0, conds = torch.randn(1, 4, 8, 8, generator=g), 0.3 * torch.randn(10, 77, 768, generator=g)
    with torch.inference_mode():
        calls.clear()
        z_trainable = sampling.ddim_invert(trainable, z0, conds, 4)
        assert calls == []  # the clone's weight wrappers never ran
        z_plain = sampling.ddim_invert(plain, z0, conds, 4)
    torch.testing.assert_close(z_trainable, z_plain, rtol=0, atol=0)


def test_trainable_unet_copies_no_weight_twice_and_keeps_the_gradient(pack, counted):
    trainable, _, calls = counted
    autograd = pack("nodes.comfy.autograd")
    with torch.inference_mode():
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def grad():
        with torch.inference_mode(False):
            tokens = (0.02 * torch.ones(1, 768)).requires_grad_(True)
            eps = trainable.predict_eps(z.clone(), torch.tensor([300]), trainable.encode_stage_tokens(tokens))
            return torch.autograd.grad(eps.square().mean(), tokens)[0]

    calls.clear()
    reference_clone = autograd._clone_weight
    ours = grad()
    assert calls and not any(calls)  # every weight reached its op once: as ComfyUI's own private copy
    # the reference path: a clone of every weight, as before
    wrapped = [m for m in trainable.model.model.modules() if getattr(m, "weight_function", None)]
    saved = [(m, list(m.weight_function), list(m.bias_function)) for m in wrapped]
    try:
        for m in wrapped:
            m.weight_function = [lambda w: w.clone()]
            m.bias_function = [lambda b: b.clone()] if m.bias_function else []
        reference = grad()
    finally:
        for m, wf, bf in saved:
            m.weight_function, m.bias_function = wf, bf
    assert autograd._clone_weight is reference_clone
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_guided_loop_in_comfy_reads_nothing_per_step(pack, tiny_checkpoint):
    sampling, energies = pack("core.sampling"), pack("core.energies")
    bridge_sampling, autograd = pack("nodes.comfy.sampling"), pack("nodes.comfy.autograd")
    scheduler, types, keys = pack("nodes.embedding_scheduler"), pack("nodes.types"), pack("core.keys")
    schedules = pack("core.schedules")
    model, clip, vae = _load(tiny_checkpoint)
    g = torch.Generator().manual_seed(3)
    meta = keys.KeyMetadata(model_fingerprint="w1:x", ddim_steps=4, schedule="recover", msi_mode="lite",
                            image_size=(64, 64))
    embeds = types.PrivacyEmbeds(torch.randn(10, 768, generator=g), 0.3 * torch.randn(10, 77, 768, generator=g), meta)
    with torch.inference_mode():
        null = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        conditioning = scheduler.scheduled_conditioning(embeds, null, schedules.EmbeddingSchedule.preset("anonymize"))
        z0 = torch.randn(1, 4, 8, 8, generator=g)
        recognizer = ToyRecognizer(seed=1)
        decoder = autograd.DifferentiableDecoder(vae, model)
        source = recognizer(toy_crop(decoder(z0)))

    def run(strength):
        guidance = energies.IdentityGuidance(decoder, recognizer, toy_crop, source)
        plan = sampling.protection_plan(z0, sampling.SamplingOptions(20, strength, 2, 0))
        with torch.inference_mode(), count_host_reads() as reads:
            bridge_sampling.run_plan_in_comfy(model, conditioning, plan, 0, guidance=guidance)
        return reads

    run(0.1)  # warm-up: loads, caches
    short, long = run(0.2), run(0.5)  # 4 and 10 guided steps
    assert short.total == long.total, (short, long)


def test_scheduled_conditioning_lives_on_the_compute_device(pack, monkeypatch):
    """Embedding Scheduler puts its tensors on the compute device once, so ComfyUI's per-step cond_cat(…).to(device)
    copies nothing (checked with the meta device standing in for a GPU)."""
    scheduler, types, keys, schedules = (pack("nodes.embedding_scheduler"), pack("nodes.types"), pack("core.keys"),
                                         pack("core.schedules"))
    monkeypatch.setattr(scheduler, "torch_device", lambda: torch.device("meta"))
    meta = keys.KeyMetadata(model_fingerprint="w1:x", ddim_steps=4, schedule="recover", msi_mode="lite",
                            image_size=(64, 64))
    embeds = types.PrivacyEmbeds(torch.zeros(10, 768), torch.randn(10, 77, 768), meta)
    null = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    out = scheduler.scheduled_conditioning(embeds, null, schedules.EmbeddingSchedule.preset("anonymize"))
    assert len(out) > 2
    for tensor, extras in out:
        assert tensor.device.type == "meta" and extras["pooled_output"].device.type == "meta"
    assert null[0][0].device.type == "cpu" and embeds.stage_conds.device.type == "cpu"  # inputs untouched


def test_msi_and_inversion_replay_cuda_graphs_inside_comfyui_with_the_eager_results(pack, tiny_checkpoint):
    """MSI Invert's two loops on ComfyUI's MODEL (trainable bridge, inference mode as the executor runs it)
    with the step replayed through graphs (CPU stand-in captures) equal the eager loops, same seeds."""
    from core import msi as core_msi
    from core import sampling as core_sampling
    from tests.support.fake_graphs import FakeGraphOps

    backend_module, graphs = pack("nodes.comfy.backend"), pack("core.cuda_graphs")
    normal_tensors = pack("core.autograd").normal_tensors
    model, clip, vae = _load(tiny_checkpoint)
    with torch.inference_mode():
        backend = backend_module.ComfyBackend(model, clip, vae, trainable=True)
    if backend.device.type == "cpu":
        assert backend.cuda_graphs_status.startswith("off: CUDA graphs need a CUDA device")
    image = torch.linspace(-1, 1, 3 * 64 * 64).view(1, 3, 64, 64).to(backend.device)
    options = core_msi.MSIOptions.preset("lite", steps=4, timesteps_per_step=2, seed=5)

    def run():
        with torch.inference_mode():
            with normal_tensors():  # as MSI Invert runs it
                result = core_msi.train_msi(backend, image, options)
            z_T = core_sampling.ddim_invert(backend, result.source_latent, result.stage_conds, 6)
        return result, z_T

    eager = run()
    original, ops = backend._graphs, FakeGraphOps()
    # the backend's own wrapper (its weights, compute dtype and Cancel pass-through) with stand-in captures
    with_ops = backend._graphs = graphs.CudaGraphSteps(
        backend._eps, backend.device, "on", ops=ops, weights=original._weights,
        compute_dtype=original._compute_dtype_given, passthrough=original._passthrough)
    try:
        graphed = run()
        stats = with_ops.stats
        assert ops.captures == 2 and stats.replays >= 5 and stats.drops == 0 and max(stats.verified) < 1e-5
        # Cancel pressed while a step is being captured: ComfyUI's per-op check raises inside the capture, and
        # the exception reaches the node as ComfyUI's own, not as a graph failure
        import comfy.model_management as mm

        def cancel_at_step_one(step, total, info):
            if step == 1:
                mm.interrupt_current_processing(True)

        try:
            with pytest.raises(mm.InterruptProcessingException), torch.inference_mode(), normal_tensors():
                core_msi.train_msi(backend, image, options, progress=cancel_at_step_one)
        finally:
            mm.interrupt_current_processing(False)
        assert ops.captures == 3 and with_ops.failed is None  # raised from inside the third capture
    finally:
        backend._graphs = original
    assert original._passthrough == (mm.InterruptProcessingException,)
    torch.testing.assert_close(graphed[0].stage_conds, eager[0].stage_conds, rtol=0, atol=1e-5)
    torch.testing.assert_close(graphed[1], eager[1], rtol=0, atol=1e-5)
