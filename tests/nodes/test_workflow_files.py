"""The workflow files themselves: UI format 0.4 that the frontend loads, and API files describing the same graph.

The UI → API mapping uses the live node definitions of the loaded ComfyUI (the /object_info data), so a
widget added, removed or reordered in a node's schema breaks this test before it breaks users' workflows.
"""
from __future__ import annotations

import pytest

from .helpers import (PASSPHRASE_ENV, WORKFLOW_NAMES, load_api, load_workflow, object_info_inprocess,
                      ui_to_api, without_meta)

pytestmark = pytest.mark.comfyui

PACK_ID = "diff-privacy-nodes"


@pytest.fixture(scope="module")
def object_info(comfy_inprocess):
    types = {node["type"] for name in WORKFLOW_NAMES for node in load_workflow(name)["nodes"]}
    types -= {"Note", "MarkdownNote"}
    missing = types - set(comfy_inprocess.node_classes)
    assert not missing, f"workflow node types unknown to ComfyUI: {missing}"
    return object_info_inprocess(comfy_inprocess.node_classes, types)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_and_api_describe_the_same_graph(object_info, name):
    assert without_meta(ui_to_api(load_workflow(name), object_info)) == without_meta(load_api(name))


#: loader nodes whose first widget names a model file
MODEL_LOADERS = {"CheckpointLoaderSimple", "CLIPVisionLoader", "DiffPrivacy_FaceRecognizerLoader",
                 "DiffPrivacy_FaceVerifierLoader"}


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_structure(name):
    wf = load_workflow(name)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in wf["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind == nodes[target]["inputs"][target_slot]["type"]
    for node in wf["nodes"]:
        for field in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert field in node, (node["id"], field)
        if node["type"].startswith("DiffPrivacy_"):
            assert node["properties"]["Node name for S&R"] == node["type"]
            assert node["properties"]["cnr_id"] == PACK_ID
    by_dir = {m["directory"]: m for m in wf["models"]}
    assert set(by_dir) >= {"checkpoints"}
    assert all(m["url"].startswith("https://") and m["name"] for m in wf["models"])
    if name != "recover":
        assert by_dir["face_recognition"]["name"] == "20180402-114759-vggface2.pt"
    # The frontend's missing-models dialog reads each loader's properties.models: every file a loader names is
    # listed there (name, folder, source page) exactly as in the workflow's top-level models list.
    by_name = {m["name"]: m for m in wf["models"]}
    loaders = [n for n in wf["nodes"] if n["type"] in MODEL_LOADERS]
    assert loaders
    for node in loaders:
        listed = node["properties"].get("models")
        assert listed == [by_name[node["widgets_values"][0]]], (node["type"], listed)


@pytest.mark.parametrize("name, values", [
    ("anonymize", {"DiffPrivacy_PrivacySampler": {"steps": 50, "strength": 0.6, "batch_size": 4, "seed": 125},
                   "DiffPrivacy_EmbeddingScheduler": {"task": "anonymize"},
                   "DiffPrivacy_IdentityEnergyGuidance": {"mode": "anonymize"},
                   "DiffPrivacy_MSIInvert": {"mode": "lite"}}),
    ("hide", {"DiffPrivacy_PrivacySampler": {"steps": 100, "strength": 0.8, "batch_size": 1, "seed": 100162},
              "DiffPrivacy_EmbeddingScheduler": {"task": "hide"},
              "DiffPrivacy_IdentityEnergyGuidance": {"mode": "hide"},
              "DiffPrivacy_FaceRecognizerLoader": {"recognizer_name": "20180402-114759-vggface2.pt"}}),
    ("recover", {}),
    ("protect_faces_quick", {"DiffPrivacy_ProtectFaces": {"task": "anonymize", "speed": "default", "selection": "all",
                                                          "size": 512, "msi_steps": 0, "inversion_steps": 50, "steps": 0,
                                                          "batch_size": 0, "seed": -1}}),
])
def test_paper_settings_and_passphrase_source(name, values):
    api = load_api(name)
    for class_type, expected in values.items():
        (node,) = [n for n in api.values() if n["class_type"] == class_type]
        assert {k: node["inputs"][k] for k in expected} == expected
    passphrases = [n["inputs"]["passphrase"] for n in api.values() if "passphrase" in n["inputs"]]
    assert passphrases == [f"env:{PASSPHRASE_ENV}"]
    seeds = [n for n in load_workflow(name)["nodes"] if n["type"] in ("DiffPrivacy_PrivacySampler",
                                                                        "DiffPrivacy_MSIInvert")]
    for node in seeds:  # the control_after_generate value follows the seed and keeps the paper's seeds
        assert "fixed" in node["widgets_values"]
