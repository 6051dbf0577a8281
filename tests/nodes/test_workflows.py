"""The shipped workflows run in ComfyUI's own executor (in this process, under its torch.inference_mode()).

Each test takes the API-format file from ``workflows/api/``, changes only what CPU tests must change (the
tiny checkpoint, the astronaut photo, 64 px alignment, a few MSI/inversion/sampler steps, batch 2) and runs
the rest as shipped. With random weights a result can still "match" the source, so the anonymize run sets
``max_identity_similarity`` to 1 (the fail-closed check itself is exercised in test_errors.py).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from .helpers import SIZE, astronaut_png, load_api, node_ids, saved_images, set_inputs, tiny

pytestmark = pytest.mark.comfyui

SAMPLER_STEPS = 4  # DDIM grid of 4: strength 0.6 → 2 denoising steps, 0.8 → 3
BATCH = 2


def _keys_dir(comfy) -> str:
    return str(comfy.models.keys)  # diff_privacy_keys, mapped by the test's extra_model_paths.yaml


def protect_graph(comfy, task: str, prefix: str) -> dict:
    photo = astronaut_png(comfy.input_dir)
    graph = tiny(load_api(task), photo=photo, ckpt=comfy.models.checkpoint_name, sampler_steps=SAMPLER_STEPS,
                 batch_size=BATCH if task == "anonymize" else None, prefix=prefix)
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=1.0)
    return graph


def run_and_find_key(comfy, graph: dict) -> tuple[dict, str]:
    before = set(os.listdir(_keys_dir(comfy))) if os.path.isdir(_keys_dir(comfy)) else set()
    history = comfy.run(graph)
    new = sorted(set(os.listdir(_keys_dir(comfy))) - before)
    assert len(new) == 1, f"expected one new key file, found {new}"
    return history, new[0]


@pytest.fixture(scope="module")
def anonymize_run(comfy_inprocess):
    graph = protect_graph(comfy_inprocess, "anonymize", "wf_anonymize")
    history, key_file = run_and_find_key(comfy_inprocess, graph)
    return graph, history, key_file


def _check_images(comfy, records, count, size):
    assert len(records) == count
    for record in records:
        path = comfy.output_path(record)
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == size
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 1.0


def test_anonymize_outputs_full_photos_and_encrypted_keys(comfy_inprocess, anonymize_run):
    from core.keyfile import inspect_key_file

    graph, history, key_file = anonymize_run
    # Face Paste Back puts each protected crop back into the 512x512 astronaut photo
    _check_images(comfy_inprocess, saved_images(history, graph), BATCH, (512, 512))
    info = inspect_key_file(os.path.join(_keys_dir(comfy_inprocess), key_file))
    assert info["encrypted"] is True
    assert info["kdf"]["name"] == "scrypt"
    (key_node,) = node_ids(graph, "DiffPrivacy_SaveKeys")
    assert key_file in history["outputs"][key_node]["text"][0]


def test_saved_pngs_carry_no_metadata_and_a_report_sidecar(comfy_inprocess, anonymize_run):
    """Save Protected Image writes plain PNGs (no workflow, no prompt, so no source file name) and, from
    Privacy Sampler's receipt, the privacy report next to each one."""
    import json

    graph, history, _ = anonymize_run
    records = saved_images(history, graph)
    assert len(records) == BATCH
    for record in records:
        path = comfy_inprocess.output_path(record)
        data = path.read_bytes()
        with Image.open(path) as image:
            assert image.info == {} and image.text == {}
        for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"astronaut", b"prompt", b"workflow"):
            assert chunk not in data, chunk
        sidecar = path.with_name(path.stem + ".report.json")
        text = sidecar.read_text(encoding="utf-8")
        assert "astronaut" not in text
        report = json.loads(text)
        assert report["format"] == "diffprivacy-report" and report["task"] == "anonymize" and report["passed"]
        assert report["model"]["unet"].startswith("w1:")
        assert report["settings"]["sampling"]["batch_size"] == BATCH
        (face,) = report["faces"]
        assert [s["sample"] for s in face["scores"]] == list(range(BATCH))
        assert {s["recognizer"] for s in face["scores"]} == {"facenet_vggface2"}
        assert all(s["passed"] and -1 <= s["cosine"] <= 1 for s in face["scores"])
        assert len(face["face_detected"]) == BATCH and face["box"] == [0, 0, SIZE, SIZE]
        assert len(report["outside_faces"]) == BATCH  # the shipped graph connects Face Align's background mask


def test_hide_outputs_one_photo(comfy_inprocess):
    graph = protect_graph(comfy_inprocess, "hide", "wf_hide")
    set_inputs(graph, "DiffPrivacy_MSIInvert", seed=24)  # its own keys, not anonymize's cached ones
    history, key_file = run_and_find_key(comfy_inprocess, graph)
    _check_images(comfy_inprocess, saved_images(history, graph), 1, (512, 512))
    assert key_file.startswith("hide_")


def test_recover_from_the_anonymize_keys(comfy_inprocess, anonymize_run):
    """recover.json restores the aligned face (Recover Original) and the whole photo (Recover Photo, from the
    protected photo and the geometry Save Privacy Keys stored from Face Align's alignment)."""
    graph, history, key_file = anonymize_run
    protected = comfy_inprocess.output_path(saved_images(history, graph)[0])
    (comfy_inprocess.input_dir / "protected_wf.png").write_bytes(protected.read_bytes())
    recover = tiny(load_api("recover"), photo="protected_wf.png", ckpt=comfy_inprocess.models.checkpoint_name,
                   prefix="wf_recover")
    set_inputs(recover, "DiffPrivacy_LoadKeys", key_file=key_file)
    out = comfy_inprocess.run(recover)
    face, photo = saved_images(out, recover)
    _check_images(comfy_inprocess, [face], 1, (SIZE, SIZE))  # the aligned crop: Face Align's size
    _check_images(comfy_inprocess, [photo], 1, (512, 512))  # the whole photo
    with Image.open(comfy_inprocess.output_path(photo)) as a, Image.open(protected) as b:
        restored, given = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    changed = np.any(restored != given, axis=-1)
    assert 0 < changed.mean() < 0.2  # only the face region was replaced
