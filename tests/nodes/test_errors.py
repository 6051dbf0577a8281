"""Bad inputs fail with clear, actionable errors through ComfyUI's validator/executor, and write nothing."""
from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import torch

from .conftest import ComfyGraphError
from .helpers import astronaut_png, coffee_png, load_api, node_ids, preview_ids, save_image_ids, set_inputs, tiny

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
    assert "Load Privacy Keys" in str(info.value) and "invisible" not in str(info.value)
    assert _outputs_with(comfy_inprocess, "err_recover") == []


def test_wrong_passphrase_with_surrounding_whitespace_says_so(comfy_inprocess):
    key_file = _write_key_file(comfy_inprocess.models.keys, "the right passphrase", name="err_ws.dpkey")
    with pytest.raises(ComfyGraphError) as info:
        comfy_inprocess.run(_recover_graph(comfy_inprocess, key_file, passphrase="the right passphrase\n"))
    assert info.value.details.get("exception_type", "").endswith("WrongPassphraseError")
    assert "ends with U+000A" in str(info.value) and "remove it" in str(info.value)


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


def test_plaintext_key_files_need_the_opt_in(comfy_inprocess):
    key_file = _write_key_file(comfy_inprocess.models.keys, None, name="err_plain.dpkey", allow_plaintext=True)
    for passphrase in ("", "some passphrase"):  # a passphrase does not make a plaintext file acceptable
        message = _validation_errors(comfy_inprocess, _recover_graph(comfy_inprocess, key_file, passphrase=passphrase),
                                     "DiffPrivacy_LoadKeys")
        assert "is not encrypted" in message and "switch on allow_plaintext on the Load Privacy Keys node" in message
    keys_module = _keys_module(comfy_inprocess)
    load = comfy_inprocess.node_classes["DiffPrivacy_LoadKeys"]
    with pytest.raises(keys_module.PlaintextKeyFileError, match="allow_plaintext on the Load Privacy Keys"):
        load.execute(key_file=key_file, passphrase="some passphrase")  # the widget's default is off
    comfy_inprocess.validate(_recover_graph(comfy_inprocess, key_file, passphrase="", allow_plaintext=True))
    embeds, latent, _ = load.execute(key_file=key_file, passphrase="", allow_plaintext=True).args
    expected = _key_set()
    assert torch.equal(embeds.stage_conds, expected.stage_conds)
    assert latent["samples"].shape == (1, 4, 8, 8)


def _keys_only_graph(comfy, **save_inputs) -> dict:
    """The anonymize workflow with Save Privacy Keys as its only output (its image-saving and preview nodes
    removed)."""
    graph = _protect(comfy, prefix="err_keys_only")
    for node_id in save_image_ids(graph) + preview_ids(graph):
        del graph[node_id]
    return set_inputs(graph, "DiffPrivacy_SaveKeys", **save_inputs)


UNSET_VARIABLE = "DIFF_PRIVACY_TEST_VARIABLE_NEVER_SET"


@pytest.mark.parametrize("passphrase, allow_plaintext, expected", [
    (f"env:{UNSET_VARIABLE}", False, f"environment variable {UNSET_VARIABLE}, which is not set"),
    (f"env:{UNSET_VARIABLE}", True, f"environment variable {UNSET_VARIABLE}, which is not set"),
    ("", False, "switch on allow_plaintext on the Save Privacy Keys node"),
    ("trailing space ", False, "ends with U+0020 SPACE"),
    ("\u200bzero width", False, "starts with U+200B ZERO WIDTH SPACE"),
])
def test_save_refuses_unusable_passphrases_before_anything_runs(comfy_inprocess, passphrase, allow_plaintext,
                                                                 expected):
    assert UNSET_VARIABLE not in os.environ
    graph = _keys_only_graph(comfy_inprocess, passphrase=passphrase, allow_plaintext=allow_plaintext)
    before = sorted(os.listdir(comfy_inprocess.models.keys))
    message = _validation_errors(comfy_inprocess, graph, "DiffPrivacy_SaveKeys")
    assert "Save Privacy Keys" in message and expected in message
    comfy_inprocess.server.messages.clear()
    with pytest.raises(ComfyGraphError, match="failed validation"):
        comfy_inprocess.run(graph)
    assert not [event for event, _ in comfy_inprocess.server.messages if event.startswith("execut")]
    assert sorted(os.listdir(comfy_inprocess.models.keys)) == before


def test_save_passphrase_errors_at_run_time_name_the_node(comfy_inprocess):
    """The same checks guard execute (a passphrase from a linked input is only known there)."""
    keys = _keys_module(comfy_inprocess)
    with pytest.raises(keys.PassphraseRequiredError, match=f"Save Privacy Keys: passphrase reads the environment "
                                                           f"variable {UNSET_VARIABLE}"):
        keys.save_passphrase(f"env:{UNSET_VARIABLE}", allow_plaintext=True)
    with pytest.raises(keys.PassphraseRequiredError, match="allow_plaintext on the Save Privacy Keys node"):
        keys.save_passphrase("", allow_plaintext=False)
    with pytest.raises(keys.PassphraseFormatError, match="invisible character"):
        keys.save_passphrase("\tpassphrase", allow_plaintext=False)
    assert keys.save_passphrase("", allow_plaintext=True) is None
    assert keys.save_passphrase(" inner spaces are fine ".strip(), allow_plaintext=False) == "inner spaces are fine"
