"""The tiny guidance decoder (issue 11): TAESD's decoder for the guidance gradient only, read from ComfyUI's
``models/vae_approx`` layout or a diffusers file; results are still decoded, gated and written through the
checkpoint's VAE. Models: the tests' tiny checkpoint, a random FaceNet and random-weight TAESD files of the real
architecture (tests/support/tiny_diffusers.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.diffusers_backend import TinyGuidanceDecoder
from core.errors import IncompatibleWeightsError, WeightsNotFoundError
from core.msi import MSIOptions
from core.pipeline import CHECKPOINT_VAE, ProtectOptions, protect_photo
from tests.support import tiny_diffusers as td

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return td.write_taesd_files(tmp_path_factory.mktemp("vae_approx"), seed=5)


def test_reads_comfyui_and_diffusers_layouts_and_refuses_others(taesd, tmp_path):
    encoder_file, decoder_file = taesd
    tiny = TinyGuidanceDecoder.from_file(decoder_file)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    image = tiny(z)
    assert image.shape == (2, 3, 64, 64) and image.dtype == torch.float32 and tiny.name == "taesd"
    (grad,) = torch.autograd.grad(image.square().sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().amax() > 0  # differentiable: it carries the guidance
    # the same weights in diffusers' AutoencoderTiny layout (encoder tensors ignored) decode the same
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({**{f"decoder.{k}": v.contiguous() for k, v in tiny.decoder.state_dict().items()},
               "encoder.layers.0.weight": torch.zeros(64, 3, 3, 3)}, str(diffusers_file))
    torch.testing.assert_close(TinyGuidanceDecoder.from_file(diffusers_file)(z), image)
    # a whole TAESD VAE as ComfyUI holds it (prefixed keys and its latent scale), built inside inference mode
    whole = {f"taesd_decoder.{k}": v for k, v in load_file(decoder_file).items()}
    save_file({**whole, "vae_scale": torch.tensor(0.18215)}, str(tmp_path / "taesd_vae.safetensors"))
    with torch.inference_mode():
        built_inside = TinyGuidanceDecoder.from_file(tmp_path / "taesd_vae.safetensors")
    (grad_inside,) = torch.autograd.grad(built_inside(z).square().sum(), z)  # its weights can be saved for backward
    torch.testing.assert_close(grad_inside, grad)
    save_file({**whole, "vae_scale": torch.tensor(0.13025)}, str(tmp_path / "taesdxl_vae.safetensors"))
    with pytest.raises(IncompatibleWeightsError, match="vae_scale 0.13025.*taesdxl"):
        TinyGuidanceDecoder.from_file(tmp_path / "taesdxl_vae.safetensors")
    with pytest.raises(IncompatibleWeightsError, match="TAESD decoder.*taesd_encoder.safetensors"):
        TinyGuidanceDecoder.from_file(encoder_file)  # the encoder half is not a decoder
    with pytest.raises(WeightsNotFoundError):
        TinyGuidanceDecoder.from_file(tmp_path / "taesd_decoder.safetensors")


def _options(**overrides) -> ProtectOptions:
    return ProtectOptions.preset("anonymize", "fast", size=64, msi=MSIOptions.preset("lite", steps=2),
                                 inversion_steps=4, sampling=dict(steps=8, strength=0.5, batch_size=2),
                                 max_identity_similarity=1.0, **overrides)


def test_the_guidance_gradient_goes_through_the_tiny_decoder_and_the_results_through_the_vae(
        pipeline_models, taesd, monkeypatch):
    """With the tiny decoder every guided step decodes through it and the checkpoint's VAE decodes once (the
    results, which the gate judges); without it the VAE does both. Same seeds: the results differ, so the
    guidance really went through the tiny decoder."""
    from skimage import data

    backend, recognizer = pipeline_models
    photo = torch.from_numpy(data.astronaut()).float() / 255.0
    tiny = TinyGuidanceDecoder.from_file(taesd[1])
    calls = {"vae": [], "tiny": []}
    vae_decode, tiny_call = backend.decode_latent, tiny.decoder.forward
    monkeypatch.setattr(backend, "decode_latent", lambda z: calls["vae"].append(z.shape[0]) or vae_decode(z))
    monkeypatch.setattr(tiny.decoder, "forward", lambda z: calls["tiny"].append(z.shape[0]) or tiny_call(z))

    with_tiny = protect_photo(backend, recognizer, photo, _options(), guidance_decoder=tiny)
    guided_steps = _options().sampling.denoising_steps
    assert calls["vae"] == [2] and calls["tiny"] == [2] * guided_steps  # decoded once for the results
    assert with_tiny.report.settings["guidance_decoder"] == "taesd"
    assert with_tiny.report.settings["cuda_graphs"].startswith("off: CUDA graphs need a CUDA device")
    assert with_tiny.report.to_dict()["passed"]

    calls["vae"].clear()
    plain = protect_photo(backend, recognizer, photo, _options())
    assert calls["vae"] == [2] * guided_steps + [2] and plain.report.settings["guidance_decoder"] == CHECKPOINT_VAE
    assert (with_tiny.faces[0].crops - plain.faces[0].crops).abs().amax() > 1e-3
    # the gate's guiding scores are the recognizer on the crops that are output (decoded by the VAE, clamped, seam
    # colour matched), not on anything the guidance decoder made
    from core.energies import cosine_to_source
    from core.recognizers import FaceCrop, face_embeddings

    face = with_tiny.faces[0]
    crop = FaceCrop.official(recognizer)
    source = face_embeddings(recognizer, crop, face.aligned.crop.permute(2, 0, 1)[None] * 2 - 1)
    with torch.no_grad():
        output = recognizer(crop(face.crops.permute(0, 3, 1, 2) * 2 - 1))
    torch.testing.assert_close(face.similarities, cosine_to_source(output.float(), source), atol=1e-5, rtol=0)


def test_cli_takes_the_guidance_decoder(pipeline_files, taesd, monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("diffprivacy_cli", REPO / "scripts" / "diffprivacy.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("DIFF_PRIVACY_PASSPHRASE", "a long test passphrase")
    out = tmp_path / "out"
    code = cli.main(["protect", "--checkpoint", pipeline_files["checkpoint"], "--tokenizer-dir",
                     pipeline_files["tokenizer"], "--keys", str(tmp_path / "keys"), "--recognizer",
                     pipeline_files["facenet"], "--photo", pipeline_files["photo"], "--out", str(out), "--size", "64",
                     "--msi-steps", "2", "--inversion-steps", "4", "--steps", "8", "--strength", "0.5",
                     "--batch-size", "2", "--max-identity-similarity", "1.0", "--speed", "fast",
                     "--guidance-decoder", taesd[1], "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "astronaut_anonymize.report.json").read_text())
    assert report["passed"] and report["settings"]["guidance_decoder"] == "taesd" and report["preset"] == "fast"
