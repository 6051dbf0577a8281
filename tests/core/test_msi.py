"""MSI inversion: CLIP preprocessing (correct and the released uint8 quirk), the two MSI modules, training."""
from __future__ import annotations

import math

import pytest
import torch

from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend
from core.errors import CancelledError, InvalidImageError
from core.msi import (
    CLIP_MEAN,
    CLIP_STD,
    MSIFaithful,
    MSILite,
    MSIOptions,
    clip_preprocess,
    msi_objective,
    pooled_clip_features,
    train_msi,
    uint8_cast_quirk,
)
from tests.support import tiny_diffusers as td
from tests.support.released_msi import dead_released_parameter_count, released_parameter_count
from tests.support.toy_models import ToyBackend, toy_face_image

VISION_WIDTH = 32


@pytest.fixture(scope="module")
def vision():
    return ClipVisionEncoder.from_config(td.tiny_vision_config(width=VISION_WIDTH), seed=0)


@pytest.fixture()
def toy():
    return ToyBackend(seed=0)


@pytest.fixture(scope="module")
def image():
    return toy_face_image(0)


def normalized(value):
    return torch.tensor([(value - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])


# ------------------------------------------------------------------------------------------- preprocessing
def test_uint8_quirk_mapping():
    x = torch.tensor([-1.0, -0.999, -0.5, 0.0, 0.3, 0.999, 1.0])
    assert uint8_cast_quirk(x).tolist() == [255.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_clip_preprocess_shapes_and_values():
    out = clip_preprocess(torch.zeros(2, 3, 64, 96))
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    # correct: [−1,1] → [0,1] then CLIP mean/std (a constant survives resize/crop exactly)
    torch.testing.assert_close(out[0, :, 100, 100], normalized(0.5))
    q = clip_preprocess(torch.full((1, 3, 64, 64), 0.3), uint8_quirk=True)
    torch.testing.assert_close(q[0, :, 5, 7], normalized(0.0))
    q = clip_preprocess(torch.full((1, 3, 64, 64), -1.0), uint8_quirk=True)
    torch.testing.assert_close(q[0, :, 5, 7], normalized(1.0))  # −1 wraps to 255
    q = clip_preprocess(torch.full((1, 3, 64, 64), 1.0), uint8_quirk=True)
    torch.testing.assert_close(q[0, :, 5, 7], normalized(1 / 255))
    with pytest.raises(InvalidImageError):
        clip_preprocess(torch.zeros(1, 4, 64, 64))


def test_quirk_features_ignore_the_face(vision, image):
    faces = 0.95 * torch.cat([image, toy_face_image(1)])  # strictly inside (−1, 1)
    correct = pooled_clip_features(vision, faces)
    quirk = pooled_clip_features(vision, faces, uint8_quirk=True)
    assert correct.shape == (2, 5, VISION_WIDTH)
    assert (correct[0] - correct[1]).abs().max() > 1e-3  # the correct pipeline sees the images
    torch.testing.assert_close(quirk[0], quirk[1])  # with no exact ±1 pixels, both collapse to black
    assert (quirk[0] - correct[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- modules
def test_faithful_stage_uses_level_floor_s_over_2():
    msi = MSIFaithful(vision_dim=16, token_dim=24, head_dim=20).eval()
    pooled = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    base = msi(pooled)
    assert base.shape == (10, 24)
    for level in range(5):
        bumped = pooled.clone()
        bumped[level] += 1.0
        changed = (msi(bumped) - base).abs().amax(dim=1) > 1e-6
        assert changed.tolist() == [s // 2 == level for s in range(10)]
    torch.testing.assert_close(msi.tokens_for_stages(pooled, [7, 2]), base[[7, 2]])


def test_faithful_projection_is_scale_invariant():
    # the L2 normalisation after the projection makes a feature's scale irrelevant
    msi = MSIFaithful(vision_dim=16, token_dim=24, head_dim=20).eval()
    pooled = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(msi(3.0 * pooled), msi(pooled))


def test_eval_mode_tokens_are_deterministic():
    msi = MSIFaithful(vision_dim=16, token_dim=64, head_dim=32)
    pooled = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    msi.train()
    torch.manual_seed(0)
    assert not torch.equal(msi(pooled), msi(pooled))  # the released dropouts are active in training
    msi.eval()
    torch.testing.assert_close(msi(pooled), msi(pooled), rtol=0, atol=0)


def test_faithful_init_is_seeded():
    a, b = MSIFaithful(16, 24, seed=5), MSIFaithful(16, 24, seed=5)
    c = MSIFaithful(16, 24, seed=6)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    # PyTorch's default scales: U(±1/√fan_in) weights, N(0,1) stage vectors
    assert a.projections[0][0].weight.abs().max() <= 1 / math.sqrt(16)
    assert 0.8 < a.stage_modulation.weight.std() < 1.2


def test_faithful_parameter_count_full_sd_dims():
    released = released_parameter_count(1024, 768)
    assert abs(released - 10.6e6) / 10.6e6 < 0.05  # docs/method.md §2.2: ≈ 10.6 M
    ours = sum(p.numel() for p in MSIFaithful(1024, 768).parameters())
    # the functional equivalent drops exactly the released parameters that never reach the output
    assert ours == released - dead_released_parameter_count(768)
    assert ours == 5 * (1024 * 768 + 768 * 768) + 10 * 768 + 768 * 512 + (512 * 768 + 768) + (768 * 768 + 768)


def test_lite_starts_from_the_face_embedding(toy):
    lite = MSILite(toy.token_embedding("face"))
    assert lite().shape == (10, toy.token_dim)
    torch.testing.assert_close(lite(), toy.token_embedding("face").expand(10, -1))
    r = train_msi(toy, toy_face_image(0), MSIOptions.preset("lite", steps=0))
    torch.testing.assert_close(r.stage_tokens, toy.token_embedding("face").expand(10, -1))


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode,lr", [("lite", 5e-2), ("faithful", 3e-3)])
def test_training_lowers_the_objective(toy, vision, image, mode, lr):
    z0 = toy.encode_image(image)
    start = train_msi(toy, image, MSIOptions.preset(mode, steps=0), vision=vision)
    result = train_msi(toy, image, MSIOptions.preset(mode, steps=120, lr=lr, timesteps_per_step=4), vision=vision)
    before = msi_objective(toy, z0, start.stage_conds, num_timesteps=64, seed=1)
    after = msi_objective(toy, z0, result.stage_conds, num_timesteps=64, seed=1)
    assert after < 0.95 * before, (before, after)
    assert result.mode == mode and result.steps == 120 and len(result.losses) == 120
    assert result.stage_tokens.shape == (10, toy.token_dim)
    assert result.stage_conds.shape == (10, 77, toy.token_dim)
    # the conditionings are the (eval-mode) tokens run through the text encoder
    with torch.no_grad():
        torch.testing.assert_close(result.stage_conds, toy.encode_stage_tokens(result.stage_tokens))


def test_training_is_deterministic_per_seed(toy, vision, image):
    def fit(seed):
        return train_msi(toy, image, MSIOptions.preset("faithful", steps=6, lr=1e-3, seed=seed), vision=vision)
    a, b = fit(3), fit(3)
    assert a.losses == b.losses
    torch.testing.assert_close(a.stage_tokens, b.stage_tokens, rtol=0, atol=0)
    c = fit(4)
    assert c.losses != a.losses


def test_timesteps_per_step_batches_deterministically(toy, vision, image):
    options = MSIOptions.preset("lite", steps=5, lr=1e-2, timesteps_per_step=4)
    a, b = train_msi(toy, image, options), train_msi(toy, image, options)
    assert a.losses == b.losses and all(math.isfinite(v) for v in a.losses)
    torch.testing.assert_close(a.stage_tokens, b.stage_tokens, rtol=0, atol=0)
    single = train_msi(toy, image, MSIOptions.preset("lite", steps=5, lr=1e-2, timesteps_per_step=1))
    assert single.losses != a.losses
    f = train_msi(toy, image, MSIOptions.preset("faithful", steps=3, timesteps_per_step=4), vision=vision)
    assert len(f.losses) == 3 and f.config["timesteps_per_step"] == 4


def test_backend_weights_stay_frozen(toy, image):
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    result = train_msi(toy, image, MSIOptions.preset("lite", steps=4, lr=1e-2))
    after = toy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in toy.parameters())
    assert all(p.requires_grad for p in toy.parameters())  # restored
    assert not torch.equal(result.stage_tokens, toy.token_embedding("face").expand(10, -1))


def test_progress_every_step_and_loss_sync(toy, image):
    calls = []
    r = train_msi(toy, image, MSIOptions.preset("lite", steps=6), progress=lambda s, n, info: calls.append((s, n, dict(info))))
    assert [c[0] for c in calls] == list(range(1, 7)) and all(c[1] == 6 for c in calls)
    assert [c[2]["loss"] for c in calls] == pytest.approx(r.losses)  # CPU: synced every step
    calls.clear()
    r = train_msi(toy, image, MSIOptions.preset("lite", steps=6, loss_sync_every=4), progress=lambda s, n, info: calls.append((s, dict(info))))
    losses = [c[1]["loss"] for c in calls]
    assert all(math.isnan(v) for v in losses[:3])
    assert losses[3] == pytest.approx(sum(r.losses[:4]) / 4) and losses[4] == losses[3]
    assert losses[5] == pytest.approx(sum(r.losses[4:]) / 2)
    assert [c[1]["loss_step"] for c in calls] == [-1, -1, -1, 3, 3, 5]
    assert float(calls[2][1]["loss_tensor"]) == pytest.approx(r.losses[2])


def test_cancel_stops_training(toy, image):
    seen = []

    def cancel():
        if len(seen) == 3:
            raise CancelledError("stop")
        seen.append(1)

    progress = []
    with pytest.raises(CancelledError):
        train_msi(toy, image, MSIOptions.preset("lite", steps=50), cancel=cancel, progress=lambda *a: progress.append(a[0]))
    assert progress == [1, 2, 3]


def test_bf16_autocast_runs(toy, image):
    r = train_msi(toy, image, MSIOptions.preset("lite", steps=3, autocast_dtype=torch.bfloat16))
    assert all(math.isfinite(v) for v in r.losses) and r.stage_tokens.dtype == torch.float32


def test_hflip_uses_both_views(toy, vision, image):
    a = train_msi(toy, image, MSIOptions.preset("faithful", steps=8, lr=1e-3, hflip=True), vision=vision)
    b = train_msi(toy, image, MSIOptions.preset("faithful", steps=8, lr=1e-3, hflip=False), vision=vision)
    assert a.losses != b.losses  # same seed and noise; only the flipped views differ
    mirrored = toy_face_image(0).flip(-1)
    c = train_msi(toy, mirrored, MSIOptions.preset("faithful", steps=8, lr=1e-3, hflip=False), vision=vision)
    assert c.losses != b.losses


def test_bad_inputs(toy, image):
    with pytest.raises(ValueError, match="vision"):
        train_msi(toy, image, MSIOptions.preset("faithful", steps=1))
    with pytest.raises(ValueError, match="mode"):
        MSIOptions.preset("other", steps=1)
    with pytest.raises(ValueError, match="mode"):
        MSIOptions(mode="other")
    for bad in (dict(steps=-1), dict(lr=0.0), dict(lr=float("nan")), dict(timesteps_per_step=0),
                dict(weight_decay=-1.0), dict(loss_sync_every=0)):
        with pytest.raises(ValueError):
            MSIOptions.preset("lite", **bad)
    for bad in (dict(grad_checkpointing="sometimes"), dict(autocast_dtype="fp8"), dict(lr_schedule="step")):
        with pytest.raises(ValueError):
            MSIOptions.preset("lite", **bad)
    with pytest.raises(ValueError, match="speed"):
        MSIOptions.preset("lite", "slow")
    assert MSIOptions() == MSIOptions.preset("faithful")
    with pytest.raises(InvalidImageError):
        train_msi(toy, torch.cat([image, image]), MSIOptions.preset("lite", steps=1))
    with pytest.raises(InvalidImageError):
        train_msi(toy, image * 3, MSIOptions.preset("lite", steps=1))
    with pytest.raises(InvalidImageError):
        train_msi(toy, image[..., :60], MSIOptions.preset("lite", steps=1))


def test_objective_uses_a_fixed_evaluation_set(toy, image):
    z0 = toy.encode_image(image)
    conds = toy.encode_stage_tokens(toy.token_embedding("face").expand(10, -1)).detach()
    a = msi_objective(toy, z0, conds, num_timesteps=16, seed=0)
    assert a == pytest.approx(msi_objective(toy, z0, conds, num_timesteps=16, seed=0, batch_size=5), rel=1e-6)
    assert a != msi_objective(toy, z0, conds, num_timesteps=16, seed=1)
    assert a != msi_objective(toy, z0, torch.zeros_like(conds), num_timesteps=16, seed=0)


# ------------------------------------------------------------------------------------------- real backend
@pytest.fixture(scope="module")
def sd_backend(tmp_path_factory):
    """The tiny SD1.5-shaped checkpoint through DiffusersBackend (real UNet cross-attention and CLIP text)."""
    tok = td.require_sd1_tokenizer_dir()
    path = td.tiny_checkpoint(str(tmp_path_factory.getbasetemp()), 0, vae="taesd", text_layers=2)
    return DiffusersBackend.from_single_file(path, tokenizer_dir=tok)


@pytest.mark.parametrize("mode,lr", [("lite", 5e-2), ("faithful", 1e-3)])
def test_training_against_the_diffusers_backend(sd_backend, vision, mode, lr):
    backend = sd_backend
    unet_before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    image = toy_face_image(0)
    z0 = backend.encode_image(image)
    start = train_msi(backend, image, MSIOptions.preset(mode, steps=0), vision=vision)
    result = train_msi(backend, image, MSIOptions.preset(mode, steps=50, lr=lr, timesteps_per_step=2), vision=vision)
    before = msi_objective(backend, z0, start.stage_conds, num_timesteps=48, seed=1)
    after = msi_objective(backend, z0, result.stage_conds, num_timesteps=48, seed=1)
    assert after < 0.95 * before, (before, after)
    assert result.stage_tokens.shape == (10, 768) and result.stage_conds.shape == (10, 77, 768)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.config["model_fingerprint"] == backend.model_fingerprint()
    assert not backend.gradient_checkpointing  # switched on for training only
    assert all(torch.equal(unet_before[k], v) for k, v in backend.unet.state_dict().items())
