"""Face recognizers (ArcFace IR-SE50 layout, FaceNet loading) and differentiable crops.

All networks are random-init with fixed seeds; nothing is downloaded. Reading weight files itself (formats,
refused pickles, damaged files) is tested in test_weights.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.errors import IncompatibleWeightsError, WeightsNotFoundError
from core.recognizers import (
    ARCFACE_NAME,
    FACENET_NAME,
    ArcFaceIRSE50,
    FaceCrop,
    FaceRecognizer,
    box_crop,
    build_facenet,
    ffhq_identity_crop,
    load_recognizer,
    reference_embedding,
    whole_image_crop,
)
from tests.support.recognizers import PUBLIC_IRSE50_UNITS, arcface_irse50_expected_shapes


def randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics so that loading (or not loading) them changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.num_batches_tracked.fill_(1234)


@pytest.fixture(scope="module")
def arcface_net() -> ArcFaceIRSE50:
    torch.manual_seed(0)
    net = ArcFaceIRSE50().eval()
    randomise_batchnorm(net, seed=1)
    return net


@pytest.fixture(scope="module")
def arcface_files(arcface_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("arcface")
    state = arcface_net.state_dict()
    pth, st = folder / "model_ir_se50.pth", folder / "model_ir_se50.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    return pth, st


@pytest.fixture(scope="module")
def facenet_net():
    torch.manual_seed(2)
    net = build_facenet()
    randomise_batchnorm(net, seed=3)
    return net


@pytest.fixture(scope="module")
def facenet_file(facenet_net, tmp_path_factory):
    """Like the real 20180402-114759-vggface2.pt: the embedding net plus an 8631-class ``logits`` head."""
    gen = torch.Generator().manual_seed(4)
    state = dict(facenet_net.state_dict())
    state["logits.weight"] = 0.01 * torch.randn(8631, 512, generator=gen)
    state["logits.bias"] = torch.zeros(8631)
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    return path


def faces(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------
# ArcFace IR-SE50
# ---------------------------------------------------------------------------------------------------------

def test_arcface_state_dict_matches_public_layout(arcface_net):
    public = arcface_irse50_expected_shapes()
    ours = {k: tuple(v.shape) for k, v in arcface_net.state_dict().items()}
    assert sorted(ours) == sorted(public), (set(ours) ^ set(public))
    assert ours == public
    assert len(public) == 397
    assert sum(p.numel() for p in arcface_net.parameters()) == 43_797_696


def test_arcface_shortcuts_and_strides_follow_public_layout(arcface_net):
    for i, (cin, depth, stride) in enumerate(PUBLIC_IRSE50_UNITS):
        unit = arcface_net.body[i]
        assert unit.res_layer[3].stride == (stride, stride)
        if cin == depth:
            assert isinstance(unit.shortcut_layer, torch.nn.MaxPool2d)
            assert unit.shortcut_layer.kernel_size == 1 and unit.shortcut_layer.stride == stride
        else:
            assert i in (3, 7, 21)
            assert unit.shortcut_layer[0].stride == (stride, stride)


def test_arcface_strict_roundtrip_pth_and_safetensors(arcface_net, arcface_files):
    x = faces(2, 112)
    with torch.no_grad():
        expected = arcface_net(x)
    for path, kind in zip(arcface_files, ("arcface", "auto")):
        rec = load_recognizer(path, kind)
        assert rec.name == ARCFACE_NAME and rec.input_size == 112
        loaded = rec.network.state_dict()
        for k, v in arcface_net.state_dict().items():
            assert torch.equal(loaded[k], v), k
        with torch.no_grad():
            torch.testing.assert_close(rec(x), expected, rtol=1e-5, atol=1e-6)


def test_arcface_output_unit_norm_and_batch_one(arcface_net):
    rec = FaceRecognizer(arcface_net, ARCFACE_NAME, 112)
    x = faces(3, 112, seed=5)
    with torch.no_grad():
        batch = rec(x)
        single = rec(x[1:2])
    assert batch.shape == (3, 512) and batch.dtype == torch.float32
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    # Eval-mode BatchNorm: a face's embedding does not depend on the rest of the batch.
    torch.testing.assert_close(single[0], batch[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_recognizer_stays_in_eval_and_frozen(arcface_net):
    rec = FaceRecognizer(arcface_net, ARCFACE_NAME, 112)
    rec.train()
    assert not rec.training and not any(m.training for m in rec.modules())
    assert not any(p.requires_grad for p in rec.parameters())
    with torch.no_grad():
        rec(faces(1, 112))  # train-mode BatchNorm1d would fail at batch 1


def test_recognizer_rejects_wrong_input_size(arcface_net):
    rec = FaceRecognizer(arcface_net, ARCFACE_NAME, 112)
    with pytest.raises(ValueError, match="112"):
        rec(faces(1, 160))


def test_gradient_after_loading_inside_inference_mode(arcface_files):
    with torch.inference_mode():
        rec = load_recognizer(arcface_files[0], "auto")
        rec.to(torch.float64).to(torch.float32)  # a move/cast under inference mode must keep normal tensors
        source = faces(1, 112, seed=6)  # an inference tensor, like a ComfyUI IMAGE
        ref = reference_embedding(rec, FaceCrop("whole", 112), source)
        assert not ref.is_inference() and not ref.requires_grad
        assert not any(p.is_inference() for p in rec.parameters())
        with torch.inference_mode(False), torch.enable_grad():
            x = faces(1, 112, seed=7).requires_grad_(True)
            loss = F.cosine_similarity(rec(x), ref).sum()
            (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_arcface_gradient_matches_finite_difference(arcface_net):
    rec = FaceRecognizer(ArcFaceIRSE50(), ARCFACE_NAME, 112)
    rec.network.load_state_dict(arcface_net.state_dict())
    rec.to(torch.float64)
    gen = torch.Generator().manual_seed(8)
    x = (torch.rand(1, 3, 112, 112, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    ref = F.normalize(torch.randn(1, 512, generator=gen, dtype=torch.float64), dim=1)
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def energy(inp):
        return (rec(inp) * ref).sum()

    (grad,) = torch.autograd.grad(energy(x), x)
    # PReLU/ReLU kinks bias wide central differences (0.6 % at ε = 1e-4); at ε = 1e-7 in float64 the
    # difference quotient agrees with the directional derivative to ~2e-7 relative.
    eps = 1e-7
    with torch.no_grad():
        numeric = (energy(x + eps * direction) - energy(x - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(analytic)) > 1e-4
    assert abs(float(analytic - numeric)) <= 1e-4 * abs(float(numeric))


# ---------------------------------------------------------------------------------------------------------
# FaceNet and weight-file handling
# ---------------------------------------------------------------------------------------------------------

def test_facenet_checkpoint_with_logits_loads(facenet_net, facenet_file):
    x = faces(2, 160, seed=9)
    with torch.no_grad():
        expected = F.normalize(facenet_net(x), dim=1)
    for kind in ("facenet", "auto"):
        rec = load_recognizer(facenet_file, kind)
        assert rec.name == FACENET_NAME and rec.input_size == 160
        assert not any(k.startswith("logits") for k in rec.network.state_dict())
        with torch.no_grad():
            out = rec(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)


def test_wrapped_and_prefixed_checkpoint_loads(facenet_net, tmp_path):
    state = {"module." + k: v for k, v in facenet_net.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state, "epoch": 3, "note": "trained"}, path)
    rec = load_recognizer(path, "auto")
    assert rec.name == FACENET_NAME
    torch.testing.assert_close(rec.network.last_linear.weight, facenet_net.last_linear.weight)


def test_checkpoint_without_batch_counters_loads(facenet_net, tmp_path):
    state = {k: v for k, v in facenet_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    rec = load_recognizer(path, "facenet")
    torch.testing.assert_close(rec.network.last_bn.running_var, facenet_net.last_bn.running_var)


def test_compute_dtype_bfloat16(facenet_file):
    x = faces(2, 160, seed=10)
    full = load_recognizer(facenet_file, "facenet")
    low = load_recognizer(facenet_file, "facenet", compute_dtype=torch.bfloat16)
    assert low.compute_dtype == torch.bfloat16
    with torch.no_grad():
        a, b = full(x), low(x)
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a, b).min() > 0.98


def test_wrong_architecture_is_rejected(arcface_net, arcface_files, facenet_file, tmp_path):
    with pytest.raises(IncompatibleWeightsError, match="missing"):
        load_recognizer(arcface_files[1], "facenet")
    with pytest.raises(IncompatibleWeightsError, match="arcface_ir_se50"):
        load_recognizer(facenet_file, "arcface")

    plain_ir = {k: v for k, v in arcface_net.state_dict().items() if ".res_layer.5." not in k}  # IR-50 without SE
    path = tmp_path / "ir50.safetensors"
    save_file({k: v.contiguous() for k, v in plain_ir.items()}, str(path))
    with pytest.raises(IncompatibleWeightsError, match=r"48 missing keys.*res_layer\.5\.fc1"):
        load_recognizer(path, "arcface")

    tiny = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(tiny, path)
    with pytest.raises(IncompatibleWeightsError, match="neither"):
        load_recognizer(path, "auto")


def test_shape_mismatch_is_reported(arcface_net, tmp_path):
    state = dict(arcface_net.state_dict())
    state["input_layer.0.weight"] = torch.zeros(64, 1, 3, 3)  # a grayscale-input variant
    path = tmp_path / "gray.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(IncompatibleWeightsError, match=r"shape mismatch.*input_layer\.0\.weight"):
        load_recognizer(path, "auto")


def test_missing_file(tmp_path):
    path = tmp_path / "models" / "model_ir_se50.pth"
    with pytest.raises(WeightsNotFoundError, match="model_ir_se50.pth") as info:
        load_recognizer(path, "arcface")
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------------------

def test_crop_output_sizes():
    x = faces(2, 96, seed=11)[:, :, :, :80]
    assert ffhq_identity_crop(x).shape == (2, 3, 112, 112)
    assert whole_image_crop(x).shape == (2, 3, 160, 160)
    assert box_crop(x, (10.0, 5.0, 60.0, 70.0), 48).shape == (2, 3, 48, 48)
    for mode in ("nearest", "bilinear", "area"):
        assert ffhq_identity_crop(x, 112, mode).shape == (2, 3, 112, 112)
        assert whole_image_crop(x, 160, mode).shape == (2, 3, 160, 160)


def test_ffhq_crop_hand_computation_nearest_upsampling():
    # 128 → 256 nearest doubles every pixel; rows 35+2a, 36+2a come from source rows 17+a, 18+a and columns
    # 32+2b, 33+2b both from source column 16+b, so a 94×94 pool (188 / 2) averages two source pixels.
    src = torch.arange(2 * 128 * 128, dtype=torch.float64).reshape(1, 2, 128, 128) / 1000.0
    out = ffhq_identity_crop(src, size=94)
    s = src[0].numpy()
    a = np.arange(94)[:, None]
    b = np.arange(94)[None, :]
    expected = (s[:, 17 + a, 16 + b] + s[:, 18 + a, 16 + b]) / 2.0
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-12)


def test_ffhq_crop_hand_computation_adaptive_pool():
    # At 256 the resize is the identity; the 188 → 112 pool averages window [⌊188i/112⌋, ⌈188(i+1)/112⌉).
    src = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = ffhq_identity_crop(src, size=112)[0].numpy()
    crop = src[0, :, 35:223, 32:220].numpy()
    starts = [(188 * i) // 112 for i in range(112)]
    ends = [-((-188 * (i + 1)) // 112) for i in range(112)]
    expected = np.empty((3, 112, 112))
    for i in range(112):
        for j in range(112):
            expected[:, i, j] = crop[:, starts[i]:ends[i], starts[j]:ends[j]].mean(axis=(1, 2))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_box_crop_is_exact_on_pixel_aligned_boxes():
    x = faces(2, 20, seed=13)
    torch.testing.assert_close(box_crop(x, (0.0, 0.0, 20.0, 20.0), 20), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(box_crop(x, (4.0, 2.0, 12.0, 10.0), 8), x[:, :, 2:10, 4:12], rtol=0, atol=1e-5)
    per_image = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 6.0, 8.0, 14.0]])
    out = box_crop(x, per_image, 8)
    torch.testing.assert_close(out[1], x[1, :, 6:14, 0:8], rtol=0, atol=1e-5)


def test_box_crop_antialias_is_box_filter():
    x = faces(1, 64, seed=14)
    out = box_crop(x, (0.0, 0.0, 64.0, 64.0), 8)
    torch.testing.assert_close(out, F.avg_pool2d(x, 8), rtol=0, atol=1e-6)
    # Without antialiasing only a few pixels are sampled and the result differs.
    assert not torch.allclose(box_crop(x, (0.0, 0.0, 64.0, 64.0), 8, antialias=False), out, atol=1e-3)


def test_box_crop_gradients_match_finite_differences():
    x = faces(1, 12, seed=15).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: box_crop(t, (2.3, 1.7, 9.6, 10.2), 5), (x,))
    assert torch.autograd.gradcheck(lambda t: box_crop(t, (0.5, 0.25, 11.0, 11.5), 3, margin=0.05), (x,))


def test_box_crop_gradient_flows_to_the_box_only():
    x = faces(1, 40, seed=16).requires_grad_(True)
    box_crop(x, (10.0, 12.0, 26.0, 28.0), 16, margin=0.1).sum().backward()
    grad = x.grad[0].abs().sum(0)
    assert grad[12:28, 10:26].min() > 0
    assert grad[:, :7].abs().sum() == 0 and grad[:9, :].abs().sum() == 0


def test_face_crop_dispatch():
    x = faces(1, 200, seed=17)
    torch.testing.assert_close(FaceCrop("ffhq", 112)(x), ffhq_identity_crop(x, 112))
    torch.testing.assert_close(FaceCrop("whole", 160, "area")(x), whole_image_crop(x, 160, "area"))
    torch.testing.assert_close(
        FaceCrop("box", 64, box=(20.0, 30.0, 150.0, 160.0), margin=0.1)(x),
        box_crop(x, (20.0, 30.0, 150.0, 160.0), 64, margin=0.1),
    )
    assert FaceCrop.official(ARCFACE_NAME) == FaceCrop("ffhq", 112, "nearest")
    assert FaceCrop.official(FACENET_NAME) == FaceCrop("whole", 160, "nearest")
    with pytest.raises(ValueError, match="box"):
        FaceCrop("box", 64)
    with pytest.raises(ValueError, match="resize_mode"):
        FaceCrop("ffhq", 112, "cubic")


def test_reference_embedding(arcface_net):
    rec = FaceRecognizer(arcface_net, ARCFACE_NAME, 112)
    crop = FaceCrop("ffhq", 112, "bilinear")
    image = faces(1, 256, seed=18)
    ref = reference_embedding(rec, crop, image[0])
    assert ref.shape == (1, 512) and not ref.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ref, rec(crop(image)))
    two = torch.cat([image, faces(1, 256, seed=19)])
    mean_ref = reference_embedding(rec, crop, two)
    with torch.no_grad():
        each = rec(crop(two))
    torch.testing.assert_close(mean_ref, F.normalize(each.mean(0, keepdim=True), dim=1))
    torch.testing.assert_close(mean_ref.norm(), torch.tensor(1.0))
