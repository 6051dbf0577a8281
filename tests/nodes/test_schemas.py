"""Frozen node interface: ids, display names, one category, a tooltip on every input, input names in order.

Saved workflows refer to nodes by id and map widget values by position: changing anything here breaks
users' files. Change this list only together with a node-replacement/migration plan.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui

FROZEN = {
    "DiffPrivacy_FaceAlign": ("Face Align", ["image", "size", "min_confidence", "selection", "face_numbers",
                                             "fallback", "match_threshold", "reference", "recognizer"]),
    "DiffPrivacy_MSIInvert": ("MSI Invert", ["model", "clip", "vae", "image", "mode", "steps", "learning_rate",
                                             "inversion_steps", "timesteps_per_step", "seed",
                                             "official_uint8_quirk", "clip_vision"]),
    "DiffPrivacy_EmbeddingScheduler": ("Embedding Scheduler", ["embeds", "null_conditioning", "task",
                                                               "switch_timestep"]),
    "DiffPrivacy_FaceRecognizerLoader": ("Face Recognizer Loader", ["recognizer_name", "kind"]),
    "DiffPrivacy_IdentityEnergyGuidance": ("Identity Energy Guidance", [
        "recognizer", "source", "mode", "step_schedule", "step_scale", "diversity_weight", "crop",
        "gradient_target", "max_grad_norm", "max_identity_similarity", "model", "vae", "conditioning"]),
    "DiffPrivacy_PrivacySampler": ("Privacy Sampler", ["model", "vae", "conditioning", "guidance", "steps",
                                                       "strength", "batch_size", "seed", "paste_below_timestep",
                                                       "image", "latent", "background_mask", "verifiers",
                                                       "embeds", "guidance_vae"]),
    "DiffPrivacy_FacePasteBack": ("Face Paste Back", ["faces", "alignment", "feather", "seam_colour_match"]),
    "DiffPrivacy_SaveKeys": ("Save Privacy Keys", ["embeds", "key_latent", "filename_prefix", "passphrase",
                                                   "allow_plaintext", "receipt", "alignment"]),
    "DiffPrivacy_LoadKeys": ("Load Privacy Keys", ["key_file", "passphrase", "allow_plaintext"]),
    "DiffPrivacy_Recover": ("Recover Original", ["model", "vae", "embeds", "key_latent"]),
    "DiffPrivacy_FaceVerifierLoader": ("Face Verifier Loader", ["verifier_name", "bound", "verifiers"]),
    "DiffPrivacy_SaveImageClean": ("Save Protected Image", ["images", "filename_prefix", "receipt"]),
    "DiffPrivacy_FaceSelectionPreview": ("Face Selection Preview", [
        "image", "selection", "face_numbers", "fallback", "match_threshold", "recognizer", "reference", "verifiers"]),
    "DiffPrivacy_ProtectFaces": ("Protect Faces", [
        "model", "clip", "vae", "recognizer", "image", "task", "speed", "selection", "face_numbers", "fallback",
        "match_threshold", "size", "msi_steps", "inversion_steps", "steps", "batch_size", "seed",
        "max_identity_similarity", "reference", "verifiers", "clip_vision", "guidance_vae"]),
    "DiffPrivacy_RecoverPhoto": ("Recover Photo", ["model", "clip", "vae", "keys", "image"]),
    "DiffPrivacy_SavePhotoKeys": ("Save Photo Keys", ["keys", "filename_prefix", "passphrase", "allow_plaintext",
                                                      "receipt"]),
}


#: output names, where outputs were appended since the first release (appended only, never reordered)
FROZEN_OUTPUTS = {
    "DiffPrivacy_FaceAlign": ["aligned", "alignment", "background_mask", "preview"],
    "DiffPrivacy_PrivacySampler": ["images", "latent", "receipt", "report", "preview"],
    "DiffPrivacy_IdentityEnergyGuidance": ["guidance", "guider"],
    "DiffPrivacy_FaceVerifierLoader": ["verifiers"],
    "DiffPrivacy_LoadKeys": ["embeds", "key_latent", "photo_keys"],
    "DiffPrivacy_ProtectFaces": ["images", "preview", "keys", "receipt", "report"],
    "DiffPrivacy_RecoverPhoto": ["photo", "faces"],
}


@pytest.fixture(scope="module")
def infos(comfy_inprocess):
    assert not comfy_inprocess.failed_custom_nodes
    classes = comfy_inprocess.node_classes
    ours = {k for k in classes if k.startswith("DiffPrivacy_")}
    assert ours == set(FROZEN), f"node ids changed: {sorted(ours ^ set(FROZEN))}"
    return {k: classes[k].GET_NODE_INFO_V1() for k in FROZEN}


@pytest.mark.parametrize("node_id", sorted(FROZEN))
def test_frozen_interface(infos, node_id):
    info = infos[node_id]
    display_name, inputs = FROZEN[node_id]
    assert info["display_name"] == display_name
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    assert order == inputs


@pytest.mark.parametrize("node_id", sorted(FROZEN_OUTPUTS))
def test_frozen_outputs(infos, node_id):
    assert infos[node_id]["output_name"] == FROZEN_OUTPUTS[node_id]


def test_one_category_and_tooltips_everywhere(infos):
    assert {info["category"] for info in infos.values()} == {"Diff-Privacy"}
    for node_id, info in infos.items():
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_passphrase_defaults_read_the_environment(infos):
    for node_id in ("DiffPrivacy_SaveKeys", "DiffPrivacy_LoadKeys", "DiffPrivacy_SavePhotoKeys"):
        assert infos[node_id]["input"]["required"]["passphrase"][1]["default"] == "env:DIFF_PRIVACY_PASSPHRASE"


def test_search_aliases_where_comfyui_lists_them(comfy_inprocess, infos):
    """ComfyUI versions whose io.Schema has search_aliases show every node under the privacy words people type;
    older ones (0.3.75) get schemas without the field instead of a TypeError at start-up."""
    import dataclasses
    from comfy_api.latest import io

    has_field = any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))
    for node_id, info in infos.items():
        aliases = info.get("search_aliases")
        if has_field:
            assert aliases and "face privacy" in aliases, node_id
            assert len(aliases) == len(set(aliases)), node_id
        else:
            assert not aliases, node_id
    if has_field:
        for node_id in ("DiffPrivacy_PrivacySampler", "DiffPrivacy_IdentityEnergyGuidance"):
            assert {"anonymize", "de-identify"} <= set(infos[node_id]["search_aliases"])
