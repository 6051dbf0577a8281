"""Recovery-key files: round trips, encryption at rest and one precise error per kind of damage."""
from __future__ import annotations

import json
import os
import struct
import sys
import unicodedata

import pytest
import safetensors.torch
import torch

from core import keys as K
from core.errors import (
    ForeignKeyFileError,
    KeyMismatchError,
    PassphraseRequiredError,
    TamperedKeyFileError,
    TruncatedKeyFileError,
    WrongPassphraseError,
)
from core.keys import (
    KeyMetadata,
    PrivacyKeys,
    check_compatible,
    decode_keys,
    encode_keys,
    inspect_key_file,
    load_keys,
    save_keys,
)

FAST_N = 2 ** 12
PASS = "correct horse battery staple"


def make_keys(dim: int = 16, latent: tuple[int, int] = (8, 8), seed: int = 0, batch: int = 1) -> PrivacyKeys:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(10, dim, generator=g)
    conds = torch.randn(10, 77, dim, generator=g)
    z = torch.randn(batch, 4, *latent, generator=g)
    # Values whose bits a careless float conversion would change.
    tokens[0, :4] = torch.tensor([-0.0, 1e-40, 3.4e38, -1.1754944e-38])
    meta = KeyMetadata(
        model_fingerprint="a1b2c3d4e5f6",
        ddim_steps=50,
        schedule="recover",
        msi_mode="faithful",
        image_size=(latent[0] * 8, latent[1] * 8),
        created="2024-05-01T12:00:00+00:00",
        extra={"note": "test", "ünïcode": "ok"},
    )
    return PrivacyKeys(tokens, conds, z, meta)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().view(torch.int32)


def assert_same_keys(a: PrivacyKeys, b: PrivacyKeys) -> None:
    for name in ("stage_tokens", "stage_conds", "z_T"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == torch.float32 and y.device.type == "cpu"
        assert x.shape == y.shape
        assert torch.equal(bits(x), bits(y)), name
    assert a.metadata == b.metadata


def raises_exactly(cls, match: str | None = None):
    """pytest.raises that also rejects subclasses/siblings: the exact type is part of the contract."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(cls, match=match)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._cm.__exit__(*exc)
            assert type(self.info.value) is cls, f"expected {cls.__name__}, got {type(self.info.value).__name__}"
            return handled

    return _Ctx()


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    """(prefix before header, parsed header, payload) of a key file."""
    (hl,) = struct.unpack(">I", data[14:18])
    return data[:14], json.loads(data[18:18 + hl]), data[18 + hl:]


def join(prefix: bytes, header_bytes: bytes, payload: bytes) -> bytes:
    return prefix + struct.pack(">I", len(header_bytes)) + header_bytes + payload


def canon(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


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
    assert raw.startswith(b"DIFFPRIV-KEY\x00\x01")
    # The ciphertext must not contain the float32 bytes of the tensors nor the metadata text.
    assert bits(keys.stage_conds)[3, 10:14].numpy().tobytes() not in raw
    assert b"a1b2c3d4e5f6" not in raw and b"recover" not in raw
    assert_same_keys(keys, load_keys(path, PASS))


def test_round_trip_plaintext_file(tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, None, allow_plaintext=True)
    loaded = load_keys(path, None)
    assert_same_keys(keys, loaded)
    # A passphrase given for a plaintext file is irrelevant.
    assert_same_keys(keys, load_keys(path, "anything"))
    assert inspect_key_file(path)["encrypted"] is False


def test_plaintext_bytes_are_deterministic(keys):
    assert encode_keys(keys, None, allow_plaintext=True) == encode_keys(keys, None, allow_plaintext=True)


def test_round_trip_full_size_default_scrypt(tmp_path):
    keys = make_keys(dim=768, latent=(64, 64), seed=1)
    path = save_keys(tmp_path / "full.dpkey", keys, PASS)
    info = inspect_key_file(path)
    assert info["kdf"] == {"name": "scrypt", "n": 2 ** 15, "r": 8, "p": 1}
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
    assert split(blob)[1]["kdf"]["n"] == 2 ** 13
    assert_same_keys(keys, decode_keys(blob, PASS))


def test_two_saves_differ(tmp_path, keys):
    a = save_keys(tmp_path / "a.dpkey", keys, PASS, scrypt_n=FAST_N).read_bytes()
    b = save_keys(tmp_path / "b.dpkey", keys, PASS, scrypt_n=FAST_N).read_bytes()
    (_, ha, pa), (_, hb, pb) = split(a), split(b)
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

    real = K.AESGCM

    class SpyAESGCM:
        def __init__(self, key):
            self._inner = real(key)

        def decrypt(self, *a, **kw):
            calls.append(1)
            return self._inner.decrypt(*a, **kw)

    monkeypatch.setattr(K, "AESGCM", SpyAESGCM)
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
    prefix_len = len(enc_blob) - len(split(enc_blob)[2])
    pos = {"first": prefix_len, "middle": (prefix_len + len(enc_blob)) // 2, "tag": len(enc_blob) - 1}[where]
    bad = bytearray(enc_blob)
    bad[pos] ^= 0x01
    with raises_exactly(TamperedKeyFileError, match="integrity"):
        decode_keys(bytes(bad), PASS)


def test_tampered_header_same_meaning_other_bytes(enc_blob):
    """Re-serialising the header with spaces keeps every value: only the associated data catches it."""
    prefix, header, payload = split(enc_blob)
    respaced = json.dumps(header, sort_keys=True, separators=(", ", ": ")).encode()
    with raises_exactly(TamperedKeyFileError):
        decode_keys(join(prefix, respaced, payload), PASS)


def test_tampered_header_nonce(enc_blob):
    prefix, header, payload = split(enc_blob)
    nonce = bytearray(K.base64.b64decode(header["nonce_b64"]))
    nonce[0] ^= 0xFF
    header["nonce_b64"] = K.base64.b64encode(bytes(nonce)).decode()
    with raises_exactly(TamperedKeyFileError):
        decode_keys(join(prefix, canon(header), payload), PASS)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.update(comment="hi"),
        lambda h: h.pop("cipher"),
        lambda h: h.update(cipher="ChaCha20"),
        lambda h: h.update(format="other"),
        lambda h: h.update(version=True),
        lambda h: h.update(encrypted=False),
        lambda h: h.update(nonce_b64="not base64!"),
        lambda h: h["kdf"].update(n=2 ** 30),  # would need 128 GiB: refused before scrypt runs
        lambda h: h["kdf"].update(r=0),
        lambda h: h["kdf"].update(name="pbkdf2"),
    ],
)
def test_tampered_header_fields(enc_blob, edit):
    prefix, header, payload = split(enc_blob)
    edit(header)
    with raises_exactly(TamperedKeyFileError):
        decode_keys(join(prefix, canon(header), payload), PASS)


def test_tampered_header_byte_breaking_json(enc_blob):
    bad = bytearray(enc_blob)
    bad[18] = ord("[")  # first header byte: '{' → '['
    with raises_exactly(TamperedKeyFileError, match="JSON"):
        decode_keys(bytes(bad), PASS)


def test_duplicate_header_key_is_tampering(plain_blob):
    prefix, header, payload = split(plain_blob)
    text = canon(header)[:-1] + b',"encrypted":false}'
    with raises_exactly(TamperedKeyFileError):
        decode_keys(join(prefix, text, payload), None)


def test_tampered_kdf_salt_reads_as_wrong_passphrase(enc_blob):
    """Documented limit: a changed salt derives other keys, indistinguishable from a wrong passphrase."""
    prefix, header, payload = split(enc_blob)
    header["kdf"]["salt_b64"] = K.base64.b64encode(bytes(16)).decode()
    with raises_exactly(WrongPassphraseError):
        decode_keys(join(prefix, canon(header), payload), PASS)


def test_tampered_plaintext_payload_and_hash(plain_blob):
    bad = bytearray(plain_blob)
    bad[-5] ^= 0x10
    with raises_exactly(TamperedKeyFileError, match="SHA-256"):
        decode_keys(bytes(bad), None)
    prefix, header, payload = split(plain_blob)
    header["payload_sha256"] = "0" * 64
    with raises_exactly(TamperedKeyFileError):
        decode_keys(join(prefix, canon(header), payload), None)


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
    prefix, header, _ = split(encode_keys(keys, None, allow_plaintext=True))
    payload = safetensors.torch.save({"z_T": torch.zeros(1, 4, 2, 2)}, metadata={"x": "y"})
    header.update(payload_sha256=K.hashlib.sha256(payload).hexdigest(), payload_length=len(payload))
    with raises_exactly(ForeignKeyFileError, match="not a Diff-Privacy key set"):
        decode_keys(join(prefix, canon(header), payload), None)


# ---------------------------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("blob_name", ["enc_blob", "plain_blob"])
def test_truncated_at_every_region(tmp_path, request, blob_name):
    blob = request.getfixturevalue(blob_name)
    (hl,) = struct.unpack(">I", blob[14:18])
    payload_start = 18 + hl
    cuts = {
        "inside magic": 5,
        "before version byte": 13,
        "after version byte": 14,
        "inside header length": 16,
        "inside header": 18 + hl // 2,
        "header end minus one": payload_start - 1,
        "header end": payload_start,
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
    newer = enc_blob[:13] + b"\x02" + enc_blob[14:]
    with raises_exactly(ForeignKeyFileError, match="Update the Diff-Privacy node pack"):
        decode_keys(newer, PASS)
    # Also when the rest of the file is in a layout this version cannot parse at all.
    with raises_exactly(ForeignKeyFileError, match="version 7"):
        decode_keys(b"DIFFPRIV-KEY\x00\x07" + bytes(3), PASS)


def test_newer_payload_format_refused(keys):
    prefix, header, payload = split(encode_keys(keys, None, allow_plaintext=True))
    meta = keys.metadata.to_dict()
    meta["format_version"] = 2
    tensors = safetensors.torch.load(payload)
    payload = safetensors.torch.save(tensors, metadata={K.METADATA_KEY: json.dumps(meta)})
    header.update(payload_sha256=K.hashlib.sha256(payload).hexdigest(), payload_length=len(payload))
    with raises_exactly(ForeignKeyFileError, match="Update the Diff-Privacy node pack"):
        decode_keys(join(prefix, canon(header), payload), None)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "k.dpkey"
    with pytest.raises(FileNotFoundError) as info:
        load_keys(path, PASS)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        inspect_key_file(path)


# ---------------------------------------------------------------------------------------------- files on disk

@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_mode_is_0600_even_when_overwriting(tmp_path, keys):
    path = tmp_path / "k.dpkey"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        save_keys(path, keys, PASS, scrypt_n=FAST_N)
    finally:
        os.umask(old_umask)
    assert (os.stat(path).st_mode & 0o777) == 0o600
    plain = save_keys(tmp_path / "p.dpkey", keys, None, allow_plaintext=True)
    assert (os.stat(plain).st_mode & 0o777) == 0o600


def test_atomic_write_leaves_no_temp_files(tmp_path, keys):
    path = save_keys(tmp_path / "sub" / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    save_keys(path, keys, PASS, scrypt_n=FAST_N)  # overwrite
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.dpkey"]


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, keys, monkeypatch):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(K.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_keys(path, make_keys(seed=9), PASS, scrypt_n=FAST_N)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.dpkey"]


def test_inspect_reveals_no_secrets(tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    info = inspect_key_file(path)
    assert info == {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": "diffprivacy-keys",
        "version": 1,
        "encrypted": True,
        "payload_length": len(split(path.read_bytes())[2]),  # the bytes after the header, counted here
        "cipher": "AES-256-GCM",
        "kdf": {"name": "scrypt", "n": FAST_N, "r": 8, "p": 1},
    }
    assert info["payload_length"] > keys.stage_conds.numel() * 4
    text = json.dumps(info)
    header = split(path.read_bytes())[1]
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


def test_no_output_leaks(capsys, tmp_path, keys):
    path = save_keys(tmp_path / "k.dpkey", keys, PASS, scrypt_n=FAST_N)
    load_keys(path, PASS)
    with pytest.raises(WrongPassphraseError):
        load_keys(path, "wrong")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
