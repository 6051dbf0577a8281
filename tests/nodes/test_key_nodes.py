"""Save Privacy Keys' file naming: ``<prefix>_<NNNNN>.dpkey`` with the next free counter in the keys folder,
never replacing a file, also when another save takes a name between the listing and the write.

The helpers are the ones Save Privacy Keys' ``execute`` calls (``write_key_file``), taken from the pack as
ComfyUI imported it, with the default scrypt cost (the files are real key files).
"""
from __future__ import annotations

import hashlib
import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui

PASSPHRASE = "key naming passphrase (tests)"


@pytest.fixture(scope="module")
def keys_module(comfy_inprocess):
    return sys.modules[comfy_inprocess.node_classes["DiffPrivacy_SaveKeys"].__module__]


def _keys(keys_module, seed: int):
    """A small key set made with the pack's own classes (save_keys checks the type)."""
    KeyMetadata = sys.modules[keys_module.PrivacyKeys.__module__].KeyMetadata
    gen = torch.Generator().manual_seed(seed)
    return keys_module.PrivacyKeys(torch.randn(10, 768, generator=gen), torch.randn(10, 77, 768, generator=gen),
                                   torch.randn(1, 4, 8, 8, generator=gen),
                                   KeyMetadata(model_fingerprint="w1:naming", ddim_steps=4, schedule="recover",
                                               msi_mode="lite", image_size=(64, 64)))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_saves_with_one_prefix_make_two_files(comfy_inprocess, keys_module):
    """Back to back (well within one second, which the old time-stamped names could not tell apart)."""
    first = keys_module.write_key_file(_keys(keys_module, 1), "same_second", PASSPHRASE, False)
    digest = _digest(first)
    second = keys_module.write_key_file(_keys(keys_module, 2), "same_second", PASSPHRASE, False)
    assert (first.name, second.name) == ("same_second_00001.dpkey", "same_second_00002.dpkey")
    assert first.parent == second.parent == comfy_inprocess.models.keys
    assert _digest(first) == digest
    from core.keyfile import load_keys

    assert torch.equal(load_keys(first, PASSPHRASE).stage_tokens, _keys(keys_module, 1).stage_tokens)
    assert torch.equal(load_keys(second, PASSPHRASE).stage_tokens, _keys(keys_module, 2).stage_tokens)


def test_a_name_taken_meanwhile_is_skipped(comfy_inprocess, keys_module, monkeypatch):
    """A listing that is stale by the time of the write (another save took the name): core's save_keys refuses
    the existing name and the save retries with the next counter; the other file is untouched."""
    first = keys_module.write_key_file(_keys(keys_module, 3), "race", PASSPHRASE, False)
    digest = _digest(first)
    real_counter = keys_module.next_key_counter
    listings = []

    def stale_then_real(folder, prefix):
        listings.append(prefix)
        return 1 if len(listings) == 1 else real_counter(folder, prefix)

    monkeypatch.setattr(keys_module, "next_key_counter", stale_then_real)
    second = keys_module.write_key_file(_keys(keys_module, 4), "race", PASSPHRASE, False)
    assert (first.name, second.name) == ("race_00001.dpkey", "race_00002.dpkey")
    assert len(listings) == 2 and _digest(first) == digest


def test_retries_are_bounded(comfy_inprocess, keys_module, monkeypatch):
    attempts = []

    def always_taken(path, *args, **kwargs):
        attempts.append(path)
        raise keys_module.KeyFileExistsError(17, "exists", str(path))

    monkeypatch.setattr(keys_module, "save_keys", always_taken)
    with pytest.raises(keys_module.KeyFileExistsError, match="Save Privacy Keys"):
        keys_module.write_key_file(_keys(keys_module, 5), "bounded", PASSPHRASE, False)
    assert len(attempts) == keys_module.SAVE_ATTEMPTS
    assert len(set(attempts)) == len(attempts)  # a new name each time


@pytest.mark.parametrize("prefix, expected", [("face", "face"), ("my face/../x", "my_face_.._x"), ("..", "keys"),
                                              ("", "keys"), (".hidden", "hidden")])
def test_prefixes_become_plain_names(keys_module, prefix, expected):
    assert keys_module.safe_prefix(prefix) == expected


def test_a_whole_photo_key_file_blocks_the_single_face_outputs(comfy_inprocess, keys_module, monkeypatch):
    """Load Privacy Keys on a key file of two faces made with different settings (here: DDIM grids), which cannot
    form one N-face key-E: 'photo_keys' carries both; whatever is connected to embeds / key_latent stops with a
    message pointing to Recover Photo, instead of silently recovering one face."""
    key_types = sys.modules[keys_module.PrivacyKeys.__module__]
    geometry = [key_types.FaceGeometry(number=n, box=(0, 0, 10, 10), matrix=((1, 0, 0), (0, 1, 0)), crop_size=64,
                                       photo_size=(128, 128), quad=((0, 0), (0, 64), (64, 64), (64, 0)))
                for n in (1, 2)]
    other = _keys(keys_module, 8)
    other.metadata.ddim_steps = 8
    photo = key_types.PhotoKeys([_keys(keys_module, 7), other], geometry, (128, 128))
    path = keys_module.write_key_file(photo, "two_faces", PASSPHRASE, False)
    monkeypatch.setenv("DP_TEST_KEYS_PASS", PASSPHRASE)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_inprocess.models.checkpoint_name}},
        "2": {"class_type": "DiffPrivacy_LoadKeys", "inputs": {"key_file": path.name,
                                                               "passphrase": "env:DP_TEST_KEYS_PASS"}},
        "3": {"class_type": "DiffPrivacy_Recover", "inputs": {"model": ["1", 0], "vae": ["1", 2], "embeds": ["2", 0],
                                                              "key_latent": ["2", 1]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    history = comfy_inprocess.run(graph)
    errors = [data for event, data in comfy_inprocess.server.messages if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_id"] == "3", errors
    message = errors[0]["exception_message"]
    assert "holds the keys of 2 faces made with different settings" in message and "Recover Photo" in message
    assert "4" not in history["outputs"]  # nothing recovered, nothing shown
