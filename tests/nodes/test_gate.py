"""The identity gate in the nodes, in ComfyUI's executor (in this process): Face Verifier Loader, the GUIDER's
gate, Save Privacy Keys' receipt check, Privacy Sampler's check that its key-E made its conditioning, and Save
Protected Image's files.

The end-to-end fail-closed runs (a failed gate, Cancel, a missing file, a verifier that still matches, the
report's fields) go through the real server in test_fail_closed.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import ComfyGraphError
from .helpers import TEST_PASSPHRASE, astronaut_png, load_api, node_ids, tiny
from .test_core_samplers import _decode_and_save, _front

pytestmark = pytest.mark.comfyui

KEYS_FOLDER = "diff_privacy_keys"  # the folder_paths name of the key folder (its place may change)


def _module(comfy, name: str):
    """The pack's module ``nodes.<name>`` as ComfyUI imported it."""
    package = comfy.node_classes["DiffPrivacy_PrivacySampler"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def _core(comfy, name: str):
    """The pack's ``core.<name>`` as ComfyUI imported it (its classes, not the test process's own copies)."""
    pack = comfy.node_classes["DiffPrivacy_PrivacySampler"].__module__.split(".nodes.", 1)[0]
    return sys.modules[f"{pack}.core.{name}"]


def _run(node_class, **inputs):
    """One node's ``execute`` as ComfyUI's executor calls it; returns its outputs as a tuple."""
    with torch.inference_mode():
        return node_class.execute(**inputs).args


def _key_files(comfy) -> set[str]:
    """Every file in the key folders ComfyUI knows under the name 'diff_privacy_keys'."""
    found = set()
    for folder in comfy.folder_paths.get_folder_paths(KEYS_FOLDER):
        for root, _, files in os.walk(folder):
            found |= {os.path.join(root, f) for f in files}
    return found


# ------------------------------------------------------------------------------- Face Verifier Loader
def test_verifier_loader_offers_sface_and_the_recognizer_files(comfy_inprocess, sface_files):
    info = comfy_inprocess.node_classes["DiffPrivacy_FaceVerifierLoader"].GET_NODE_INFO_V1()
    name_spec = info["input"]["required"]["verifier_name"][1]
    assert name_spec["options"][0] == "sface"
    assert comfy_inprocess.models.facenet_name in name_spec["options"]
    assert not [o for o in name_spec["options"] if o.endswith(".onnx")]
    assert info["input"]["required"]["bound"][1]["default"] == pytest.approx(0.363)
    assert info["input"]["optional"]["verifiers"][0] == "FACE_VERIFIERS"
    assert info["output"] == ["FACE_VERIFIERS"]
    recognizers = comfy_inprocess.node_classes["DiffPrivacy_FaceRecognizerLoader"].GET_NODE_INFO_V1()
    assert not [o for o in recognizers["input"]["required"]["recognizer_name"][1]["options"] if o.endswith(".onnx")]


def test_verifier_loaders_chain(comfy_inprocess, sface_files):
    loader = comfy_inprocess.node_classes["DiffPrivacy_FaceVerifierLoader"]
    (first,) = _run(loader, verifier_name="sface", bound=0.363)
    (both,) = _run(loader, verifier_name=comfy_inprocess.models.facenet_name, bound=0.45, verifiers=first)
    assert isinstance(both, tuple) and both[0] is first[0]
    assert [(v.name, v.bound) for v in both] == [("sface", pytest.approx(0.363)), ("facenet_vggface2", 0.45)]
    face = _aligned_astronaut()
    for verifier in both:  # each scores a batch against a source: finite cosines, one per result
        sims = verifier.similarities(face, torch.stack([face, face.flip(1)]))
        assert sims.shape == (2,) and torch.isfinite(sims).all()


def _aligned_astronaut() -> torch.Tensor:
    from skimage import data

    from core import faces

    photo = torch.from_numpy(data.astronaut()).float() / 255.0
    return faces.align_face(photo, faces.single_face(photo), size=64).crop


def _graph_with_verifier(comfy, verifier_name: str, bound: float, prefix: str) -> tuple[dict, str]:
    graph = tiny(load_api("anonymize"), photo=astronaut_png(comfy.input_dir), ckpt=comfy.models.checkpoint_name,
                 sampler_steps=4, batch_size=2, prefix=prefix)
    (sampler,) = node_ids(graph, "DiffPrivacy_PrivacySampler")
    graph["800"] = {"class_type": "DiffPrivacy_FaceVerifierLoader",
                    "inputs": {"verifier_name": verifier_name, "bound": bound}}
    graph[sampler]["inputs"]["verifiers"] = ["800", 0]
    return graph, "800"


def test_without_opencv_the_loader_names_the_package(comfy_inprocess, sface_files, monkeypatch):
    graph, loader = _graph_with_verifier(comfy_inprocess, "sface", 0.363, "gate_nocv2")
    monkeypatch.setitem(sys.modules, "cv2", None)  # "import cv2" raises ImportError, as without the package
    _, _, outputs, node_errors = asyncio.run(comfy_inprocess.execution.validate_prompt("nocv2", graph, None))
    assert loader in node_errors  # and the image output behind Privacy Sampler does not run
    assert not [o for o in outputs if graph[o]["class_type"] in ("SaveImage", "DiffPrivacy_SaveImageClean")]
    message = json.dumps(node_errors[loader], ensure_ascii=False)
    assert "opencv-python-headless" in message and "Face Verifier Loader" in message
    node = comfy_inprocess.node_classes["DiffPrivacy_FaceVerifierLoader"]
    assert "sface" not in node.GET_NODE_INFO_V1()["input"]["required"]["verifier_name"][1]["options"]
    with pytest.raises(Exception) as error:
        _run(node, verifier_name="sface", bound=0.363)
    assert type(error.value).__name__ == "VerifierUnavailableError"
    assert "opencv-python-headless" in str(error.value)


# -------------------------------------------------------------------------------------- the GUIDER
def test_the_guider_fails_closed(comfy_inprocess):
    """Identity Energy Guidance's GUIDER runs the identity gate after sampling: with a bound of −1 every result
    still "matches", so SamplerCustomAdvanced fails and nothing downstream runs."""
    graph, ids = _front(comfy_inprocess)
    ckpt, guidance = ids["CheckpointLoaderSimple"], ids["DiffPrivacy_IdentityEnergyGuidance"]
    graph[guidance]["inputs"].update(model=[ckpt, 0], vae=[ckpt, 2],
                                     conditioning=[ids["DiffPrivacy_EmbeddingScheduler"], 0],
                                     max_identity_similarity=-1.0)
    graph["520"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 12}}
    graph["521"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["522"] = {"class_type": "BasicScheduler", "inputs": {"model": [ckpt, 0], "scheduler": "ddim_uniform",
                                                               "steps": 6, "denoise": 0.6}}
    graph["523"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["520", 0], "guider": [guidance, 1], "sampler": ["521", 0], "sigmas": ["522", 0],
        "latent_image": ["500", 0]}}
    _decode_and_save(graph, ids, ["523", 0], "gate_guider")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    assert info.value.details.get("exception_type", "").endswith("ProtectionFailedError")
    assert info.value.details.get("node_type") == "SamplerCustomAdvanced"
    assert "facenet_vggface2, face 0, sample 0" in str(info.value) and "bound -1.000" in str(info.value)
    assert not [f for f in os.listdir(comfy_inprocess.output_dir) if f.startswith("gate_guider")]


# --------------------------------------------------------------------------------- the receipt
def _fake_embeds(comfy, seed: int, fingerprint: str = "w1:test-model"):
    KeyMetadata = _core(comfy, "keys").KeyMetadata
    types = _module(comfy, "types")
    g = torch.Generator().manual_seed(seed)
    meta = KeyMetadata(model_fingerprint=fingerprint, ddim_steps=4, schedule="recover", msi_mode="lite",
                       image_size=(64, 64))
    return types.PrivacyEmbeds(torch.randn(10, 768, generator=g), torch.randn(10, 77, 768, generator=g), meta)


def _receipt(comfy, digest: str, fingerprint: str):
    report = _core(comfy, "report").PrivacyReport(task="anonymize", preset="custom", settings={}, model={},
                                                  faces=[], outside_faces=[], seconds=0.0)
    return _module(comfy, "types").PrivacyReceipt(digest, fingerprint, report)


def test_save_keys_needs_the_receipt_of_its_keys(comfy_inprocess):
    stage_conds_digest = _core(comfy_inprocess, "keys").stage_conds_digest
    save = comfy_inprocess.node_classes["DiffPrivacy_SaveKeys"]
    embeds, other = _fake_embeds(comfy_inprocess, 1), _fake_embeds(comfy_inprocess, 2)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    digest = stage_conds_digest(embeds.stage_conds)
    inputs = dict(embeds=embeds, key_latent=latent, filename_prefix="gate_receipt", passphrase=TEST_PASSPHRASE,
                  allow_plaintext=False)
    before = _key_files(comfy_inprocess)
    refused = {
        "vouches for no keys": _receipt(comfy_inprocess, "", "w1:test-model"),
        "for other keys": _receipt(comfy_inprocess, stage_conds_digest(other.stage_conds), "w1:test-model"),
        "Privacy Sampler ran on model 'w1:another-model'": _receipt(comfy_inprocess, digest, "w1:another-model"),
    }
    for expected, receipt in refused.items():
        with pytest.raises(Exception) as error:
            _run(save, **inputs, receipt=receipt)
        assert type(error.value).__name__ == "KeyMismatchError"
        assert expected in str(error.value) and "Save Privacy Keys" in str(error.value)
        assert "nothing was saved" in str(error.value)
    assert _key_files(comfy_inprocess) == before
    (path,) = _run(save, **inputs, receipt=_receipt(comfy_inprocess, digest, "w1:test-model"))
    assert _key_files(comfy_inprocess) - before == {path}


def test_sampler_refuses_embeds_that_did_not_make_its_conditioning(comfy_inprocess):
    EmbeddingSchedule = _core(comfy_inprocess, "schedules").EmbeddingSchedule
    scheduler, sampler = _module(comfy_inprocess, "embedding_scheduler"), _module(comfy_inprocess, "privacy_sampler")
    embeds, other = _fake_embeds(comfy_inprocess, 4), _fake_embeds(comfy_inprocess, 5)
    null = [[torch.zeros(1, 77, 768), {}]]
    conditioning = scheduler.scheduled_conditioning(embeds, null, EmbeddingSchedule.preset("anonymize"))
    sampler.check_embeds_in_conditioning(embeds, conditioning)
    with pytest.raises(ValueError, match="did not make its 'conditioning'"):
        sampler.check_embeds_in_conditioning(other, conditioning)


def test_shipped_workflows_bind_keys_to_the_gate():
    """MSI Invert's key-E reaches Privacy Sampler, whose receipt reaches both savers."""
    for name in ("anonymize", "hide"):
        api = load_api(name)
        (msi,) = node_ids(api, "DiffPrivacy_MSIInvert")
        (sampler,) = node_ids(api, "DiffPrivacy_PrivacySampler")
        (keys,) = node_ids(api, "DiffPrivacy_SaveKeys")
        (images,) = node_ids(api, "DiffPrivacy_SaveImageClean")
        assert api[sampler]["inputs"]["embeds"] == api[keys]["inputs"]["embeds"] == [msi, 0]
        assert api[keys]["inputs"]["receipt"] == api[images]["inputs"]["receipt"] == [sampler, 2]
        assert not node_ids(api, "SaveImage")


# ----------------------------------------------------------------------------------- clean outputs
def test_save_protected_image_counts_like_comfyui_and_writes_only_pixels(comfy_inprocess):
    save = comfy_inprocess.node_classes["DiffPrivacy_SaveImageClean"]
    images = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(6))
    first = save.execute(images=images, filename_prefix="gate_clean/run").ui.as_dict()["images"]
    second = save.execute(images=images[:1], filename_prefix="gate_clean/run").ui.as_dict()["images"]
    assert [r["filename"] for r in first + second] == ["run_00001_.png", "run_00002_.png", "run_00003_.png"]
    assert {(r["subfolder"], r["type"]) for r in first + second} == {("gate_clean", "output")}
    folder = comfy_inprocess.output_dir / "gate_clean"
    assert sorted(os.listdir(folder)) == ["run_00001_.png", "run_00002_.png", "run_00003_.png"]  # no sidecar
    with Image.open(folder / "run_00002_.png") as png:
        assert png.info == {} and png.size == (32, 24)
        pixels = torch.from_numpy(np.array(png.convert("RGB"))).float() / 255.0
    torch.testing.assert_close(pixels, images[1], atol=0.5 / 255 + 1e-6, rtol=0)
