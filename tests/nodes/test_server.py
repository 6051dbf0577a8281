"""The shipped workflows through a real ComfyUI server: POST /prompt, wait on /history, fetch with /view.

The server is ``main.py`` with the pack in ``custom_nodes`` (comfy_server fixture); the passphrase comes
from DIFF_PRIVACY_PASSPHRASE, which tests/nodes/helpers.py sets before the server starts. Widget changes
are the same CPU-size ones as test_workflows.py. Key files go to the models folder ``diff_privacy_keys``
(mapped by the fixture's extra_model_paths.yaml), which no HTTP route serves.
"""
from __future__ import annotations

import os

import pytest

from .conftest import ComfyGraphError
from .helpers import (SIZE, astronaut_png, load_api, node_ids, png_info, preview_ids, save_image_ids, saved_images,
                      set_inputs, tiny)

pytestmark = pytest.mark.comfyui


def _check_pngs(server, records, count, size):
    assert len(records) == count
    for record in records:
        data = server.view(record["filename"], record.get("subfolder", ""), record.get("type", "output"))
        assert png_info(data) == ("PNG", size)


def test_node_definitions_served(comfy_server):
    info = comfy_server.get_json("/object_info")
    from .test_schemas import FROZEN

    ours = sorted(k for k in info if k.startswith("DiffPrivacy_"))
    assert ours == sorted(FROZEN)
    assert comfy_server.get_json("/object_info/DiffPrivacy_FaceAlign")["DiffPrivacy_FaceAlign"]["display_name"] == \
        "Face Align"


def test_workflows_over_http(comfy_server, tmp_path):
    photo = comfy_server.upload_image(tmp_path / astronaut_png(tmp_path), name="astronaut_http.png")["name"]
    key_file = None
    for task, batch in (("anonymize", 2), ("hide", 1)):
        graph = tiny(load_api(task), photo=photo, ckpt=comfy_server.models.checkpoint_name, sampler_steps=4,
                     batch_size=batch, prefix=f"http_{task}")
        set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=1.0)
        entry = comfy_server.run(graph, timeout=600)
        _check_pngs(comfy_server, saved_images(entry, graph), batch, (512, 512))
        (key_node,) = node_ids(graph, "DiffPrivacy_SaveKeys")
        text = entry["outputs"][key_node]["text"][0]
        assert text.startswith("keys saved: ") and text.endswith(".dpkey")
        _check_key_file_not_served(comfy_server, text.split(": ", 1)[1])
        if task == "anonymize":
            key_file = text.split(": ", 1)[1]

    graph = tiny(load_api("recover"), photo=photo, ckpt=comfy_server.models.checkpoint_name, prefix="http_recover")
    set_inputs(graph, "DiffPrivacy_LoadKeys", key_file=key_file)
    entry = comfy_server.run(graph, timeout=300)
    face, photo = saved_images(entry, graph)  # Recover Original's aligned face, Recover Photo's whole photo
    _check_pngs(comfy_server, [face], 1, (SIZE, SIZE))
    _check_pngs(comfy_server, [photo], 1, (512, 512))


def _check_key_file_not_served(server, name: str) -> None:
    """The key file is in the models keys folder, nothing went to output/diff_privacy_keys (the old place), and
    /view hands it out under no type: output, input or temp, in the keys subfolder or at the top."""
    assert name.endswith(".dpkey") and (server.models.keys / name).is_file()
    assert not (server.output_dir / "diff_privacy_keys").exists()
    for kind in ("output", "input", "temp"):
        for subfolder in ("diff_privacy_keys", ""):
            response = server.get("/view", filename=name, type=kind, subfolder=subfolder)
            assert response.status_code != 200, (kind, subfolder, response.status_code)


def _rejected(server, graph: dict, class_type: str) -> dict:
    """POST /prompt must answer 400 with a node error on ``class_type``; returns ComfyUI's node errors."""
    with pytest.raises(ComfyGraphError) as info:
        server.queue(graph)
    assert "prompt rejected (400)" in str(info.value)
    errors = info.value.details.get("node_errors", {})
    assert set(node_ids(graph, class_type)) & set(errors), errors
    return errors


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink"])
def test_key_files_outside_the_keys_folder_are_refused_over_http(comfy_server, tmp_path, case):
    """Load Privacy Keys opens only files inside the keys folder: POST /prompt is answered 400 with the node's
    message, and the server keeps serving."""
    from core.keyfile import MIN_SCRYPT_N, save_keys
    from tests.support.keys import make_keys

    outside = save_keys(tmp_path / "outside_http.dpkey", make_keys(), "a passphrase", scrypt_n=MIN_SCRYPT_N)
    if case == "absolute":
        name = str(outside)
    elif case == "dotdot":
        name = os.path.relpath(outside, comfy_server.models.keys)
    else:
        name = "http_link.dpkey"
        link = comfy_server.models.keys / name
        if not link.is_symlink():
            link.symlink_to(outside)
    graph = tiny(load_api("recover"), photo="unused.png", ckpt=comfy_server.models.checkpoint_name, prefix="http_out")
    set_inputs(graph, "DiffPrivacy_LoadKeys", key_file=name, passphrase="a passphrase")
    message = str(_rejected(comfy_server, graph, "DiffPrivacy_LoadKeys"))
    assert "Load Privacy Keys: key_file must be a file in the keys folder" in message
    assert comfy_server.process.poll() is None
    assert comfy_server.get("/system_stats").status_code == 200


def test_save_without_its_passphrase_variable_is_refused_over_http(comfy_server, tmp_path):
    """A prompt whose only output is Save Privacy Keys, reading an environment variable the server does not
    have, is refused whole (400) before anything runs: no key file appears."""
    photo = comfy_server.upload_image(tmp_path / astronaut_png(tmp_path), name="astronaut_http.png")["name"]
    graph = tiny(load_api("anonymize"), photo=photo, ckpt=comfy_server.models.checkpoint_name)
    for node_id in save_image_ids(graph) + preview_ids(graph):
        del graph[node_id]
    set_inputs(graph, "DiffPrivacy_SaveKeys", passphrase="env:DIFF_PRIVACY_TEST_VARIABLE_NEVER_SET")
    before = sorted(os.listdir(comfy_server.models.keys))
    errors = _rejected(comfy_server, graph, "DiffPrivacy_SaveKeys")
    assert set(errors) == set(node_ids(graph, "DiffPrivacy_SaveKeys"))  # nothing else is wrong
    message = str(errors)
    assert "Save Privacy Keys: passphrase reads the environment variable DIFF_PRIVACY_TEST_VARIABLE_NEVER_SET" \
        in message
    assert comfy_server.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    assert sorted(os.listdir(comfy_server.models.keys)) == before
