"""Same-math speed-ups (core/speed.py and their use in MSI, inversion and sampling), each against its reference
path on the CPU with the same seeds: checkpointing chosen by memory, timesteps batched per MSI step, the fused
optimiser, constants made once, no host reads inside loops, and the switches that only act on CUDA (autocast,
compiled UNet step), whose decision logic is driven here without a GPU."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core import msi as msi_module
from core import speed
from core.diffusers_backend import DiffusersBackend
from core.energies import BackgroundPaste, IdentityGuidance, mask_to_latent
from core.msi import MSIOptions, recipe, train_msi
from core.sampling import SamplingOptions, ddim_invert, protect
from core.schedules import EmbeddingSchedule
from tests.support import tiny_diffusers as td
from tests.support.syncs import count_host_reads
from tests.support.toy_models import ToyBackend, ToyRecognizer, toy_crop, toy_face_image


@pytest.fixture(scope="module")
def sd_backend(tmp_path_factory):
    """The tiny SD1.5-shaped checkpoint (real diffusers UNet with cross-attention, CLIP text, TAESD)."""
    tok = td.require_sd1_tokenizer_dir()
    path = td.tiny_checkpoint(str(tmp_path_factory.getbasetemp()), 0, vae="taesd", text_layers=2)
    return DiffusersBackend.from_single_file(path, tokenizer_dir=tok)


@pytest.fixture(scope="module")
def toy():
    backend = ToyBackend(seed=0)
    rec = ToyRecognizer(seed=1)
    with torch.no_grad():
        z0 = backend.encode_image(toy_face_image(0))
        conds = backend.encode_stage_tokens(0.5 * torch.randn(10, backend.token_dim,
                                                              generator=torch.Generator().manual_seed(5)))
        src = rec(toy_crop(backend.decode_latent(z0)))
    return SimpleNamespace(backend=backend, rec=rec, z0=z0, conds=conds, null=backend.null_conditioning(), src=src)


# ------------------------------------------------------------------------------------------ recipes
def test_recipes_keep_the_papers_timesteps_seen():
    paper = MSIOptions.preset("faithful", "paper")
    assert (paper.steps, paper.lr, paper.timesteps_per_step, paper.autocast_dtype) == (6100, 1e-4, 1, None)
    assert MSIOptions.preset("lite", "paper").timesteps_seen == 1500
    default = MSIOptions()
    assert default == MSIOptions.preset("faithful") and default.timesteps_per_step == 4
    assert (default.steps, default.timesteps_seen) == (1525, 6100) and default.lr == pytest.approx(2e-4)
    lite = MSIOptions.preset("lite")
    assert (lite.steps, lite.timesteps_seen, lite.lr) == (375, 1500, pytest.approx(1e-2))
    # another batch re-derives steps and lr (√k rule) unless they are given
    k8 = MSIOptions.preset("lite", timesteps_per_step=8)
    assert (k8.steps, k8.lr) == (188, pytest.approx(5e-3 * math.sqrt(8)))
    assert MSIOptions.preset("lite", timesteps_per_step=8, steps=3, lr=0.1).steps == 3
    fast = MSIOptions.preset("lite", "fast")
    assert fast.timesteps_seen == 480 and fast.lr_schedule == "cosine" and fast.timesteps_per_step == 8
    with pytest.raises(ValueError, match="speed"):
        recipe("lite", "turbo")


def test_cosine_schedule_decays_from_lr_to_its_floor():
    options = MSIOptions.preset("lite", "fast", steps=11, lr=1.0)
    rates = [options.learning_rate(i) for i in range(11)]
    assert rates[0] == pytest.approx(1.0) and rates[-1] == pytest.approx(msi_module.COSINE_FLOOR)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert MSIOptions.preset("lite").learning_rate(7) == MSIOptions.preset("lite").lr


# ------------------------------------------------------------------------------------------ checkpointing
def test_checkpointing_decision():
    assert speed.decide_checkpointing(True, free_bytes=10**12, activation_bytes=1)[0] is True
    assert speed.decide_checkpointing(False, free_bytes=0, activation_bytes=10**12)[0] is False
    on, why = speed.decide_checkpointing("auto", free_bytes=3 * 2**30, activation_bytes=2 * 2**30)
    assert on and "auto" in why and "2048 MiB" in why
    off, _ = speed.decide_checkpointing("auto", free_bytes=5 * 2**30, activation_bytes=2 * 2**30)
    assert not off
    assert speed.decide_checkpointing("auto", free_bytes=0, activation_bytes=1)[0]  # unknown memory: save it
    with pytest.raises(ValueError):
        speed.decide_checkpointing("maybe", free_bytes=1, activation_bytes=1)


def test_saved_activation_bytes_counts_what_backward_keeps():
    x = torch.randn(1000, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(1000))
    # sin saves its input x, exp its output; the product saves that output again (counted once) and the
    # parameter (not counted: it exists anyway)
    measured = speed.saved_activation_bytes(lambda: (x.sin().exp() * weight).sum())
    assert measured == 2 * 1000 * 4
    assert speed.saved_activation_bytes(lambda: torch.no_grad()(lambda: x.sin())()) == 0


def test_checkpointing_on_and_off_train_the_same_tokens(sd_backend):
    image = toy_face_image(0)
    runs = {flag: train_msi(sd_backend, image, MSIOptions.preset("lite", steps=3, grad_checkpointing=flag))
            for flag in (True, False)}
    assert runs[True].config["grad_checkpointing"] and not runs[False].config["grad_checkpointing"]
    torch.testing.assert_close(runs[True].stage_tokens, runs[False].stage_tokens, rtol=1e-5, atol=1e-6)
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-5)
    assert not sd_backend.gradient_checkpointing  # restored


@pytest.mark.parametrize("free,expected", [(10**15, False), (1, True)])
def test_auto_checkpointing_follows_free_memory(sd_backend, monkeypatch, free, expected):
    monkeypatch.setattr(msi_module, "backend_free_bytes", lambda backend: free)
    toggles = []
    original = sd_backend.enable_gradient_checkpointing
    monkeypatch.setattr(sd_backend, "enable_gradient_checkpointing", lambda on=True: (toggles.append(on), original(on)))
    r = train_msi(sd_backend, toy_face_image(0), MSIOptions.preset("lite", steps=2))
    assert r.config["grad_checkpointing"] is expected and r.config["activation_bytes"] > 0
    assert toggles == ([True, False] if expected else [])
    assert "auto" in r.config["grad_checkpointing_reason"]


def test_backends_without_checkpointing_skip_the_probe(toy):
    r = train_msi(toy.backend, toy_face_image(0), MSIOptions.preset("lite", steps=1))
    assert r.config["grad_checkpointing"] is False and "unavailable" in r.config["grad_checkpointing_reason"]


# ------------------------------------------------------------------------------------------ batching
def test_one_batched_step_has_the_mean_gradient_of_its_timesteps(sd_backend):
    """k timesteps in one UNet call: the loss is the mean of the k batch-1 losses, so its gradient w.r.t. the
    conditioning is the mean of theirs (GroupNorm and attention act per sample)."""
    gen = torch.Generator().manual_seed(0)
    z0 = sd_backend.encode_image(toy_face_image(0)).expand(4, -1, -1, -1)
    eps = torch.randn(z0.shape, generator=gen)
    t = torch.tensor([5, 250, 640, 990])
    base = 0.3 * torch.randn(1, 77, 768, generator=gen)

    def grad(index):
        cond = base.clone().requires_grad_(True)
        z_t = msi_module.q_sample(z0[index], eps[index], t[index])
        loss = F.mse_loss(sd_backend.predict_eps(z_t, t[index], cond.expand(len(index), -1, -1)), eps[index])
        return torch.autograd.grad(loss, cond)[0]

    batched = grad([0, 1, 2, 3])
    singles = torch.stack([grad([i]) for i in range(4)]).mean(0)
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-7)


def test_fused_adamw_takes_the_same_steps():
    """The fused AdamW MSI uses on CUDA against the default implementation, on the CPU with the same gradients."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(10, 32, generator=gen)
    grads = [torch.randn(10, 32, generator=gen) for _ in range(5)]
    out = []
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, **({"fused": True} if fused else {}))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)


def test_msi_reuses_its_source_latent(sd_backend):
    image = toy_face_image(0)
    r = train_msi(sd_backend, image, MSIOptions.preset("lite", steps=1))
    torch.testing.assert_close(r.source_latent, sd_backend.encode_image(image), rtol=1e-5, atol=1e-6)
    assert r.config["timesteps_seen"] == 4


# ------------------------------------------------------------------------------------------ host reads
def _msi_reads(backend, steps):
    with count_host_reads() as reads:
        train_msi(backend, toy_face_image(0), MSIOptions.preset("lite", steps=steps, loss_sync_every=10**6))
    return reads


@pytest.mark.parametrize("which", ["toy", "diffusers"])
def test_msi_loop_reads_nothing_per_step(toy, sd_backend, which):
    backend = toy.backend if which == "toy" else sd_backend
    short, long = _msi_reads(backend, 2), _msi_reads(backend, 5)
    assert long.total == short.total, (short, long)  # reads before and after the loop only
    # and the loss is read every loss_sync_every steps, nothing else
    with count_host_reads() as reads:
        train_msi(backend, toy_face_image(0), MSIOptions.preset("lite", steps=6, loss_sync_every=2))
    assert reads.total - short.total == 2, reads


def test_inversion_and_guided_sampling_read_nothing_per_step(toy):
    def invert(n):
        with count_host_reads() as reads:
            ddim_invert(toy.backend, toy.z0, toy.conds, n)
        return reads

    invert(1)  # fills the host tables (once per process)
    assert invert(3).total == invert(9).total == 0, invert(9)

    mask = mask_to_latent(torch.ones(64, 64), tuple(toy.z0.shape[-2:]))

    def sample(strength, target):
        guidance = IdentityGuidance(toy.backend.decode_latent, toy.rec, toy_crop, toy.src, target=target,
                                    max_grad_norm=1.0)
        with count_host_reads() as reads:
            protect(toy.backend, toy.z0, toy.conds, toy.null, guidance, schedule=EmbeddingSchedule.preset("anonymize"),
                    options=SamplingOptions(20, strength, 2, 0), background=BackgroundPaste(mask, toy.z0),
                    progress=lambda *a: None)
        return reads

    for target in ("x0", "xt"):
        short, long = sample(0.2, target), sample(0.5, target)  # 4 and 10 steps
        assert short.total == long.total, (target, short, long)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: torch.cuda.set_sync_debug_mode needs CUDA "
                    "(the CPU-side count above covers the pack's own reads)")
def test_cuda_loops_do_not_synchronise():  # pragma: no cover - runs on a GPU machine only
    backend = ToyBackend(seed=0, device="cuda")
    rec = ToyRecognizer(seed=1, device="cuda")
    z0 = backend.encode_image(toy_face_image(0).cuda()).detach()
    conds = backend.encode_stage_tokens(torch.zeros(10, backend.token_dim, device="cuda")).detach()
    src = rec(toy_crop(backend.decode_latent(z0))).detach()
    guidance = IdentityGuidance(backend.decode_latent, rec, toy_crop, src)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ddim_invert(backend, z0, conds, 5)
        protect(backend, z0, conds, backend.null_conditioning().detach(), guidance,
                schedule=EmbeddingSchedule.preset("anonymize"), options=SamplingOptions(20, 0.5, 2, 0))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------------------ constants once
def test_guidance_clones_the_source_embedding_once(toy):
    guidance = IdentityGuidance(toy.backend.decode_latent, toy.rec, toy_crop, toy.src)
    g1, e1 = guidance.gradient(toy.z0)
    cached = dict(guidance._references)
    g2, e2 = guidance.gradient(toy.z0)
    assert len(cached) == 1 and all(guidance._references[k] is v for k, v in cached.items())
    assert torch.equal(g1, g2) and torch.equal(e1, e2)
    fresh = IdentityGuidance(toy.backend.decode_latent, toy.rec, toy_crop, toy.src.clone())
    torch.testing.assert_close(fresh.gradient(toy.z0)[0], g1, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ CUDA-only switches
def test_autocast_auto_is_bf16_on_cuda_with_bf16_only(monkeypatch):
    assert speed.resolve_autocast_dtype("auto", "cpu") is None
    assert speed.resolve_autocast_dtype(torch.float16, "cpu") is torch.float16
    assert speed.resolve_autocast_dtype(None, "cuda") is None
    monkeypatch.setattr(speed, "bf16_supported", lambda device: torch.device(device).type == "cuda")
    assert speed.resolve_autocast_dtype("auto", "cuda") is torch.bfloat16
    assert speed.resolve_autocast_dtype("auto", "cpu") is None
    with pytest.raises(ValueError):
        speed.resolve_autocast_dtype("fp8", "cuda")
    assert speed.resolve_compute_dtype("auto", "cpu") is torch.float32


def test_msi_autocast_auto_stays_off_on_a_cpu_and_for_half_precision_backends(toy, monkeypatch):
    r = train_msi(toy.backend, toy_face_image(0), MSIOptions.preset("lite", steps=1))
    assert r.config["autocast_dtype"] is None
    # even where bf16 would be chosen, a backend that does not compute in float32 is left alone
    monkeypatch.setattr(msi_module, "resolve_autocast_dtype", lambda setting, device: torch.bfloat16)
    half = SimpleNamespace(**{name: getattr(toy.backend, name) for name in (
        "device", "token_dim", "predict_eps", "encode_image", "encode_stage_tokens", "token_embedding")},
        dtype=torch.float16)
    assert train_msi(half, toy_face_image(0), MSIOptions.preset("lite", steps=1)).config["autocast_dtype"] is None
    assert train_msi(toy.backend, toy_face_image(0), MSIOptions.preset("lite", steps=1)).config["autocast_dtype"] \
        == "torch.bfloat16"


class _Doubler(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def test_compiled_step_is_off_on_a_cpu_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"):
        step = speed.GuardedCompile(_Doubler(), "cpu", "auto", compile_fn=lambda *a, **k: pytest.fail("compiled"))
    assert not step.active and "CUDA" in step.reason
    assert [r.getMessage() for r in caplog.records] == [f"[Diff-Privacy] compiled UNet step {step.reason}"]
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert "explicitly" in speed.GuardedCompile(_Doubler(), "cuda", "off").reason
    with pytest.raises(ValueError):
        speed.GuardedCompile(_Doubler(), "cuda", "yes")


def test_compiled_step_switch_logic_on_a_pretend_cuda_device(caplog):
    calls = []

    def compile_ok(module, **kwargs):
        calls.append(kwargs)
        return lambda x: module(x) + 0.0

    step = speed.GuardedCompile(_Doubler(), "cuda", "on", compile_fn=compile_ok)
    assert step.active and calls == [{"mode": speed.COMPILE_MODE, "dynamic": False}]
    x = torch.ones(3)
    out = step(x)
    assert torch.equal(out, 2 * x) and out is not step(x)  # outputs are private copies

    def compile_breaks_at_run(module, **kwargs):
        def run(x):
            raise RuntimeError("inductor: no kernel")
        return run

    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"):
        step = speed.GuardedCompile(_Doubler(), "cuda", "auto", compile_fn=compile_breaks_at_run)
        assert torch.equal(step(x), 2 * x) and torch.equal(step(x), 2 * x)  # eager from the first failure on
    assert not step.active and "no kernel" in step.reason
    assert sum("running eagerly" in r.getMessage() for r in caplog.records) == 1

    def compile_refuses(module, **kwargs):
        raise RuntimeError("no triton")

    step = speed.GuardedCompile(_Doubler(), "cuda", "on", compile_fn=compile_refuses)
    assert not step.active and "no triton" in step.reason and torch.equal(step(x), 2 * x)


def test_activation_probe_runs_compiled_steps_eagerly():
    calls = []

    def compile_ok(module, **kwargs):
        return lambda x: (calls.append(1), module(x))[1]

    step = speed.GuardedCompile(_Doubler(), "cuda", "on", compile_fn=compile_ok)
    x = torch.ones(4, requires_grad=True)
    assert speed.saved_activation_bytes(lambda: step(x).sin()) == 4 * 4  # eager: sin saves 2·x
    assert calls == [] and step.active
    step(x)
    assert calls == [1]


def test_compile_respects_dp_compile_off(monkeypatch):
    monkeypatch.setenv("DP_COMPILE", "0")
    assert speed.compile_available() == (False, "DP_COMPILE=0 is set")
    assert not speed.GuardedCompile(_Doubler(), "cuda", "on").active


def test_diffusers_backend_compile_setting_is_guarded_on_a_cpu(sd_backend):
    step = sd_backend._unet_call
    assert not step.active and step.reason == "off (set explicitly)"


def test_placeholder_constants_are_made_once_and_give_the_same_conditioning(sd_backend):
    conditioner = sd_backend._placeholder
    tokens = 0.1 * torch.randn(3, 768, generator=torch.Generator().manual_seed(4))
    first, second = conditioner(tokens), conditioner(tokens)
    assert len(conditioner._constants) == 1 and torch.equal(first, second)
    with torch.no_grad():  # the reference: write the tokens into the prompt's embeddings directly
        embeds = conditioner.encoder.token_embedding(conditioner.input_ids).expand(3, -1, -1).clone()
        embeds[:, conditioner.position] = tokens
        torch.testing.assert_close(first, conditioner.encoder.forward_embeddings(embeds), rtol=1e-6, atol=1e-6)


def test_fixed_box_crop_is_planned_once_and_equals_the_planned_per_call_crop():
    from core import recognizers

    images = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(5), requires_grad=True)
    box = (10.5, 12.0, 70.25, 80.0)
    recognizers._fixed_box_plan.cache_clear()
    cached = recognizers.box_crop(images, box, 32, margin=0.1)
    again = recognizers.box_crop(images, box, 32, margin=0.1)
    assert recognizers._fixed_box_plan.cache_info().hits == 1
    per_call = recognizers.box_crop(images, torch.tensor(box), 32, margin=0.1)  # a tensor box: planned each call
    torch.testing.assert_close(cached, per_call, rtol=0, atol=0)
    assert torch.equal(cached, again)
    (grad,) = torch.autograd.grad(cached.sum(), images)
    assert grad.abs().sum() > 0
