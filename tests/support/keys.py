"""Shared helpers for the recovery-key tests (tests/core/test_keys.py and tests/core/test_keyfile.py)."""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import unicodedata

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.keys import KeyMetadata, PrivacyKeys, keys_to_payload


def make_keys(dim: int = 16, latent: tuple[int, int] = (8, 8), seed: int = 0, batch: int = 1) -> PrivacyKeys:
    """A seeded key set: 10 stages of width ``dim``, z_T [batch, 4, *latent], fixed metadata."""
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
    """The float32 bit pattern of ``t`` as int32 (so -0.0 and denormals compare exactly)."""
    return t.detach().to("cpu", torch.float32).contiguous().view(torch.int32)


def assert_same_keys(a: PrivacyKeys, b: PrivacyKeys) -> None:
    """``b`` holds float32 CPU tensors bit-identical to ``a``'s (after a float32 cast) and equal metadata."""
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


# ------------------------------------------------------------------------------------------------------------
# Key-file containers built by hand, from the layout in core/keyfile.py's module docstring (not from its code):
#
#     magic b"DIFFPRIV-KEY\x00" ‖ version (1 byte) ‖ L (u32, big-endian) ‖ header (L bytes of compact, sorted JSON)
#     ‖ [version ≥ 2: SHA-256 of everything before it, 32 bytes] ‖ payload
#
# Encrypted: scrypt(NFC passphrase, salt, n, r, p) → 64 bytes; bytes 0–31 the AES-256-GCM key, SHA-256 of bytes
# 32–63 the verifier; the payload is GCM ciphertext ‖ tag with everything before the payload as associated data.
# ------------------------------------------------------------------------------------------------------------

KEY_FILE_MAGIC = b"DIFFPRIV-KEY\x00"
HEADER_CHECK_BYTES = 32


def header_json(header: dict) -> bytes:
    """The header as the format writes it: compact JSON with sorted keys."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")


def split_key_file(data: bytes) -> tuple[int, dict, bytes, bytes]:
    """(container version, parsed header, header check (b"" for version 1), payload) of a well-formed file."""
    version = data[len(KEY_FILE_MAGIC)]
    (length,) = struct.unpack(">I", data[14:18])
    header_end = 18 + length
    check_end = header_end + (HEADER_CHECK_BYTES if version >= 2 else 0)
    return version, json.loads(data[18:header_end]), data[header_end:check_end], data[check_end:]


def frame_for(header: dict | bytes, version: int = 2) -> bytes:
    """magic ‖ version ‖ len ‖ header ‖ SHA-256 of those (no check for version 1): what a forger who edits a
    header and recomputes the header check writes in front of the payload. ``header`` may be raw bytes."""
    hb = header if isinstance(header, bytes) else header_json(header)
    head = KEY_FILE_MAGIC + bytes([version]) + struct.pack(">I", len(hb)) + hb
    return head + hashlib.sha256(head).digest() if version >= 2 else head


def reframe(data: bytes, header: dict | bytes, *, recompute_check: bool = True) -> bytes:
    """``data`` (a version-2 file) with its header replaced by ``header``, payload kept.

    recompute_check=True plays the deliberate forger (a fresh, matching header check); False keeps the old
    check bytes, which is what damage to the header in place looks like.
    """
    version, _, check, payload = split_key_file(data)
    assert version >= 2, "reframe is for files with a header check"
    frame = frame_for(header, version)
    if not recompute_check:
        frame = frame[:-HEADER_CHECK_BYTES] + check
    return frame + payload


def encode_by_hand(
    keys: PrivacyKeys,
    passphrase: str | None,
    *,
    version: int,
    n: int = 2 ** 12,
    r: int = 8,
    p: int = 1,
) -> bytes:
    """A key file of container ``version`` (1: no header check; 2: with it), written from the documented
    layout with hashlib's scrypt and a plain AES-GCM, independently of core.keyfile. ``passphrase=None`` writes a
    plaintext file."""
    payload = keys_to_payload(keys)
    if passphrase is None:
        header = {
            "format": "diffprivacy-keys",
            "version": version,
            "encrypted": False,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_length": len(payload),
        }
        return frame_for(header, version) + payload
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    out = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=64, maxmem=256 * n * r * p + 2 ** 20)
    header = {
        "format": "diffprivacy-keys",
        "version": version,
        "encrypted": True,
        "kdf": {"name": "scrypt", "n": n, "r": r, "p": p, "salt_b64": base64.b64encode(salt).decode()},
        "cipher": "AES-256-GCM",
        "nonce_b64": base64.b64encode(nonce).decode(),
        "verifier_b64": base64.b64encode(hashlib.sha256(out[32:]).digest()).decode(),
        "payload_length": len(payload) + 16,
    }
    frame = frame_for(header, version)
    return frame + AESGCM(out[:32]).encrypt(nonce, payload, frame)


def decrypt_by_hand(data: bytes, passphrase: str) -> bytes:
    """The payload of an encrypted version-2 file, read with the documented layout only (checks the header
    check and authenticates everything before the payload)."""
    version, header, check, payload = split_key_file(data)
    frame = data[: len(data) - len(payload)]
    assert version == 2 and check == hashlib.sha256(frame[:-HEADER_CHECK_BYTES]).digest()
    kdf = header["kdf"]
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    out = hashlib.scrypt(unicodedata.normalize("NFC", passphrase).encode("utf-8"),
                         salt=base64.b64decode(kdf["salt_b64"]), n=n, r=r, p=p, dklen=64,
                         maxmem=256 * n * r * p + 2 ** 20)
    assert hashlib.sha256(out[32:]).digest() == base64.b64decode(header["verifier_b64"])
    return AESGCM(out[:32]).decrypt(base64.b64decode(header["nonce_b64"]), payload, frame)
