"""Recovery-key files: round trips, encryption at rest and one precise error per kind of damage."""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import safetensors.torch
import torch

from core import keyfile as KF
from core.errors import (
    DamagedKeyFileError,
    ForeignKeyFileError,
    KeyDerivationCostError,
    KeyFileExistsError,
    PassphraseRequiredError,
    PlaintextKeyFileError,
    TamperedKeyFileError,
    TruncatedKeyFileError,
    WrongPassphraseError,
)
from core.keyfile import decode_keys, encode_keys, inspect_key_file, load_keys, save_keys
from core.keys import PrivacyKeys, keys_to_payload
from tests.support.keys import (
    assert_same_keys,
    bits,
    decrypt_by_hand,
    encode_by_hand,
    frame_for,
    header_json,
    make_keys,
    raises_exactly,
    reframe,
    split_key_file,
)

FAST_N = KF.MIN_SCRYPT_N
PASS = "correct horse battery staple"


def assert_not_about_the_passphrase(message: str) -> None:
    """A damage report may say that it is *not* a passphrase problem, and nothing else about the passphrase."""
    assert "passphrase" not in message.lower().replace("not a passphrase problem", ""), message


def listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def keys() -> PrivacyKeys:
    return make_keys()


@pytest.fixture(scope="module")
def enc_blob(keys) -> bytes:
    return encode_keys(keys, PASS, scrypt_n=FAST_N)


@pytest.fixture(scope="module")
def plain_blob(keys) -> bytes:
    return encode_keys(keys, None, allow_plaintext=True)


# ---------------------------------------------------------------------------------------------- round trips

def test_round_trip_encrypted_file_bit_identical(tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    assert path == tmp_path / "k.dpkey"
    raw = path.read_bytes()
    assert raw.startswith(b"DIFFPRIV-KEY\x00\x02")  # documented: magic, container version 2
    # The ciphertext must not contain the float32 bytes of the tensors nor the metadata text.
    assert bits(keys.stage_conds)[3, 10:14].numpy().tobytes() not in raw
    assert b"a1b2c3d4e5f6" not in raw and b"recover" not in raw
    assert_same_keys(keys, load_keys(path, PASS))


def test_round_trip_plaintext_file(tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, None, allow_plaintext=True)
    loaded = load_keys(path, None, allow_plaintext=True)
    assert_same_keys(keys, loaded)
    # With the opt-in, a passphrase given for a plaintext file is irrelevant.
    assert_same_keys(keys, load_keys(path, "anything", allow_plaintext=True))
    assert inspect_key_file(path)["encrypted"] is False


@pytest.mark.parametrize("passphrase", [None, PASS])
def test_plaintext_file_refused_without_opt_in(tmp_path, keys, plain_blob, passphrase):
    """Anyone can write a plaintext file, so loading one needs allow_plaintext, even with a passphrase given."""
    path = save_keys(tmp_path / "plain.dpkey", keys, None, allow_plaintext=True)
    with raises_exactly(PlaintextKeyFileError, match="allow_plaintext") as info:
        load_keys(path, passphrase)
    assert "plain.dpkey" in str(info.value)
    with raises_exactly(PlaintextKeyFileError):
        decode_keys(plain_blob, passphrase)


def test_plaintext_bytes_are_deterministic(keys):
    assert encode_keys(keys, None, allow_plaintext=True) == encode_keys(keys, None, allow_plaintext=True)


def test_round_trip_full_size_default_scrypt(tmp_path):
    keys = make_keys(dim=768, latent=(64, 64), seed=1)
    path = save_keys(tmp_path / "full.dpkey", keys, PASS)
    info = inspect_key_file(path)
    # The documented defaults (module docstring): container version 2, scrypt n = 131072, r = 8, p = 1.
    assert info["version"] == 2
    assert info["kdf"] == {"name": "scrypt", "n": 2 ** 17, "r": 8, "p": 1}
    assert_same_keys(keys, load_keys(path, PASS))


def test_half_precision_non_contiguous_input_round_trips():
    base = make_keys(dim=8)
    keys = PrivacyKeys(
        base.stage_tokens.clamp(-1e4, 1e4).t().contiguous().t().to(torch.float16),  # non-contiguous fp16
        base.stage_conds.to(torch.bfloat16),
        base.z_T.transpose(2, 3),
        base.metadata,
    )
    assert not keys.stage_tokens.is_contiguous()
    loaded = decode_keys(encode_keys(keys, PASS, scrypt_n=FAST_N), PASS)
    assert_same_keys(keys, loaded)  # fp16/bf16 → fp32 is exact


def test_batched_z_T_round_trips():
    keys = make_keys(batch=3, latent=(4, 6))
    loaded = decode_keys(encode_keys(keys, PASS, scrypt_n=FAST_N), PASS)
    assert loaded.z_T.shape == (3, 4, 4, 6)
    assert_same_keys(keys, loaded)


def test_scrypt_params_are_read_from_the_header(keys):
    blob = encode_keys(keys, PASS, scrypt_n=2 ** 13)
    assert split_key_file(blob)[1]["kdf"]["n"] == 2 ** 13
    assert_same_keys(keys, decode_keys(blob, PASS))


def test_two_saves_differ(tmp_path, keys):
    a = save_keys(tmp_path / "a.dpkey", keys, PASS, scrypt_n=FAST_N).read_bytes()
    b = save_keys(tmp_path / "b.dpkey", keys, PASS, scrypt_n=FAST_N).read_bytes()
    (_, ha, _, pa), (_, hb, _, pb) = split_key_file(a), split_key_file(b)
    assert ha["kdf"]["salt_b64"] != hb["kdf"]["salt_b64"]
    assert ha["nonce_b64"] != hb["nonce_b64"]
    assert ha["verifier_b64"] != hb["verifier_b64"]
    assert len(pa) == len(pb)
    # Different keystreams: essentially no byte positions agree (≈ 1/256 by chance).
    same = sum(x == y for x, y in zip(pa[:4096], pb[:4096]))
    assert same < 64
    assert_same_keys(load_keys(tmp_path / "a.dpkey", PASS), load_keys(tmp_path / "b.dpkey", PASS))


# ---------------------------------------------------------------------------------------------- passphrases

def test_wrong_passphrase_detected_before_decrypting(monkeypatch, enc_blob):
    calls = []

    real = KF.AESGCM

    class SpyAESGCM:
        def __init__(self, key):
            self._inner = real(key)

        def decrypt(self, *a, **kw):
            calls.append(1)
            return self._inner.decrypt(*a, **kw)

    monkeypatch.setattr(KF, "AESGCM", SpyAESGCM)
    with raises_exactly(WrongPassphraseError, match="passphrase does not open"):
        decode_keys(enc_blob, PASS + "!")
    with raises_exactly(WrongPassphraseError):
        decode_keys(enc_blob, PASS.upper())
    assert calls == []
    decode_keys(enc_blob, PASS)
    assert calls == [1]


def test_wrong_passphrase_on_file_names_the_file(tmp_path, keys):
    path = save_keys(tmp_path / "mine.dpkey", keys, PASS, scrypt_n=FAST_N)
    with raises_exactly(WrongPassphraseError) as info:
        load_keys(path, "nope")
    assert "mine.dpkey" in str(info.value)
    assert "nope" not in str(info.value)


@pytest.mark.parametrize("missing", [None, ""])
def test_passphrase_required_for_encrypted_file(tmp_path, keys, missing):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    with raises_exactly(PassphraseRequiredError, match="encrypted"):
        load_keys(path, missing)


def test_plaintext_refused_without_opt_out(tmp_path, keys):
    target = tmp_path / "k.dpkey"
    with raises_exactly(PassphraseRequiredError, match="allow_plaintext=True"):
        save_keys(target, keys, None)
    with raises_exactly(PassphraseRequiredError, match="allow_plaintext=True"):
        encode_keys(keys, None)
    assert not target.exists()


@pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
def test_empty_passphrase_refused_even_with_opt_out(tmp_path, keys, empty):
    target = tmp_path / "k.dpkey"
    with raises_exactly(PassphraseRequiredError, match="empty"):
        save_keys(target, keys, empty, allow_plaintext=True, scrypt_n=FAST_N)
    assert not target.exists()


def test_nfc_nfd_passphrases_are_equivalent(keys):
    nfc = unicodedata.normalize("NFC", "Café crème – Ångström")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd and nfc.encode() != nfd.encode()
    blob = encode_keys(keys, nfd, scrypt_n=FAST_N)
    assert_same_keys(keys, decode_keys(blob, nfc))
    assert_same_keys(keys, decode_keys(blob, nfd))
    with raises_exactly(WrongPassphraseError):
        decode_keys(blob, "Cafe creme – Angstrom")


def test_non_string_passphrase_is_a_type_error(keys, enc_blob):
    with pytest.raises(TypeError):
        encode_keys(keys, b"bytes", scrypt_n=FAST_N)
    with pytest.raises(TypeError):
        decode_keys(enc_blob, b"bytes")


@pytest.mark.parametrize("n", [2 ** 12 + 1, 2 ** 11, 2 ** 21, 3000])
def test_bad_scrypt_n_refused(keys, n):
    with pytest.raises(ValueError, match="scrypt n"):
        encode_keys(keys, PASS, scrypt_n=n)


# ---------------------------------------------------------------------------------------------- tampering

@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_tampered_ciphertext_byte(enc_blob, where):
    prefix_len = len(enc_blob) - len(split_key_file(enc_blob)[3])
    pos = {"first": prefix_len, "middle": (prefix_len + len(enc_blob)) // 2, "tag": len(enc_blob) - 1}[where]
    bad = bytearray(enc_blob)
    bad[pos] ^= 0x01
    with raises_exactly(TamperedKeyFileError, match="integrity"):
        decode_keys(bytes(bad), PASS)


# Header edits, each as header dict → new header bytes. A deliberate forger re-frames the file with a recomputed
# header check, so the edit reaches the deeper checks (header validation, GCM authentication); the same edit
# left with the old check bytes is what accidental damage looks like, and is reported as damage.

def _edit(change):
    def apply(header: dict) -> bytes:
        change(header)
        return header_json(header)
    return apply


def _flip_nonce(header: dict) -> None:
    nonce = bytearray(base64.b64decode(header["nonce_b64"]))
    nonce[0] ^= 0xFF
    header["nonce_b64"] = base64.b64encode(bytes(nonce)).decode()


HEADER_FIELD_EDITS = {
    "extra field": _edit(lambda h: h.update(comment="hi")),
    "missing cipher": _edit(lambda h: h.pop("cipher")),
    "other cipher": _edit(lambda h: h.update(cipher="ChaCha20")),
    "other format": _edit(lambda h: h.update(format="other")),
    "version not an int": _edit(lambda h: h.update(version=True)),
    "encrypted false": _edit(lambda h: h.update(encrypted=False)),
    "nonce not base64": _edit(lambda h: h.update(nonce_b64="not base64!")),
    "kdf n 2**30": _edit(lambda h: h["kdf"].update(n=2 ** 30)),  # would need 128 GiB: refused before scrypt runs
    "kdf r 0": _edit(lambda h: h["kdf"].update(r=0)),
    "kdf name": _edit(lambda h: h["kdf"].update(name="pbkdf2")),
}
ENCRYPTED_HEADER_EDITS = {
    **HEADER_FIELD_EDITS,
    "respaced": lambda h: json.dumps(h, sort_keys=True, separators=(", ", ": ")).encode(),
    "nonce flipped": _edit(_flip_nonce),
    "salt replaced": _edit(lambda h: h["kdf"].update(salt_b64=base64.b64encode(bytes(16)).decode())),
    "verifier replaced": _edit(lambda h: h.update(verifier_b64=base64.b64encode(bytes(32)).decode())),
    "kdf n doubled": _edit(lambda h: h["kdf"].update(n=2 * h["kdf"]["n"])),
    "cost over the bound": _edit(lambda h: h["kdf"].update(n=2 ** 20, r=32, p=16)),
    "json broken": lambda h: b"[" + header_json(h)[1:],
}
PLAINTEXT_HEADER_EDITS = {
    "duplicate key": lambda h: header_json(h)[:-1] + b',"encrypted":false}',
    "payload hash replaced": _edit(lambda h: h.update(payload_sha256="0" * 64)),
    "encrypted true": _edit(lambda h: h.update(encrypted=True)),
}


def test_tampered_header_same_meaning_other_bytes(enc_blob):
    """Re-serialising the header with spaces keeps every value: only the associated data catches it."""
    header = split_key_file(enc_blob)[1]
    forged = reframe(enc_blob, ENCRYPTED_HEADER_EDITS["respaced"](header))
    with raises_exactly(TamperedKeyFileError, match="AES-GCM authentication"):
        decode_keys(forged, PASS)


def test_tampered_header_nonce(enc_blob):
    header = split_key_file(enc_blob)[1]
    forged = reframe(enc_blob, ENCRYPTED_HEADER_EDITS["nonce flipped"](header))
    with raises_exactly(TamperedKeyFileError, match="AES-GCM authentication"):
        decode_keys(forged, PASS)


@pytest.mark.parametrize("edit", list(HEADER_FIELD_EDITS.values()), ids=list(HEADER_FIELD_EDITS))
def test_tampered_header_fields(enc_blob, edit):
    header = split_key_file(enc_blob)[1]
    with raises_exactly(TamperedKeyFileError):
        decode_keys(reframe(enc_blob, edit(header)), PASS)


def test_tampered_header_byte_breaking_json(enc_blob):
    header = split_key_file(enc_blob)[1]
    forged = reframe(enc_blob, ENCRYPTED_HEADER_EDITS["json broken"](header))
    assert forged[18:19] == b"["  # first header byte: '{' → '['
    with raises_exactly(TamperedKeyFileError, match="JSON"):
        decode_keys(forged, PASS)


def test_duplicate_header_key_is_tampering(plain_blob):
    header = split_key_file(plain_blob)[1]
    with raises_exactly(TamperedKeyFileError, match="JSON"):
        decode_keys(reframe(plain_blob, PLAINTEXT_HEADER_EDITS["duplicate key"](header)), None, allow_plaintext=True)


@pytest.mark.parametrize("edit", list(ENCRYPTED_HEADER_EDITS.values()), ids=list(ENCRYPTED_HEADER_EDITS))
def test_encrypted_header_edit_without_recomputed_check_is_damage(enc_blob, edit):
    header = split_key_file(enc_blob)[1]
    damaged = reframe(enc_blob, edit(header), recompute_check=False)
    for passphrase in (PASS, PASS + "!", None):  # found before (and without) the passphrase
        with raises_exactly(DamagedKeyFileError, match="damaged") as info:
            decode_keys(damaged, passphrase)
        assert_not_about_the_passphrase(str(info.value))


@pytest.mark.parametrize("edit", list(PLAINTEXT_HEADER_EDITS.values()), ids=list(PLAINTEXT_HEADER_EDITS))
def test_plaintext_header_edit_without_recomputed_check_is_damage(plain_blob, edit):
    header = split_key_file(plain_blob)[1]
    damaged = reframe(plain_blob, edit(header), recompute_check=False)
    for allow in (True, False):  # damage is reported before the plaintext refusal
        with raises_exactly(DamagedKeyFileError, match="damaged") as info:
            decode_keys(damaged, PASS, allow_plaintext=allow)
        assert_not_about_the_passphrase(str(info.value))


def _one_character_changed(data: bytes, needle: bytes, offset: int = 0) -> bytes:
    """``data`` with the character at ``needle``'s first occurrence (in the header) + offset changed in place."""
    header_end = 18 + struct.unpack(">I", data[14:18])[0]
    i = data.index(needle, 18, header_end) + offset
    bad = bytearray(data)
    if needle.endswith(b":"):  # a number's first digit: keep it a digit
        bad[i] = ord("3") if data[i] != ord("3") else ord("5")
    else:  # a base64 character: keep it one
        bad[i] = ord("A") if data[i] != ord("A") else ord("B")
    return bytes(bad)


@pytest.mark.parametrize("field", ["salt", "nonce", "verifier", "n", "r", "p", "payload_length"])
def test_one_changed_header_character_in_a_file_is_damage(tmp_path, enc_blob, field):
    """Bit rot or a bad copy in the header: reported as damage (naming the file), with or without passphrase."""
    header = split_key_file(enc_blob)[1]
    needle = {
        "salt": header["kdf"]["salt_b64"].encode(),
        "nonce": header["nonce_b64"].encode(),
        "verifier": header["verifier_b64"].encode(),
    }.get(field, f'"{field}":'.encode())
    offset = 0 if field in ("salt", "nonce", "verifier") else len(needle)
    bad = _one_character_changed(enc_blob, needle, offset)
    assert len(bad) == len(enc_blob) and bad != enc_blob
    path = tmp_path / "damaged.dpkey"
    path.write_bytes(bad)
    with raises_exactly(DamagedKeyFileError) as info:
        load_keys(path, PASS)
    assert "damaged.dpkey" in str(info.value) and "backup" in str(info.value)
    assert_not_about_the_passphrase(str(info.value))
    with raises_exactly(DamagedKeyFileError):
        inspect_key_file(path)  # needs no passphrase


def test_damaged_kdf_salt_is_not_a_wrong_passphrase(enc_blob):
    """One changed salt character is damage, told apart from a wrong passphrase by the header check. A forger
    who recomputes the check with another salt derives other keys: that reads as a wrong passphrase, which is
    all that can be said then."""
    salt = split_key_file(enc_blob)[1]["kdf"]["salt_b64"]
    damaged = _one_character_changed(enc_blob, salt.encode())
    with raises_exactly(DamagedKeyFileError) as info:
        decode_keys(damaged, PASS)
    assert not isinstance(info.value, WrongPassphraseError)
    assert_not_about_the_passphrase(str(info.value))

    header = split_key_file(enc_blob)[1]
    header["kdf"]["salt_b64"] = base64.b64encode(bytes(16)).decode()
    with raises_exactly(WrongPassphraseError):
        decode_keys(reframe(enc_blob, header), PASS)


def test_tampered_plaintext_payload_and_hash(plain_blob):
    bad = bytearray(plain_blob)
    bad[-5] ^= 0x10
    with raises_exactly(TamperedKeyFileError, match="SHA-256"):
        decode_keys(bytes(bad), None, allow_plaintext=True)
    header = split_key_file(plain_blob)[1]
    forged = reframe(plain_blob, PLAINTEXT_HEADER_EDITS["payload hash replaced"](header))
    with raises_exactly(TamperedKeyFileError, match="SHA-256"):
        decode_keys(forged, None, allow_plaintext=True)


@pytest.mark.parametrize(
    "n, r, p",
    [
        (2 ** 20, 32, 16),  # every parameter at its well-formedness bound
        (2 ** 20, 8, 1),  # n alone
        (2 ** 17, 8, 16),  # p alone (default n and r)
        (2 ** 17, 32, 2),  # r and p
        (2 ** 14, 32, 16),  # small n, the largest r and p
    ],
)
def test_over_costly_header_is_refused_quickly(monkeypatch, enc_blob, n, r, p):
    """A forged header (check recomputed) asking for more scrypt work or memory than any file this pack writes
    is refused before any derivation, so a crafted file cannot stall the server."""
    assert n * r * p > KF.MAX_SCRYPT_WORK or 128 * n * r > KF.MAX_SCRYPT_MEMORY
    assert KF._check_scrypt_params(n, r, p) is None  # well-formed: only the cost is wrong
    derivations = []

    def no_derivation(*args):  # a regression fails here instead of running scrypt for minutes
        derivations.append(args[2:])
        raise AssertionError(f"scrypt reached with n, r, p = {args[2:]}")

    monkeypatch.setattr(KF, "derive_key_material", no_derivation)
    header = split_key_file(enc_blob)[1]
    header["kdf"].update(n=n, r=r, p=p)
    forged = reframe(enc_blob, header)
    start = time.perf_counter()
    with raises_exactly(KeyDerivationCostError, match="unreasonable key-derivation cost"):
        decode_keys(forged, PASS)
    assert time.perf_counter() - start < 0.5
    assert derivations == []


def test_cost_bound_is_inclusive(monkeypatch, enc_blob):
    """Exactly MAX_SCRYPT_WORK (and MAX_SCRYPT_MEMORY) reaches the derivation; one step more is refused."""
    r, p = KF.DEFAULT_SCRYPT_R, KF.DEFAULT_SCRYPT_P
    n = KF.MAX_SCRYPT_WORK // (r * p)
    assert n * r * p == KF.MAX_SCRYPT_WORK and 128 * n * r <= KF.MAX_SCRYPT_MEMORY
    assert KF._check_scrypt_params(n, r, p) is None
    assert n * r * p >= KF.DEFAULT_SCRYPT_N * r * p  # files written with the default cost load

    class Reached(Exception):
        pass

    def no_derivation(*args):
        raise Reached(args[2:])

    monkeypatch.setattr(KF, "derive_key_material", no_derivation)
    header = split_key_file(enc_blob)[1]
    header["kdf"].update(n=n, r=r, p=p)
    with pytest.raises(Reached):
        decode_keys(reframe(enc_blob, header), PASS)
    header["kdf"].update(p=p + 1)
    with raises_exactly(KeyDerivationCostError):
        decode_keys(reframe(enc_blob, header), PASS)


@pytest.mark.parametrize("blob_name", ["enc_blob", "plain_blob"])
def test_trailing_bytes_are_tampering(request, blob_name):
    blob = request.getfixturevalue(blob_name)
    with raises_exactly(TamperedKeyFileError, match="after the payload"):
        decode_keys(blob + b"\x00", PASS)


@pytest.mark.parametrize("length", [0, 2 ** 16 + 1, 2 ** 32 - 1])
def test_implausible_header_length(enc_blob, length):
    bad = enc_blob[:14] + struct.pack(">I", length) + enc_blob[18:]
    with raises_exactly(TamperedKeyFileError, match="header length"):
        decode_keys(bad, PASS)


def test_authenticated_but_invalid_payload_is_foreign(keys):
    """A plaintext file whose payload was replaced (hash recomputed) by tensors that are not keys."""
    header = split_key_file(encode_keys(keys, None, allow_plaintext=True))[1]
    payload = safetensors.torch.save({"z_T": torch.zeros(1, 4, 2, 2)}, metadata={"x": "y"})
    header.update(payload_sha256=hashlib.sha256(payload).hexdigest(), payload_length=len(payload))
    with raises_exactly(ForeignKeyFileError, match="not a Diff-Privacy key set"):
        decode_keys(frame_for(header) + payload, None, allow_plaintext=True)


# ---------------------------------------------------------------------------------------------- format versions

def test_documented_version_2_layout(keys):
    """The bytes match the layout in the module docstring, read and written by hand from it."""
    blob = encode_keys(keys, PASS, scrypt_n=FAST_N)
    assert blob[:14] == b"DIFFPRIV-KEY\x00\x02"
    (length,) = struct.unpack(">I", blob[14:18])
    header = json.loads(blob[18:18 + length])
    assert blob[18:18 + length] == header_json(header)  # compact, keys sorted
    assert blob[18 + length:18 + length + 32] == hashlib.sha256(blob[:18 + length]).digest()
    assert header["version"] == 2 and header["encrypted"] is True and header["cipher"] == "AES-256-GCM"
    assert len(blob) == 18 + length + 32 + header["payload_length"]
    assert decrypt_by_hand(blob, PASS) == keys_to_payload(keys)
    assert_same_keys(keys, decode_keys(encode_by_hand(keys, PASS, version=2, n=FAST_N), PASS))
    plain = encode_by_hand(keys, None, version=2)
    assert plain == encode_keys(keys, None, allow_plaintext=True)
    assert_same_keys(keys, decode_keys(plain, None, allow_plaintext=True))


def test_version_1_files_still_load(tmp_path, keys):
    """Files written before the header check (version byte 1, no check bytes, AAD = magic‖1‖len‖header)."""
    old = encode_by_hand(keys, PASS, version=1, n=FAST_N)
    (length,) = struct.unpack(">I", old[14:18])
    assert old[13] == 1 and len(old) == 18 + length + json.loads(old[18:18 + length])["payload_length"]
    path = tmp_path / "old.dpkey"
    path.write_bytes(old)
    assert_same_keys(keys, load_keys(path, PASS))
    assert inspect_key_file(path)["version"] == 1
    with raises_exactly(WrongPassphraseError):
        load_keys(path, PASS + "!")
    bad = bytearray(old)
    bad[-1] ^= 0x01
    with raises_exactly(TamperedKeyFileError, match="integrity"):
        decode_keys(bytes(bad), PASS)

    plain = encode_by_hand(keys, None, version=1)
    assert_same_keys(keys, decode_keys(plain, None, allow_plaintext=True))
    with raises_exactly(PlaintextKeyFileError):
        decode_keys(plain, PASS)


def test_version_2_file_relabelled_as_version_1_is_refused(enc_blob):
    """Dropping back to the layout without the header check does not get around authentication."""
    relabelled = enc_blob[:13] + b"\x01" + enc_blob[14:]
    with raises_exactly(TamperedKeyFileError):
        decode_keys(relabelled, PASS)
    # A forger who also removes the check bytes and rewrites the header's version: GCM still fails.
    _, header, _, payload = split_key_file(enc_blob)
    header["version"] = 1
    with raises_exactly(TamperedKeyFileError, match="AES-GCM authentication"):
        decode_keys(frame_for(header, version=1) + payload, PASS)


# ---------------------------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("blob_name", ["enc_blob", "plain_blob"])
def test_truncated_at_every_region(tmp_path, request, blob_name):
    blob = request.getfixturevalue(blob_name)
    (hl,) = struct.unpack(">I", blob[14:18])
    header_end = 18 + hl
    payload_start = len(blob) - len(split_key_file(blob)[3])
    assert payload_start == header_end + 32
    cuts = {
        "inside magic": 5,
        "before version byte": 13,
        "after version byte": 14,
        "inside header length": 16,
        "inside header": 18 + hl // 2,
        "header end minus one": header_end - 1,
        "header end": header_end,
        "inside header check": header_end + 16,
        "payload start minus one": payload_start - 1,
        "payload start": payload_start,
        "inside payload": payload_start + (len(blob) - payload_start) // 2,
        "one byte short": len(blob) - 1,
    }
    for label, cut in cuts.items():
        with raises_exactly(TruncatedKeyFileError, match="truncated"):
            decode_keys(blob[:cut], PASS)
        path = tmp_path / f"cut{cut}.dpkey"
        path.write_bytes(blob[:cut])
        with raises_exactly(TruncatedKeyFileError) as info:
            load_keys(path, PASS)
        assert str(path) in str(info.value), label


# ---------------------------------------------------------------------------------------------- foreign files

def _foreign_files() -> dict[str, bytes]:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(17)
    tensors = safetensors.torch.save({"emb": torch.randn(10, 768, generator=torch.Generator().manual_seed(3))})
    rnd = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    return {
        "png": png,
        "safetensors": tensors,
        "empty": b"",
        "random": rnd.numpy().tobytes(),
        "text": b"my recovery key is in another castle\n",
        "almost magic": b"DIFFPRIV-KEX\x00\x01" + bytes(64),
    }


@pytest.mark.parametrize("kind", list(_foreign_files()))
def test_foreign_files(tmp_path, kind):
    data = _foreign_files()[kind]
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    with raises_exactly(ForeignKeyFileError, match="not a Diff-Privacy key file") as info:
        load_keys(path, PASS)
    assert str(path) in str(info.value)
    with raises_exactly(ForeignKeyFileError):
        inspect_key_file(path)
    with raises_exactly(ForeignKeyFileError):
        decode_keys(data, None)


def test_foreign_file_messages_say_what_it_is(tmp_path):
    files = _foreign_files()
    expect = {"png": "PNG", "safetensors": "safetensors", "empty": "empty"}
    for kind, word in expect.items():
        with raises_exactly(ForeignKeyFileError, match=word):
            decode_keys(files[kind], None)


def test_newer_container_version_refused(enc_blob):
    newer = enc_blob[:13] + bytes([KF.CONTAINER_VERSION + 1]) + enc_blob[14:]
    with raises_exactly(ForeignKeyFileError, match="Update the Diff-Privacy node pack"):
        decode_keys(newer, PASS)
    # Also when the rest of the file is in a layout this version cannot parse at all.
    with raises_exactly(ForeignKeyFileError, match="version 7"):
        decode_keys(b"DIFFPRIV-KEY\x00\x07" + bytes(3), PASS)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "k.dpkey"
    with pytest.raises(FileNotFoundError) as info:
        load_keys(path, PASS)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        inspect_key_file(path)


# ---------------------------------------------------------------------------------------------- files on disk

@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_mode_is_0600_and_an_existing_file_is_untouched(tmp_path, keys):
    path = tmp_path / "k.dpkey"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        with raises_exactly(KeyFileExistsError):
            save_keys(path, keys, PASS, scrypt_n=FAST_N)
        new = save_keys(tmp_path / "new.dpkey", keys, PASS, scrypt_n=FAST_N)
        plain = save_keys(tmp_path / "p.dpkey", keys, None, allow_plaintext=True)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"old" and (os.stat(path).st_mode & 0o777) == 0o644
    assert (os.stat(new).st_mode & 0o777) == 0o600
    assert (os.stat(plain).st_mode & 0o777) == 0o600


def test_never_overwrites_and_leaves_no_temp_files(tmp_path, keys):
    path = save_keys(tmp_path / "sub" / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    assert listing(path.parent) == ["k.dpkey"]
    before = path.read_bytes()
    for passphrase, allow in ((PASS, False), ("other", False), (None, True)):
        with raises_exactly(KeyFileExistsError) as info:
            save_keys(path, make_keys(seed=9), passphrase, allow_plaintext=allow, scrypt_n=FAST_N)
        assert isinstance(info.value, FileExistsError) and info.value.errno == errno.EEXIST
        assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert listing(path.parent) == ["k.dpkey"]
    assert_same_keys(keys, load_keys(path, PASS))


def test_two_saves_in_the_same_second_with_different_names_both_kept(tmp_path, keys):
    """Names as the Save node makes them (prefix, time to the second, pid); the second save must not touch the
    first file, and each file keeps its own keys."""
    other = make_keys(seed=5)
    a = save_keys(tmp_path / "face_20240501-120000_001.dpkey", keys, PASS, scrypt_n=FAST_N)
    b = save_keys(tmp_path / "face_20240501-120000_002.dpkey", other, PASS, scrypt_n=FAST_N)
    assert listing(tmp_path) == [a.name, b.name]
    assert_same_keys(keys, load_keys(a, PASS))
    assert_same_keys(other, load_keys(b, PASS))


def _no_hard_links(src, dst, *args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted (no hard links here)")


def test_without_hard_links_the_file_is_created_exclusively(tmp_path, keys, monkeypatch):
    monkeypatch.setattr(KF.os, "link", _no_hard_links)
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    assert listing(tmp_path) == ["k.dpkey"]
    assert_same_keys(keys, load_keys(path, PASS))
    if os.name == "posix":
        assert (os.stat(path).st_mode & 0o777) == 0o600


@pytest.mark.parametrize("hard_links", [True, False])
def test_file_created_during_the_save_is_not_replaced(tmp_path, keys, monkeypatch, hard_links):
    """Another writer creates the name between the existence check and the final link (or exclusive create)."""
    path = tmp_path / "k.dpkey"
    real_link = os.link

    def racing_link(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"theirs")
        if hard_links:
            return real_link(src, dst, *args, **kwargs)
        return _no_hard_links(src, dst)

    monkeypatch.setattr(KF.os, "link", racing_link)
    with raises_exactly(KeyFileExistsError):
        save_keys(path, keys, PASS, scrypt_n=FAST_N)
    assert path.read_bytes() == b"theirs"
    assert listing(tmp_path) == ["k.dpkey"]


@pytest.mark.parametrize("failure", ["fsync", "fallback fsync"])
def test_failed_write_leaves_no_target_and_no_temp_file(tmp_path, keys, monkeypatch, failure):
    """'fsync': the temp file cannot be made durable. 'fallback fsync': no hard links, and the exclusively
    created file cannot be made durable. Either way nothing is left, so the same name can be used again."""
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if failure == "fsync" or len(calls) == 2:  # the fallback's fsync is the second one
            raise OSError(errno.EIO, "Input/output error (disk full)")
        return real_fsync(fd)

    monkeypatch.setattr(KF.os, "fsync", failing_fsync)
    if failure == "fallback fsync":
        monkeypatch.setattr(KF.os, "link", _no_hard_links)
    path = tmp_path / "k.dpkey"
    with pytest.raises(OSError, match="disk full") as info:
        save_keys(path, keys, PASS, scrypt_n=FAST_N)
    assert not isinstance(info.value, KeyFileExistsError)
    assert listing(tmp_path) == []
    monkeypatch.undo()
    save_keys(path, keys, PASS, scrypt_n=FAST_N)  # the name is still free
    assert listing(tmp_path) == ["k.dpkey"]


def test_inspect_reveals_no_secrets(tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    info = inspect_key_file(path)
    assert info == {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": "diffprivacy-keys",
        "version": KF.CONTAINER_VERSION,
        "encrypted": True,
        "payload_length": len(split_key_file(path.read_bytes())[3]),  # the bytes after the header, counted here
        "cipher": "AES-256-GCM",
        "kdf": {"name": "scrypt", "n": FAST_N, "r": KF.DEFAULT_SCRYPT_R, "p": KF.DEFAULT_SCRYPT_P},
    }
    assert info["payload_length"] > keys.stage_conds.numel() * 4
    text = json.dumps(info)
    header = split_key_file(path.read_bytes())[1]
    for secret in (header["kdf"]["salt_b64"], header["nonce_b64"], header["verifier_b64"]):
        assert secret not in text
    assert len(text) < 400  # scalars only, no tensor data

    plain = save_keys(tmp_path / "p.dpkey", keys, None, allow_plaintext=True)
    pinfo = inspect_key_file(plain)
    assert pinfo["encrypted"] is False and "kdf" not in pinfo
    assert len(json.dumps(pinfo)) < 300


def test_inspect_detects_truncation(tmp_path, enc_blob):
    path = tmp_path / "cut.dpkey"
    path.write_bytes(enc_blob[:-10])
    with raises_exactly(TruncatedKeyFileError):
        inspect_key_file(path)


def test_no_output_leaks(capsys, tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    load_keys(path, PASS)
    with pytest.raises(WrongPassphraseError):
        load_keys(path, "wrong")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
