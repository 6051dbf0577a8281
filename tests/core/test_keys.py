"""Recovery keys: validation of the key set and its metadata, compatibility checks and the payload bytes."""
from __future__ import annotations

import json
import sys

import pytest
import safetensors.torch
import torch

from core.errors import ForeignKeyFileError, KeyMismatchError
from core.keys import (
    METADATA_KEY,
    KeyMetadata,
    PrivacyKeys,
    check_compatible,
    keys_to_payload,
    payload_to_keys,
)
from tests.support.keys import assert_same_keys, make_keys, raises_exactly


# ---------------------------------------------------------------------------------------------- validation

def _meta(**kw) -> KeyMetadata:
    base = dict(model_fingerprint="abc", ddim_steps=50, schedule="recover", msi_mode="lite", image_size=(64, 64))
    base.update(kw)
    return KeyMetadata(**base)


@pytest.mark.parametrize(
    "tokens, conds, z, match",
    [
        ((9, 8), (10, 77, 8), (1, 4, 8, 8), "stage count"),
        ((10, 8), (10, 77, 6), (1, 4, 8, 8), "embedding width"),
        ((10, 8), (10, 76, 8), (1, 4, 8, 8), "77"),
        ((10, 8), (10, 77, 8), (1, 3, 8, 8), "z_T"),
        ((10, 8), (10, 77, 8), (4, 8, 8), "z_T"),
        ((10, 8, 1), (10, 77, 8), (1, 4, 8, 8), "stage_tokens"),
        ((5, 8), (5, 77, 8), (1, 4, 8, 8), "stage_width"),
    ],
)
def test_privacy_keys_shape_validation(tokens, conds, z, match):
    with pytest.raises(ValueError, match=match):
        PrivacyKeys(torch.zeros(tokens), torch.zeros(conds), torch.zeros(z), _meta())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_privacy_keys_reject_non_finite(bad):
    conds = torch.zeros(10, 77, 8)
    conds[4, 3, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        PrivacyKeys(torch.zeros(10, 8), conds, torch.zeros(1, 4, 2, 2), _meta())


def test_privacy_keys_reject_integer_tensors():
    with pytest.raises(ValueError, match="floating"):
        PrivacyKeys(torch.zeros(10, 8, dtype=torch.long), torch.zeros(10, 77, 8), torch.zeros(1, 4, 2, 2), _meta())


def test_five_stages_of_200_are_consistent():
    keys = PrivacyKeys(torch.zeros(5, 8), torch.zeros(5, 77, 8), torch.zeros(1, 4, 2, 2), _meta(stage_width=200))
    assert keys.num_stages == 5 and keys.embed_dim == 8


@pytest.mark.parametrize(
    "kw",
    [
        {"msi_mode": "fast"},
        {"ddim_steps": 0},
        {"ddim_steps": 50.0},
        {"model_fingerprint": " "},
        {"image_size": (64,)},
        {"image_size": (64, -1)},
        {"created": "yesterday"},
        {"created": "2024-05-01T12:00:00"},  # no UTC offset
        {"extra": {"a": 1}},
        {"stage_width": 0},
    ],
)
def test_metadata_validation(kw):
    with pytest.raises(ValueError):
        _meta(**kw)


def test_metadata_defaults_and_dict_round_trip():
    meta = _meta(image_size=[512, 384])
    assert meta.format_version == 1 and meta.stage_width == 100 and meta.extra == {}
    assert meta.image_size == (512, 384)
    assert meta.created.endswith("+00:00")
    assert KeyMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    with pytest.raises(ValueError, match="unexpected"):
        KeyMetadata.from_dict({**meta.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        KeyMetadata.from_dict({k: v for k, v in meta.to_dict().items() if k != "ddim_steps"})


def test_repr_shows_no_values():
    keys = make_keys()
    keys.stage_tokens[1, 1] = 123.456
    text = repr(keys) + str(keys)
    assert "123.4" not in text and "tensor" not in text
    assert "stages=10" in text


def test_to_moves_and_casts():
    keys = make_keys().to(dtype=torch.float64)
    assert keys.stage_conds.dtype == torch.float64 and keys.z_T.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- compatibility

def test_check_compatible():
    keys = make_keys()
    check_compatible(keys, "a1b2c3d4e5f6")
    check_compatible(keys, " A1B2C3D4E5F6 ", ddim_steps=50)  # hex case / whitespace do not matter
    with raises_exactly(KeyMismatchError, match="another model|loaded model") as info:
        check_compatible(keys, "ffffffffffff")
    assert "a1b2c3d4e5f6" in str(info.value) and "ffffffffffff" in str(info.value)
    with raises_exactly(KeyMismatchError, match="Set the recovery steps to 50"):
        check_compatible(keys, "a1b2c3d4e5f6", ddim_steps=100)
    with pytest.raises(ValueError):
        check_compatible(keys, "")


# ---------------------------------------------------------------------------------------------- payload

def test_payload_round_trip_is_bit_identical_and_deterministic():
    keys = make_keys()
    payload = keys_to_payload(keys)
    assert payload == keys_to_payload(keys)
    assert_same_keys(keys, payload_to_keys(payload))


def test_payload_that_is_not_a_key_set_is_foreign():
    other = safetensors.torch.save({"z_T": torch.zeros(1, 4, 2, 2)}, metadata={"x": "y"})
    with raises_exactly(ForeignKeyFileError, match="not a Diff-Privacy key set") as info:
        payload_to_keys(other, source="'mine.dpkey'")
    assert "'mine.dpkey'" in str(info.value)
    with raises_exactly(ForeignKeyFileError):
        payload_to_keys(b"\x00" * 4)


def test_newer_payload_format_refused():
    keys = make_keys()
    meta = keys.metadata.to_dict()
    meta["format_version"] = 2
    tensors = safetensors.torch.load(keys_to_payload(keys))
    payload = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    with raises_exactly(ForeignKeyFileError, match="Update the Diff-Privacy node pack"):
        payload_to_keys(payload)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
