"""Protect Faces, Face Selection Preview, Save Photo Keys and Recover Photo in ComfyUI's own executor, on the
generated group photo (three faces: a main face, a bystander at a fifth of its area, one cut by the border).

What is checked: every face changes and every pixel outside the faces is the input's, one key file per photo of
a batch, the whole photo comes back from the protected photo and its key file, and the quick node gives the
outcome the core pipeline (the CLI's path) gives for the same input.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import PASSPHRASE_ENV, assert_every_face_changed_and_nothing_else, face_masks, load_api, set_inputs

pytestmark = pytest.mark.comfyui

SIZE = 64
QUICK = {"size": SIZE, "msi_steps": 2, "inversion_steps": 4, "steps": 8, "batch_size": 2,
         "max_identity_similarity": 1.0}


def _png(folder, name: str, pixels: torch.Tensor) -> str:
    Image.fromarray((pixels.numpy() * 255 + 0.5).astype(np.uint8)).save(os.path.join(folder, name))
    return name


@pytest.fixture(scope="module")
def group(comfy_inprocess):
    """The group photo as the PNG LoadImage reads, and as the tensor it gives (uint8-rounded)."""
    from tests.support.group_photo import group_photo

    photo = group_photo()
    name = _png(comfy_inprocess.input_dir, "group.png", photo)
    with Image.open(comfy_inprocess.input_dir / name) as image:
        loaded = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return name, loaded


def quick_graph(comfy, photo: str, prefix: str, **widgets) -> dict:
    graph = copy.deepcopy(load_api("protect_faces_quick"))
    set_inputs(graph, "CheckpointLoaderSimple", ckpt_name=comfy.models.checkpoint_name)
    set_inputs(graph, "LoadImage", image=photo)
    set_inputs(graph, "DiffPrivacy_ProtectFaces", **{**QUICK, **widgets})
    set_inputs(graph, "DiffPrivacy_SaveImageClean", filename_prefix=prefix)
    set_inputs(graph, "DiffPrivacy_SavePhotoKeys", filename_prefix=prefix.replace("/", "_"))
    return graph


def _new_keys(comfy, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(comfy.models.keys)) - before)




@pytest.fixture(scope="module")
def quick_run(comfy_inprocess, group, monkeypatch_module):
    monkeypatch_module.setenv(PASSPHRASE_ENV, "a long test passphrase")
    name, _ = group
    os.makedirs(comfy_inprocess.models.keys, exist_ok=True)
    before = set(os.listdir(comfy_inprocess.models.keys))
    graph = quick_graph(comfy_inprocess, name, "quick/group")
    history = comfy_inprocess.run(graph)
    return graph, history, _new_keys(comfy_inprocess, before)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _saved(comfy, history, graph, class_type):
    (node,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    records = history["outputs"].get(node, {}).get("images", [])
    out = []
    for record in records:
        with Image.open(comfy.output_path(record)) as image:
            out.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0))
    return records, out


def test_every_face_changed_everything_else_identical(comfy_inprocess, group, quick_run):
    graph, history, keys = quick_run
    _, photo = group
    records, images = _saved(comfy_inprocess, history, graph, "DiffPrivacy_SaveImageClean")
    assert len(images) == QUICK["batch_size"] and all(i.shape == photo.shape for i in images)
    assert_every_face_changed_and_nothing_else(images, photo, 3)
    # the report sidecar lists all three faces as protected
    import json

    report = json.loads((comfy_inprocess.output_path(records[0]).with_suffix("")).with_suffix(".report.json")
                        .read_text())
    assert report["passed"] and [f["action"] for f in report["faces"]] == ["protected"] * 3
    # the three faces ran as one batch: ComfyUI's free memory holds the activations measured for them
    settings = report["settings"]
    assert settings["faces_in_one_batch"] == 3 and "MiB of activations per face" in settings["faces_in_one_batch_reason"]
    assert not settings["faces_in_one_batch_reason"].startswith("auto: 0 MiB")
    assert len(keys) == 1 and keys[0].endswith(".dpkey")


def test_the_quick_node_gives_the_core_pipelines_outcome(comfy_inprocess, group, quick_run, tiny_checkpoint,
                                                        comfyui_dir):
    """Same input, same settings: the core pipeline (the CLI's path, plain-Python backend) protects the same
    faces with results within the backends' numerical agreement, and writes the same kind of keys."""
    from core.diffusers_backend import DiffusersBackend
    from core.msi import MSIOptions
    from core.pipeline import ProtectOptions, protect_photo
    from core.recognizers import load_recognizer

    graph, history, _ = quick_run
    _, photo = group
    _, images = _saved(comfy_inprocess, history, graph, "DiffPrivacy_SaveImageClean")
    backend = DiffusersBackend.from_single_file(tiny_checkpoint, tokenizer_dir=comfyui_dir / "comfy" / "sd1_tokenizer")
    models = comfy_inprocess.models
    recognizer = load_recognizer(str(models.face_recognition / models.facenet_name), "auto")
    options = ProtectOptions.preset("anonymize", size=SIZE, msi=MSIOptions.preset("lite", steps=2),
                                    inversion_steps=4, sampling=dict(steps=8, batch_size=2),
                                    max_identity_similarity=1.0)
    core = protect_photo(backend, recognizer, photo, options)
    assert [f.number for f in core.faces] == [1, 2, 3]
    diff = (core.photos - torch.stack(images)).abs()
    assert float(diff.mean()) < 0.01 and float(diff.amax()) < 0.35, (float(diff.mean()), float(diff.amax()))


def test_recover_photo_restores_the_whole_photo(comfy_inprocess, group, quick_run):
    graph, history, keys = quick_run
    _, photo = group
    records, images = _saved(comfy_inprocess, history, graph, "DiffPrivacy_SaveImageClean")
    protected = comfy_inprocess.output_path(records[0])
    name = _png(comfy_inprocess.input_dir, "protected_group.png", images[0])
    recover = copy.deepcopy(load_api("recover"))
    set_inputs(recover, "CheckpointLoaderSimple", ckpt_name=comfy_inprocess.models.checkpoint_name)
    set_inputs(recover, "DiffPrivacy_LoadKeys", key_file=keys[0])
    set_inputs(recover, "LoadImage", image=name)
    # the single-face outputs of a three-face key file stop their branch with a pointer to Recover Photo
    (crop_node,) = [k for k, v in recover.items() if v["class_type"] == "DiffPrivacy_Recover"]
    for node_id in [k for k, v in recover.items() if k == crop_node or [crop_node, 0] in v["inputs"].values()]:
        del recover[node_id]
    history = comfy_inprocess.run(recover)
    _, (restored,) = _saved(comfy_inprocess, history, recover, "DiffPrivacy_SaveImageClean")
    assert protected.exists() and restored.shape == photo.shape
    _, masks = face_masks(photo)
    union = torch.stack(masks).amax(dim=0)
    assert torch.equal(restored[union == 0], photo[union == 0])
    for mask in masks:  # each face region now holds the recovered face, not the protected one
        inside = mask == 1
        assert (restored[inside] - images[0][inside]).abs().mean() > 0.01


def test_the_preview_numbers_faces_and_refuses_missing_numbers(comfy_inprocess, group):
    name, photo = group
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "DiffPrivacy_FaceSelectionPreview",
              "inputs": {"image": ["1", 0], "selection": "index", "face_numbers": "2", "fallback": "fail",
                         "match_threshold": -1.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    history = comfy_inprocess.run(graph)
    (record,) = history["outputs"]["3"]["images"]
    with Image.open(comfy_inprocess.output_path(record)) as image:
        assert image.size == (photo.shape[1], photo.shape[0])
    with pytest.raises(Exception) as err:
        bad = copy.deepcopy(graph)
        bad["2"]["inputs"]["face_numbers"] = "7"
        comfy_inprocess.run(bad)
    assert "do not exist" in str(err.value) and "3 face" in str(err.value)


def test_a_batch_of_photos_gives_a_key_file_per_photo(comfy_inprocess, group, monkeypatch_module):
    """An IMAGE batch of three photos: every photo is protected (not only the first), three key files."""
    monkeypatch_module.setenv(PASSPHRASE_ENV, "a long test passphrase")
    name, photo = group
    graph = quick_graph(comfy_inprocess, name, "quick/batch", batch_size=1, selection="largest")
    graph["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 3}}
    (protect,) = [k for k, v in graph.items() if v["class_type"] == "DiffPrivacy_ProtectFaces"]
    graph[protect]["inputs"]["image"] = ["20", 0]
    before = set(os.listdir(comfy_inprocess.models.keys))
    history = comfy_inprocess.run(graph)
    _, images = _saved(comfy_inprocess, history, graph, "DiffPrivacy_SaveImageClean")
    assert len(images) == 3 and len(_new_keys(comfy_inprocess, before)) == 3


def test_protect_faces_takes_a_guidance_vae(comfy_inprocess, group, monkeypatch, tmp_path):
    """Load VAE → taesd at Protect Faces' 'guidance_vae': the run passes the gate and its report names the guidance
    decoder (the checkpoint's VAE otherwise)."""
    import json

    from tests.nodes.helpers import offer_taesd

    offer_taesd(monkeypatch, tmp_path)
    monkeypatch.setenv(PASSPHRASE_ENV, "a long test passphrase")
    name, _ = group
    graph = quick_graph(comfy_inprocess, name, "quick/taesd")
    graph["900"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    (node,) = [k for k, v in graph.items() if v["class_type"] == "DiffPrivacy_ProtectFaces"]
    graph[node]["inputs"]["guidance_vae"] = ["900", 0]
    history = comfy_inprocess.run(graph)
    records, _ = _saved(comfy_inprocess, history, graph, "DiffPrivacy_SaveImageClean")
    report = json.loads((comfy_inprocess.output_path(records[0]).with_suffix("")).with_suffix(".report.json")
                        .read_text())
    assert report["passed"] and report["settings"]["guidance_decoder"] == "the VAE at 'guidance_vae'"
