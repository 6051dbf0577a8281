"""All faces of a photo in one batch (issue 11): MSI, inversion, guided sampling, decoding and recovery of N faces
run as one batch through the UNet, text encoder and VAE.

Oracle throughout: the same computation for each face alone, with the same seeds. Batched kernels may round
differently, so equality is to floating-point tolerance; the tests also check that the faces differ from each
other, so that "equal to its own run" cannot pass by every face getting the same result.
"""
from __future__ import annotations

import pytest
import torch

from core import sampling
from core.diffusers_backend import ClipVisionEncoder
from core.msi import MSIOptions, train_msi, train_msi_faces
from core.pipeline import ProtectOptions, faces_label, protect_photo, recover_face, recover_faces
from core.speed import faces_that_fit
from tests.support import tiny_diffusers as td
from tests.support.group_photo import group_photo
from tests.support.toy_models import ToyBackend, toy_face_image

N = 3
TOL = dict(atol=2e-5, rtol=1e-4)
ONE_LEVEL = 1.0 / 255.0  # one level of an 8-bit image


@pytest.fixture(scope="module")
def images():
    return torch.cat([toy_face_image(seed) for seed in range(N)])


@pytest.fixture(scope="module")
def vision():
    return ClipVisionEncoder.from_config(td.tiny_vision_config(width=32), seed=0)


@pytest.mark.parametrize("mode", ["lite", "faithful"])
def test_msi_of_n_faces_in_one_batch_is_each_faces_own_fit(images, vision, mode):
    """Every face's key-E and loss curve equal its own run; faithful includes each face's dropout masks."""
    toy = ToyBackend(seed=0)
    options = MSIOptions.preset(mode, steps=5, lr=1e-2 if mode == "lite" else 1e-3, timesteps_per_step=3, seed=7)
    together = train_msi_faces(toy, images, options, vision=vision if mode == "faithful" else None)
    assert len(together) == N and together[0].config["faces_in_batch"] == N
    for i in range(N):
        alone = train_msi(toy, images[i : i + 1], options, vision=vision if mode == "faithful" else None)
        torch.testing.assert_close(together[i].stage_conds, alone.stage_conds, **TOL)
        torch.testing.assert_close(together[i].stage_tokens, alone.stage_tokens, **TOL)
        torch.testing.assert_close(torch.tensor(together[i].losses), torch.tensor(alone.losses), **TOL)
        torch.testing.assert_close(together[i].source_latent, alone.source_latent, **TOL)
    # the faces were fitted to different images: their keys differ, and each moved from the start
    assert (together[0].stage_conds - together[1].stage_conds).abs().amax() > 1e-3
    start = train_msi(toy, images[:1], MSIOptions.preset(mode, steps=0), vision=vision if mode == "faithful" else None)
    assert (together[0].stage_tokens - start.stage_tokens).abs().amax() > 1e-4


def test_faithful_dropout_is_on_during_training_and_seeded_per_face(images, vision):
    """The dropout masks come from each module's own generator: the same seed, the same masks; the global RNG
    plays no part (a run is the same whatever state it is in)."""
    toy = ToyBackend(seed=0)
    options = MSIOptions.preset("faithful", steps=4, lr=1e-3, seed=1)
    torch.manual_seed(0)
    a = train_msi(toy, images[:1], options, vision=vision)
    torch.manual_seed(12345)
    b = train_msi(toy, images[:1], options, vision=vision)
    assert torch.equal(a.stage_tokens, b.stage_tokens)
    module = a.module
    module.train()
    x = torch.ones(10, module.token_dim)
    module.seed_dropout(torch.Generator().manual_seed(0))
    first = module.head_dropout(x)
    assert (first == 0).any() and not torch.equal(first, module.head_dropout(x))  # masks drawn, fresh each call
    module.eval()
    assert torch.equal(module.head_dropout(x), x)


def test_inversion_and_recovery_of_n_faces_with_their_own_keys(images):
    toy = ToyBackend(seed=1)
    with torch.no_grad():
        z0 = toy.encode_image(images)
    conds = torch.randn(N, 10, 77, toy.token_dim, generator=torch.Generator().manual_seed(3))
    z_T = sampling.ddim_invert(toy, z0, conds, 8)
    recovered = sampling.recover_latent(toy, z_T, conds, 8)
    for i in range(N):
        own = sampling.ddim_invert(toy, z0[i : i + 1], conds[i], 8)
        torch.testing.assert_close(z_T[i : i + 1], own, **TOL)
        torch.testing.assert_close(recovered[i : i + 1], sampling.recover_latent(toy, own, conds[i], 8), **TOL)
    assert (z_T[0] - z_T[1]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="3 faces cannot invert a batch of 2"):
        sampling.ddim_invert(toy, z0[:2], conds, 8)


def test_guided_sampling_of_n_faces_is_each_faces_own_run(images):
    """core.sampling.protect on N faces (sample-major, each face its own key-E, guidance and background) equals
    N one-face runs."""
    from core.energies import BackgroundPaste, IdentityGuidance
    from core.schedules import EmbeddingSchedule
    from tests.support.toy_models import ToyRecognizer, toy_crop

    toy, rec = ToyBackend(seed=2), ToyRecognizer(seed=4)
    with torch.no_grad():
        z0 = toy.encode_image(images)
        src = rec(toy_crop(toy.decode_latent(z0)))
    conds = torch.randn(N, 10, 77, toy.token_dim, generator=torch.Generator().manual_seed(5))
    options = sampling.SamplingOptions(steps=10, strength=0.6, batch_size=2, seed=11)
    mask = torch.zeros(1, 1, *z0.shape[-2:])
    mask[..., :2, :] = 1.0

    def run(z, c, s, n):
        guidance = IdentityGuidance(toy.decode_latent, rec, toy_crop, s, faces=n)
        background = BackgroundPaste(sampling.sample_major(mask.expand(n, -1, -1, -1), 2), sampling.sample_major(z, 2))
        return sampling.protect(toy, z, c, toy.null_conditioning(), guidance, schedule=EmbeddingSchedule.preset("anonymize"),
                                options=options, background=background)

    together = run(z0, conds, src, N)
    assert together.shape[0] == N * 2
    for i in range(N):
        alone = run(z0[i : i + 1], conds[i], src[i : i + 1], 1)
        torch.testing.assert_close(sampling.face_samples(together, N, i), alone, **TOL)
    with pytest.raises(ValueError, match="as many faces"):
        run(z0, conds[:2], src, N)


@pytest.fixture(scope="module")
def photo():
    return group_photo()


def _options(**overrides) -> ProtectOptions:
    return ProtectOptions.preset("anonymize", "fast", size=64, msi=MSIOptions.preset("lite", steps=2),
                                 inversion_steps=4, sampling=dict(steps=8, strength=0.5, batch_size=2),
                                 max_identity_similarity=1.0, **overrides)


def test_a_photos_faces_in_one_batch_equal_one_at_a_time(pipeline_models, photo):
    """protect_photo with every face in one batch vs faces_per_batch=1: the same crops, keys, similarities and
    photos; whole-photo recovery in one batch equals recovering each face alone."""
    backend, recognizer = pipeline_models
    together = protect_photo(backend, recognizer, photo, _options())
    alone = protect_photo(backend, recognizer, photo, _options(faces_per_batch=1))
    assert together.report.settings["faces_in_one_batch"] == 3
    assert alone.report.settings["faces_in_one_batch"] == 1
    assert [f.number for f in together.faces] == [f.number for f in alone.faces] == [1, 2, 3]
    for a, b in zip(together.faces, alone.faces):
        assert a.box == b.box
        # the guided step normalises its gradient, which turns kernel rounding (~1e-6 in z_T) into up to ~2e-3
        # on a few pixels: below one 8-bit level, and 1e-4 on average
        torch.testing.assert_close(a.crops, b.crops, atol=ONE_LEVEL, rtol=0)
        assert float((a.crops - b.crops).abs().mean()) < 1e-4
        # the gate scores the output crops, which agree within an 8-bit level: their cosines within 1e-3
        torch.testing.assert_close(a.similarities, b.similarities, atol=1e-3, rtol=0)
        torch.testing.assert_close(a.keys.stage_conds, b.keys.stage_conds, **TOL)
        torch.testing.assert_close(a.keys.z_T, b.keys.z_T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together.photos, alone.photos, atol=ONE_LEVEL, rtol=0)
    # the faces' results differ (the photo repeats one face at other scales) 50× more than batching changes them
    assert (together.faces[0].crops - together.faces[1].crops).abs().mean() > 0.005
    crops = recover_faces(backend, [f.keys for f in together.faces])
    for face, crop in zip(together.faces, crops):
        torch.testing.assert_close(crop, recover_face(backend, face.keys), atol=2e-4, rtol=0)


def test_faces_that_fit_and_the_progress_label():
    mib = 1024 * 1024
    assert faces_that_fit(5, 100 * mib, 1000 * mib)[0] == 5  # 5 × 100 × 2 ≤ 1000
    assert faces_that_fit(8, 100 * mib, 1000 * mib)[0] == 5
    assert faces_that_fit(8, 100 * mib, 150 * mib)[0] == 1  # never below one
    assert faces_that_fit(4, 100 * mib, 0)[0] == 1  # unknown free memory
    assert faces_that_fit(3, 0, 10**12) == (1, "one at a time: activations per face (nothing was measured) unknown")
    assert faces_that_fit(3, 10, 0) == (1, "one at a time: free memory unknown")
    with pytest.raises(ValueError):
        faces_that_fit(0, 1, 1)
    assert faces_label(2, 1, 3) == "face 2/3" and faces_label(1, 3, 5) == "faces 1–3/5"
    with pytest.raises(ValueError, match="faces_per_batch"):
        _options(faces_per_batch=0)


def test_msi_faces_per_batch_follows_free_memory(images, monkeypatch):
    """The measured activations of one face (k timesteps) decide how many faces MSI fits at once."""
    import core.msi as msi_module

    toy = ToyBackend(seed=0)
    options = MSIOptions.preset("lite", steps=1, timesteps_per_step=4)
    z0 = msi_module.latent_shape_of(images)
    assert z0 == (1, 4, 8, 8)
    per_face = msi_module.face_activation_bytes(toy, z0, options)
    half = msi_module.face_activation_bytes(toy, z0, MSIOptions.preset("lite", steps=1, timesteps_per_step=2))
    assert per_face > 0 and per_face == 2 * half  # measured at batch 1, scaled by k (the same every time)
    with torch.inference_mode():  # the probe leaves inference mode itself: ComfyUI runs nodes inside it
        assert msi_module.face_activation_bytes(toy, z0, options) == per_face
    monkeypatch.setattr(msi_module, "backend_free_bytes", lambda backend: 10**15)
    assert msi_module.msi_faces_per_batch(toy, images, options)[0] == N
    monkeypatch.setattr(msi_module, "backend_free_bytes", lambda backend: int(per_face * 2 * 2))
    assert msi_module.msi_faces_per_batch(toy, images, options)[0] == 2
    monkeypatch.setattr(msi_module, "backend_free_bytes", lambda backend: 1)
    count, why = msi_module.msi_faces_per_batch(toy, images, options)
    assert count == 1 and "MiB" in why
    assert msi_module.msi_faces_per_batch(toy, images[:1], options) == (1, "one face")
