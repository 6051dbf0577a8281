"""Bad inputs fail with clear, actionable errors through ComfyUI's validator/executor, and write nothing."""
from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import torch

from .conftest import ComfyGraphError
from .helpers import astronaut_png, coffee_png, load_api, node_ids, set_inputs, tiny

pytestmark = pytest.mark.comfyui


def _protect(comfy, task="anonymize", photo=None, prefix="err"):
    photo = photo or astronaut_png(comfy.input_dir)
    graph = tiny(load_api(task), photo=photo, ckpt=comfy.models.checkpoint_name, sampler_steps=4,
                 batch_size=2 if task == "anonymize" else None, prefix=prefix)
    return graph


def _outputs_with(comfy, prefix: str) -> list[str]:
    return [f for f in os.listdir(comfy.output_dir) if f.startswith(prefix)]


def test_missing_recognizer_weights_name_folder_and_file(comfy_inprocess):
    graph = _protect(comfy_inprocess)
    set_inputs(graph, "DiffPrivacy_FaceRecognizerLoader", recognizer_name="model_ir_se50.pth")
    # ComfyUI still runs the outputs that validate (Save Privacy Keys here), exactly as POST /prompt does;
    # the loader's error is reported in node_errors, which the frontend shows on the node
    valid, _, outputs, node_errors = asyncio.run(comfy_inprocess.execution.validate_prompt("missing", graph, None))
    (loader,) = node_ids(graph, "DiffPrivacy_FaceRecognizerLoader")
    assert loader in node_errors
    message = json.dumps(node_errors[loader], ensure_ascii=False)
    assert not [o for o in outputs if o in node_ids(graph, "SaveImage")]
    assert "face_recognition" in message
    assert "model_ir_se50.pth" in message
    assert "20180402-114759-vggface2.pt" in message  # what to download instead/as well


def test_photo_without_face_fails_and_writes_nothing(comfy_inprocess):
    graph = _protect(comfy_inprocess, photo=coffee_png(comfy_inprocess.input_dir), prefix="err_noface")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    assert info.value.details.get("exception_type", "").endswith("FaceNotFoundError")
    assert "No face found" in str(info.value)
    assert info.value.details.get("node_type") == "DiffPrivacy_FaceAlign"
    assert _outputs_with(comfy_inprocess, "err_noface") == []


def test_fail_closed_identity_check_writes_nothing(comfy_inprocess):
    graph = _protect(comfy_inprocess, prefix="err_failclosed")
    # cosine similarity is always > -1, so every result "still matches": the sampler must refuse to output
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=-1.0)
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    assert info.value.details.get("exception_type", "").endswith("ProtectionFailedError")
    assert _outputs_with(comfy_inprocess, "err_failclosed") == []


def test_faithful_msi_without_clip_vision(comfy_inprocess):
    graph = _protect(comfy_inprocess, prefix="err_faithful")
    set_inputs(graph, "DiffPrivacy_MSIInvert", mode="faithful")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    message = str(info.value)
    assert info.value.details.get("node_type") == "DiffPrivacy_MSIInvert"
    assert "clip_vision" in message and "Load CLIP Vision" in message and "lite" in message


def _key_set(fingerprint: str = "not-this-model", seed: int = 0):
    from core.keys import KeyMetadata, PrivacyKeys

    gen = torch.Generator().manual_seed(seed)
    return PrivacyKeys(torch.randn(10, 768, generator=gen), torch.randn(10, 77, 768, generator=gen),
                       torch.randn(1, 4, 8, 8, generator=gen),
                       KeyMetadata(model_fingerprint=fingerprint, ddim_steps=4, schedule="recover",
                                   msi_mode="lite", image_size=(64, 64)))


def _write_key_file(folder, passphrase: str | None, name: str = "err_wrong_pass.dpkey", **options) -> str:
    from core.keyfile import MIN_SCRYPT_N, save_keys

    path = save_keys(os.path.join(folder, name), _key_set(), passphrase, scrypt_n=MIN_SCRYPT_N, **options)
    return path.name


def _recover_graph(comfy, key_file: str, **load_inputs) -> dict:
    """The recover workflow on ``key_file``; ``load_inputs`` may add widgets the shipped file leaves out."""
    graph = tiny(load_api("recover"), photo="unused.png", ckpt=comfy.models.checkpoint_name, prefix="err_recover")
    for node_id in node_ids(graph, "DiffPrivacy_LoadKeys"):
        graph[node_id]["inputs"].update(key_file=key_file, **load_inputs)
    return graph


def _validation_errors(comfy, graph: dict, class_type: str) -> str:
    """ComfyUI's validation errors of the ``class_type`` node(s) as text; fails if the prompt would run."""
    valid, error, outputs, node_errors = asyncio.run(comfy.execution.validate_prompt("check", graph, None))
    assert not valid and outputs == [], f"the prompt would run outputs {outputs}"
    assert error["type"] == "prompt_outputs_failed_validation"
    ids = node_ids(graph, class_type)
    assert set(ids) & set(node_errors), node_errors
    return json.dumps([node_errors[i] for i in ids if i in node_errors], ensure_ascii=False)


def _keys_module(comfy):
    """The pack's nodes/keys.py as ComfyUI imported it (its error classes are the ones the nodes raise)."""
    return sys.modules[comfy.node_classes["DiffPrivacy_LoadKeys"].__module__]


def test_recover_with_wrong_passphrase(comfy_inprocess):
    key_file = _write_key_file(comfy_inprocess.models.keys, "the right passphrase")
    graph = _recover_graph(comfy_inprocess, key_file, passphrase="a wrong passphrase")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    assert info.value.details.get("exception_type", "").endswith("WrongPassphraseError")
    assert info.value.details.get("node_type") == "DiffPrivacy_LoadKeys"
    assert _outputs_with(comfy_inprocess, "err_recover") == []


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink"])
def test_load_refuses_files_outside_the_keys_folder(comfy_inprocess, tmp_path, case):
    """Only files inside the registered keys folders open: not an absolute path, not a '../' path, not a
    symbolic link in the folder that points outside. Refused at validation, and by execute itself."""
    outside = tmp_path / "outside.dpkey"
    _write_key_file(tmp_path, "the passphrase", name=outside.name)
    keys_dir = comfy_inprocess.models.keys
    if case == "absolute":
        name = str(outside)
    elif case == "dotdot":
        name = os.path.relpath(outside, keys_dir)
        assert name.startswith("..")
    else:
        name = "err_link.dpkey"
        if not (keys_dir / name).is_symlink():
            (keys_dir / name).symlink_to(outside)
    message = _validation_errors(comfy_inprocess, _recover_graph(comfy_inprocess, name, passphrase="the passphrase"),
                                 "DiffPrivacy_LoadKeys")
    assert "Load Privacy Keys: key_file must be a file in the keys folder" in message
    assert str(keys_dir) in message
    keys = _keys_module(comfy_inprocess)
    load = comfy_inprocess.node_classes["DiffPrivacy_LoadKeys"]
    with pytest.raises(keys.KeyFileLocationError, match="key_file must be a file in the keys folder"):
        load.execute(key_file=name, passphrase="the passphrase")
    if case == "symlink":  # the list the node offers leaves the link out as well
        assert name not in keys.list_key_files()
