"""The shipped workflows through a real ComfyUI server: POST /prompt, wait on /history, fetch with /view.

The server is ``main.py`` with the pack in ``custom_nodes`` (comfy_server fixture); the passphrase comes
from DIFF_PRIVACY_PASSPHRASE, which tests/nodes/helpers.py sets before the server starts. Widget changes
are the same CPU-size ones as test_workflows.py.
"""
from __future__ import annotations

import pytest

from .helpers import SIZE, astronaut_png, load_api, node_ids, png_info, saved_images, set_inputs, tiny

pytestmark = pytest.mark.comfyui


def _check_pngs(server, records, count, size):
    assert len(records) == count
    for record in records:
        data = server.view(record["filename"], record.get("subfolder", ""), record.get("type", "output"))
        assert png_info(data) == ("PNG", size)


def test_node_definitions_served(comfy_server):
    info = comfy_server.get_json("/object_info")
    ours = sorted(k for k in info if k.startswith("DiffPrivacy_"))
    assert len(ours) == 12
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
        if task == "anonymize":
            key_file = text.split(": ", 1)[1]

    graph = tiny(load_api("recover"), photo=photo, ckpt=comfy_server.models.checkpoint_name, prefix="http_recover")
    set_inputs(graph, "DiffPrivacy_LoadKeys", key_file=key_file)
    entry = comfy_server.run(graph, timeout=300)
    _check_pngs(comfy_server, saved_images(entry, graph), 1, (SIZE, SIZE))
