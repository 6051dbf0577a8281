"""Privacy report metrics: SSIM/PSNR outside the faces against independent references, and the preview."""
from __future__ import annotations

import json
import math

import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core.gate import identity_scores
from core.report import FaceEntry, PrivacyReport, draw_preview, outside_face_metrics, ssim_map


def _photo() -> torch.Tensor:
    return torch.from_numpy(data.astronaut()[:128, :128]).double() / 255.0


def test_ssim_matches_scikit_image():
    a = _photo()
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(0, 1)
    ours = float(ssim_map(a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]).mean())
    reference = structural_similarity(a.numpy(), b.numpy(), channel_axis=2, data_range=1.0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(reference, abs=0.01)  # the border handling differs slightly
    assert float(ssim_map(a.permute(2, 0, 1)[None], a.permute(2, 0, 1)[None]).mean()) == pytest.approx(1.0)


def test_outside_metrics_ignore_the_face_region_and_match_psnr():
    photo = _photo().float()
    mask = torch.zeros(128, 128)
    mask[32:96, 32:96] = 1.0
    inside_only = photo.clone()
    inside_only[40:90, 40:90] = 0.0  # a change inside the face region
    noisy = (photo + 0.02 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    same, changed = outside_face_metrics(photo, torch.stack([inside_only, noisy]), mask)
    assert same.identical and same.psnr_db is None and same.ssim == pytest.approx(1.0) and same.pixels == 128 * 128 - 64 * 64
    outside = mask == 0
    expected = peak_signal_noise_ratio(photo[outside].numpy(), noisy[outside].numpy(), data_range=1.0)
    assert not changed.identical and changed.psnr_db == pytest.approx(expected, rel=1e-4)
    assert 0 < changed.ssim < 0.99


def test_report_json_summary_and_preview():
    scores = identity_scores("facenet", torch.tensor([0.1, float("nan")]), 0.5)
    report = PrivacyReport(task="anonymize", preset="default", settings={"steps": 8}, model={"unet": "w1:ab"},
                           faces=[FaceEntry(0, (10.0, 12.0, 60.0, 70.0), scores, [True, False])],
                           outside_faces=[], seconds=1.5)
    assert not report.passed
    parsed = json.loads(report.to_json())
    assert parsed["faces"][0]["scores"][1] == {"recognizer": "facenet", "sample": 1, "cosine": None, "bound": 0.5,
                                               "passed": False}
    assert "FAILED" in report.summary() and "max nan" in report.summary()
    preview = draw_preview(_photo().float(), report)
    assert preview.shape == (128, 128, 3)
    red = preview[12, 10:60]  # the top edge of the box is drawn in the failure colour
    assert bool((red[:, 0] > 0.8).all() and (red[:, 1] < 0.3).all())
    assert math.isclose(float(preview[100, 100, 0]), float(_photo()[100, 100, 0]), abs_tol=1 / 255)


def _dense_ssim_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM map the direct way: one 11×11 Gaussian 2-D convolution over the whole reflect-padded image."""
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(t, (5, 5, 5, 5), mode="reflect"), window, groups=3)

    a, b = a.double(), b.double()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean(1)


@pytest.mark.parametrize("where", ["middle", "corner", "everywhere", "nowhere"])
def test_ssim_computed_near_changes_only_equals_the_dense_map(where):
    """The speed-up (separable window, map computed only around changed pixels) against the direct 2-D map."""
    gen = torch.Generator().manual_seed(2)
    a = _photo().permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    b = a.clone()
    noise = 0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64)
    region = {"middle": (slice(50, 58), slice(70, 73)), "corner": (slice(0, 4), slice(120, 128)),
              "everywhere": (slice(None), slice(None)), "nowhere": (slice(0, 0), slice(0, 0))}[where]
    b[1, :, region[0], region[1]] = (b + noise)[1, :, region[0], region[1]].clamp(0, 1)
    ours, reference = ssim_map(a, b), _dense_ssim_reference(a, b)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert torch.equal(ours[0], torch.ones_like(ours[0]))
