"""Several faces in one batch (the building-block nodes' batch semantics): sample b of face i at row b·N + i.

Oracle throughout: each face on its own (its own energies, plan, crop), compared with the batched computation, so
a batch of N faces is shown to be N independent faces and nothing more.
"""
from __future__ import annotations

import pytest
import torch

from core.energies import IdentityGuidance, anonymization_energy, cosine_to_source, hiding_energy
from core.recognizers import FaceCrop, FaceCrops
from core.sampling import SamplingOptions, face_samples, faces_protection_plan, protection_plan, sample_major
from tests.support.toy_models import ToyBackend, ToyRecognizer, toy_crop, toy_face_image

N, B, D = 3, 4, 16


def _embeddings(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N * B, D, generator=g, dtype=torch.float64) * 3.0
    src = torch.randn(N, D, generator=g, dtype=torch.float64)
    return f, src


def test_each_sample_is_compared_with_its_own_face():
    f, src = _embeddings()
    cos = cosine_to_source(f, src, faces=N)
    for i in range(N):
        torch.testing.assert_close(cos[i::N], cosine_to_source(f[i::N], src[i : i + 1]))
    with pytest.raises(ValueError, match="source embedding"):
        cosine_to_source(f, src[:2], faces=N)  # a row per face
    with pytest.raises(ValueError, match="same number of samples"):
        cosine_to_source(f[:-1], src, faces=N)


@pytest.mark.parametrize("energy", ["anonymize", "hide"])
def test_the_energy_of_n_faces_is_the_sum_of_each_faces_own(energy):
    """Values and gradients: no term couples two faces (the diversity term acts within a face's samples)."""
    f, src = _embeddings(1)
    f.requires_grad_(True)

    def e(x, s, faces=1):
        return anonymization_energy(x, s, 1.0, faces) if energy == "anonymize" else hiding_energy(x, s, faces)

    total = e(f, src, N)
    (grad,) = torch.autograd.grad(total, f)
    parts = []
    for i in range(N):
        own = f[i::N].detach().clone().requires_grad_(True)
        value = e(own, src[i : i + 1])
        (own_grad,) = torch.autograd.grad(value, own)
        torch.testing.assert_close(grad[i::N], own_grad)
        parts.append(value.detach())
    torch.testing.assert_close(total.detach(), torch.stack(parts).sum())
    if energy == "anonymize":  # the equality means something: pairs of different faces have positive cosines
        cos = torch.nn.functional.normalize(f.detach(), dim=-1) @ torch.nn.functional.normalize(f.detach(), dim=-1).T
        k = torch.arange(N * B)
        assert bool((cos[(k[:, None] % N) != (k[None, :] % N)] > 0.1).any())


def test_guidance_of_n_faces_guides_each_sample_by_its_own_face():
    backend, rec = ToyBackend(seed=3).double(), ToyRecognizer(seed=4).double()
    with torch.no_grad():
        z = torch.cat([backend.encode_image(toy_face_image(s, size=32).double()) for s in range(N)])
        src = rec(toy_crop(backend.decode_latent(z)))
    x0 = sample_major(z, B) + 0.7 * torch.randn(N * B, *z.shape[1:], generator=torch.Generator().manual_seed(5),
                                                dtype=torch.float64)
    both = IdentityGuidance(backend.decode_latent, rec, toy_crop, src, faces=N)
    g, energy = both.gradient(x0)
    sims = both.similarities(x0)
    total = 0.0
    for i in range(N):
        own = IdentityGuidance(backend.decode_latent, rec, toy_crop, src[i : i + 1])
        g_own, e_own = own.gradient(face_samples(x0, N, i))
        torch.testing.assert_close(face_samples(g, N, i), g_own)
        torch.testing.assert_close(face_samples(sims, N, i), own.similarities(face_samples(x0, N, i)))
        total += float(e_own)
    assert float(energy) == pytest.approx(total)
    with pytest.raises(ValueError, match="source_embedding"):
        IdentityGuidance(backend.decode_latent, rec, toy_crop, src[:1], faces=N)


def test_the_plan_of_n_faces_is_each_faces_plan_sample_major():
    z0 = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    options = SamplingOptions(steps=10, strength=0.6, batch_size=B, seed=125)
    plan = faces_protection_plan(z0, options)
    assert plan.x.shape == (N * B, 4, 8, 8)
    for i in range(N):
        own = protection_plan(z0[i : i + 1], options)
        assert torch.equal(face_samples(plan.x, N, i), own.x)  # the same seeded noise as the face alone
        assert torch.equal(plan.sigmas, own.sigmas) and plan.timesteps == own.timesteps
    assert torch.equal(face_samples(sample_major(z0, B), N, 1), z0[1:2].expand(B, -1, -1, -1))
    with pytest.raises(ValueError):
        faces_protection_plan(z0[0], options)


def test_face_crops_crop_each_sample_with_its_own_faces_box():
    images = torch.rand(N * B, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    crops = [FaceCrop("box", 32, "bilinear", box=(4.0 * i, 2.0 * i, 40.0 + 4 * i, 44.0 + 2 * i)) for i in range(N)]
    out = FaceCrops(tuple(crops))(images)
    assert out.shape == (N * B, 3, 32, 32)
    for i in range(N):
        torch.testing.assert_close(out[i::N], crops[i](images[i::N]))
    with pytest.raises(ValueError, match="same size"):
        FaceCrops((crops[0], FaceCrop("box", 16, "bilinear", box=(0.0, 0.0, 8.0, 8.0))))
    with pytest.raises(ValueError, match="same number of samples"):
        FaceCrops(tuple(crops))(images[:-1])
