"""Bad inputs fail with clear, actionable errors through ComfyUI's validator/executor, and write nothing."""
from __future__ import annotations

import asyncio
import json
import os

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
    # ComfyUI runs only the outputs that validate, exactly as POST /prompt does; both savers depend on the
    # Privacy Sampler (Save Privacy Keys through its receipt), so nothing runs. The loader's error is reported
    # in node_errors, which the frontend shows on the node
    valid, _, outputs, node_errors = asyncio.run(comfy_inprocess.execution.validate_prompt("missing", graph, None))
    (loader,) = node_ids(graph, "DiffPrivacy_FaceRecognizerLoader")
    assert loader in node_errors
    message = json.dumps(node_errors[loader], ensure_ascii=False)
    assert not valid and outputs == []
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


def _write_key_file(folder, passphrase: str) -> str:
    from core.keyfile import save_keys
    from core.keys import KeyMetadata, PrivacyKeys

    gen = torch.Generator().manual_seed(0)
    keys = PrivacyKeys(torch.randn(10, 768, generator=gen), torch.randn(10, 77, 768, generator=gen),
                       torch.randn(1, 4, 8, 8, generator=gen),
                       KeyMetadata(model_fingerprint="not-this-model", ddim_steps=4, schedule="recover",
                                   msi_mode="lite", image_size=(64, 64)))
    path = save_keys(os.path.join(folder, "diff_privacy_keys", "err_wrong_pass.dpkey"), keys, passphrase)
    return path.name


def test_recover_with_wrong_passphrase(comfy_inprocess):
    key_file = _write_key_file(str(comfy_inprocess.output_dir), "the right passphrase")
    graph = tiny(load_api("recover"), photo="unused.png", ckpt=comfy_inprocess.models.checkpoint_name,
                 prefix="err_recover")
    set_inputs(graph, "DiffPrivacy_LoadKeys", key_file=key_file, passphrase="a wrong passphrase")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(graph)
    assert info.value.details.get("exception_type", "").endswith("WrongPassphraseError")
    assert info.value.details.get("node_type") == "DiffPrivacy_LoadKeys"
    assert _outputs_with(comfy_inprocess, "err_recover") == []
