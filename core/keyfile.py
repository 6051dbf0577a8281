"""Diff-Privacy recovery-key files: the self-describing container, encrypted at rest.

What is stored is a :class:`core.keys.PrivacyKeys` set (one face, :func:`core.keys.keys_to_payload`) or a whole
photo's :class:`core.keys.PhotoKeys` (every protected face with its geometry,
:func:`core.keys.photo_keys_to_payload`); this
module frames that payload, encrypts it, checks it on the way back and reads and writes the files.

File layout (all integers big-endian)::

    offset  size  content
    0       13    magic  b"DIFFPRIV-KEY\\x00"
    13      1     container version (2; version 1 files, without the check below, are still read)
    14      4     L = length of the header in bytes (1 … 65536)
    18      L     header: UTF-8 JSON, compact, keys sorted
    18+L    32    header check: SHA-256 of bytes 0 … 18+L−1 (version 2 only)
    18+L+32 P     payload, P = header["payload_length"]; nothing may follow it

Header of an encrypted file (the default)::

    {"format": "diffprivacy-keys", "version": 2, "encrypted": true,
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt_b64": <16 random bytes>},
     "cipher": "AES-256-GCM", "nonce_b64": <12 random bytes>, "verifier_b64": <32 bytes>,
     "payload_length": P}

The passphrase (Unicode NFC, then UTF-8) goes through scrypt with the header's parameters to 64 bytes:
bytes 0–31 are the AES-256-GCM key, bytes 32–63 a verifier secret whose SHA-256 is ``verifier``. A wrong
passphrase is therefore reported before any decryption is tried. The payload is the GCM ciphertext followed
by its 16-byte tag, with everything before the payload (magic, version, length, header and header check) as
associated data, so any edit of the header after saving fails authentication. The header check, which needs
no passphrase, tells accidental damage to the header (a flipped character in the salt or the KDF parameters)
apart from a wrong passphrase; a deliberate forger can recompute it, but not the GCM tag.

Loading is bounded: a header may ask for at most :data:`MAX_SCRYPT_WORK` (n·r·p, about 4× the default's
time) and :data:`MAX_SCRYPT_MEMORY` bytes, so a crafted file cannot stall the server for minutes.

Header of a plaintext file (explicit opt-out)::

    {"format": "diffprivacy-keys", "version": 2, "encrypted": false,
     "payload_sha256": <hex>, "payload_length": P}

The plaintext payload is protected against truncation and accidental damage by its SHA-256, not against a
deliberate forger (who can recompute the hash); that is why loading one needs the same explicit opt-in as
writing one (``allow_plaintext``), even when a passphrase is given.

Files are never replaced: :func:`save_keys` refuses an existing path (KeyFileExistsError).

Errors (all from :mod:`core.errors`): PassphraseRequiredError, WrongPassphraseError, TamperedKeyFileError,
DamagedKeyFileError, TruncatedKeyFileError, ForeignKeyFileError, KeyDerivationCostError,
PlaintextKeyFileError and KeyFileExistsError, each naming the file and what to do.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import math
import os
import secrets
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import (
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
from .keys import (PhotoKeys, PrivacyKeys, _is_int, keys_to_payload, payload_to_photo_keys,
                   photo_keys_to_payload)

MAGIC = b"DIFFPRIV-KEY\x00"
CONTAINER_VERSION = 2
CHECK_BYTES = 32  # SHA-256 header check (container version ≥ 2)
FORMAT_NAME = "diffprivacy-keys"

CIPHER_NAME = "AES-256-GCM"
KDF_NAME = "scrypt"
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
AES_KEY_BYTES = 32
VERIFIER_BYTES = 32
#: scrypt cost for files this pack writes: n = 2**17, r = 8, p = 1 (OWASP's password-storage guidance for
#: scrypt, for secrets an attacker can attack offline; about 0.5 s on one CPU core).
DEFAULT_SCRYPT_N = 2 ** 17
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
#: Bounds on the scrypt parameters a file may ask for, so a crafted header can make loading neither allocate
#: unbounded memory (128·n·r bytes) nor spend minutes (work ∝ n·r·p). 2**12 is meant for tests only.
MIN_SCRYPT_N = 2 ** 12
MAX_SCRYPT_N = 2 ** 20
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16
MAX_SCRYPT_MEMORY = 2 ** 29
MAX_SCRYPT_WORK = 4 * DEFAULT_SCRYPT_N * DEFAULT_SCRYPT_R * DEFAULT_SCRYPT_P

_LENGTH = struct.Struct(">I")
_PREFIX_BYTES = len(MAGIC) + 1  # magic + container version
_HEADER_OFFSET = _PREFIX_BYTES + _LENGTH.size
MAX_HEADER_BYTES = 2 ** 16

_ENCRYPTED_HEADER_KEYS = frozenset(
    {"format", "version", "encrypted", "kdf", "cipher", "nonce_b64", "verifier_b64", "payload_length"}
)
_PLAINTEXT_HEADER_KEYS = frozenset({"format", "version", "encrypted", "payload_sha256", "payload_length"})
_KDF_KEYS = frozenset({"name", "n", "r", "p", "salt_b64"})


# --------------------------------------------------------------------------------------------------------
# Passphrase → keys
# --------------------------------------------------------------------------------------------------------

def normalize_passphrase(passphrase: str) -> bytes:
    """UTF-8 of the NFC form, so "é" typed precomposed or as e + combining accent opens the same file.

    Raises TypeError for anything but a str.
    """
    if not isinstance(passphrase, str):
        raise TypeError(f"passphrase must be a str, got {type(passphrase).__name__}")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _scrypt_cost_error(n: int, r: int, p: int) -> str | None:
    """None if (n, r, p) stay within the time and memory a load may spend, else the reason."""
    if n * r * p > MAX_SCRYPT_WORK or 128 * n * r > MAX_SCRYPT_MEMORY:
        return (f"it asks for an unreasonable key-derivation cost (scrypt n={n}, r={r}, p={p}; at most "
                f"n·r·p = {MAX_SCRYPT_WORK} and {MAX_SCRYPT_MEMORY >> 20} MiB are accepted)")
    return None


def _check_scrypt_params(n: Any, r: Any, p: Any) -> str | None:
    """None if (n, r, p) are well-formed, else the reason (the cost is checked by :func:`_scrypt_cost_error`)."""
    if not (_is_int(n) and _is_int(r) and _is_int(p)):
        return "scrypt parameters must be integers"
    if n < MIN_SCRYPT_N or n > MAX_SCRYPT_N or n & (n - 1):
        lo, hi = int(math.log2(MIN_SCRYPT_N)), int(math.log2(MAX_SCRYPT_N))
        return f"scrypt n must be a power of two in [2**{lo}, 2**{hi}], got {n}"
    if not 1 <= r <= MAX_SCRYPT_R or not 1 <= p <= MAX_SCRYPT_P:
        return f"scrypt r must be in [1, {MAX_SCRYPT_R}] and p in [1, {MAX_SCRYPT_P}], got r={r}, p={p}"
    return None


def derive_key_material(passphrase: str, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """scrypt(NFC passphrase) → (32-byte AES key, 32-byte SHA-256 of the verifier secret).

    ``salt`` is the 16-byte header salt; (n, r, p) must already have passed the bounds above.
    """
    out = Scrypt(salt=salt, length=AES_KEY_BYTES + VERIFIER_BYTES, n=n, r=r, p=p).derive(
        normalize_passphrase(passphrase)
    )
    return out[:AES_KEY_BYTES], hashlib.sha256(out[AES_KEY_BYTES:]).digest()


# --------------------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _frame(header: dict[str, Any]) -> bytes:
    """magic ‖ version ‖ u32 length ‖ header JSON ‖ SHA-256 of those: the bytes GCM authenticates."""
    hb = _header_bytes(header)
    head = MAGIC + bytes([CONTAINER_VERSION]) + _LENGTH.pack(len(hb)) + hb
    return head + hashlib.sha256(head).digest()


def _missing_passphrase(passphrase: str | None) -> bool:
    return passphrase is None or passphrase == ""


def encode_keys(
    keys: PrivacyKeys | PhotoKeys,
    passphrase: str | None,
    *,
    allow_plaintext: bool = False,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> bytes:
    """Serialise ``keys`` to the file layout in the module docstring.

    Encrypted unless ``passphrase`` is None and ``allow_plaintext`` is True. An empty or all-whitespace
    passphrase is refused. Each call draws a fresh random salt and nonce, so the bytes differ every time.
    ``scrypt_n`` is a power of two in [MIN_SCRYPT_N, MAX_SCRYPT_N].

    A :class:`PhotoKeys` with face geometry is stored as a whole-photo payload (version 2); a single face's
    :class:`PrivacyKeys` (or a PhotoKeys without geometry) as the single-face payload (version 1).

    Raises PassphraseRequiredError (no passphrase without the opt-out, or an empty one), TypeError (``keys``
    not a PrivacyKeys/PhotoKeys, ``passphrase`` not a str) and ValueError (``scrypt_n`` out of bounds).
    """
    if isinstance(keys, PhotoKeys):
        payload = photo_keys_to_payload(keys) if keys.placed else keys_to_payload(keys.faces[0])
    elif isinstance(keys, PrivacyKeys):
        payload = keys_to_payload(keys)
    else:
        raise TypeError(f"keys must be a PrivacyKeys or PhotoKeys, got {type(keys).__name__}")
    if passphrase is None:
        if not allow_plaintext:
            raise PassphraseRequiredError(
                "Recovery keys are biometric secrets and are saved encrypted: give a passphrase. To write an "
                "unencrypted key file on purpose, pass passphrase=None together with allow_plaintext=True."
            )
        header = {
            "format": FORMAT_NAME,
            "version": CONTAINER_VERSION,
            "encrypted": False,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_length": len(payload),
        }
        return _frame(header) + payload
    if not isinstance(passphrase, str):
        raise TypeError(f"passphrase must be a str or None, got {type(passphrase).__name__}")
    if not passphrase.strip():
        raise PassphraseRequiredError(
            "The passphrase is empty. Type a passphrase to encrypt the keys (or, to write an unencrypted file "
            "on purpose, pass passphrase=None with allow_plaintext=True)."
        )
    reason = (_check_scrypt_params(scrypt_n, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P)
              or _scrypt_cost_error(scrypt_n, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P))
    if reason:
        raise ValueError(reason)
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    aes_key, verifier = derive_key_material(passphrase, salt, scrypt_n, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P)
    header = {
        "format": FORMAT_NAME,
        "version": CONTAINER_VERSION,
        "encrypted": True,
        "kdf": {"name": KDF_NAME, "n": scrypt_n, "r": DEFAULT_SCRYPT_R, "p": DEFAULT_SCRYPT_P, "salt_b64": _b64(salt)},
        "cipher": CIPHER_NAME,
        "nonce_b64": _b64(nonce),
        "verifier_b64": _b64(verifier),
        "payload_length": len(payload) + TAG_BYTES,
    }
    frame = _frame(header)
    return frame + AESGCM(aes_key).encrypt(nonce, payload, frame)


def _describe_foreign(data: bytes) -> str:
    """A short guess at what a non-key file is, for the error message."""
    if not data:
        return "the file is empty"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "it is a PNG image"
    if data.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image"
    if data.startswith(b"PK\x03\x04"):
        return "it is a ZIP archive (e.g. a torch .pt/.ckpt file)"
    if len(data) >= 9 and data[8:9] == b"{":
        return "it looks like a safetensors file (model weights or embeddings, not recovery keys)"
    return "it does not start with the Diff-Privacy key signature"


def _check_signature(head: bytes, source: str) -> None:
    """Validate magic and container version from the first bytes of a file (``head`` may be shorter)."""
    if not head:
        raise ForeignKeyFileError(f"{source} is not a Diff-Privacy key file: the file is empty.")
    n = min(len(head), len(MAGIC))
    if head[:n] != MAGIC[:n]:
        raise ForeignKeyFileError(f"{source} is not a Diff-Privacy key file: {_describe_foreign(head)}.")
    if len(head) < _PREFIX_BYTES:
        raise TruncatedKeyFileError(
            f"{source} is truncated: it ends after {len(head)} bytes, inside the file signature. The copy or "
            f"download was incomplete; copy the key file again."
        )
    version = head[len(MAGIC)]
    if version > CONTAINER_VERSION:
        raise ForeignKeyFileError(
            f"{source} uses key-file format version {version}, but this pack reads up to version "
            f"{CONTAINER_VERSION}. Update the Diff-Privacy node pack to open it."
        )
    if version < 1:
        raise ForeignKeyFileError(f"{source} has an invalid key-file format version ({version}).")


def _tampered(source: str, what: str) -> TamperedKeyFileError:
    return TamperedKeyFileError(
        f"{source} failed its integrity check ({what}): the file was changed or damaged after it was saved. "
        f"Do not use it; restore the key file from a backup copy."
    )


def _decode_b64(value: Any, size: int, name: str, source: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise _tampered(source, f"header field {name!r} is not {size} base64-encoded bytes")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in header")
    return d


@dataclass(frozen=True)
class _Container:
    frame: bytes  # associated data: magic … end of header
    header: dict[str, Any]
    payload: bytes


def _parse_container(data: bytes, source: str) -> _Container:
    """Split and structurally validate a key file; no passphrase needed, nothing decrypted."""
    _check_signature(data[:_PREFIX_BYTES], source)
    if len(data) < _HEADER_OFFSET:
        raise TruncatedKeyFileError(
            f"{source} is truncated: it ends after {len(data)} bytes, before the header. Copy the key file again."
        )
    (header_len,) = _LENGTH.unpack(data[_PREFIX_BYTES:_HEADER_OFFSET])
    if not 1 <= header_len <= MAX_HEADER_BYTES:
        raise _tampered(source, f"implausible header length {header_len}")
    header_end = _HEADER_OFFSET + header_len
    version = data[len(MAGIC)]
    frame_end = header_end + (CHECK_BYTES if version >= 2 else 0)
    if len(data) < frame_end:
        raise TruncatedKeyFileError(
            f"{source} is truncated: it ends after {len(data)} bytes, inside the {header_len}-byte header. "
            f"Copy the key file again."
        )
    if version >= 2 and not hmac.compare_digest(hashlib.sha256(data[:header_end]).digest(),
                                                data[header_end:frame_end]):
        raise DamagedKeyFileError(
            f"{source} is damaged: its header (KDF parameters, salt, nonce or sizes) no longer matches the "
            f"checksum written with it. This is not a passphrase problem; restore the key file from a backup copy.")
    try:
        header = json.loads(data[_HEADER_OFFSET:header_end].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise _tampered(source, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _tampered(source, "the header is not a JSON object")
    _validate_header(header, version, source)
    expected = frame_end + header["payload_length"]
    if len(data) < expected:
        raise TruncatedKeyFileError(
            f"{source} is truncated: expected {expected} bytes, found {len(data)}. The copy or download was "
            f"incomplete; copy the key file again."
        )
    if len(data) > expected:
        raise _tampered(source, f"{len(data) - expected} unexpected bytes after the payload")
    return _Container(frame=data[:frame_end], header=header, payload=data[frame_end:])


def _validate_header(header: dict[str, Any], container_version: int, source: str) -> None:
    """Check every header field's presence, type and range (TamperedKeyFileError otherwise)."""
    encrypted = header.get("encrypted")
    if not isinstance(encrypted, bool):
        raise _tampered(source, "header field 'encrypted' is missing or not a boolean")
    allowed = _ENCRYPTED_HEADER_KEYS if encrypted else _PLAINTEXT_HEADER_KEYS
    if set(header) != allowed:
        diff = sorted(set(header) ^ allowed)
        raise _tampered(source, f"unexpected or missing header fields {diff}")
    if header["format"] != FORMAT_NAME:
        raise _tampered(source, f"header format is {header['format']!r}, expected {FORMAT_NAME!r}")
    if not _is_int(header["version"]) or header["version"] != container_version:
        raise _tampered(source, "header version does not match the file signature")
    length = header["payload_length"]
    if not _is_int(length) or length < (TAG_BYTES + 1 if encrypted else 1):
        raise _tampered(source, f"invalid payload length {length!r}")
    if not encrypted:
        digest = header["payload_sha256"]
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _tampered(source, "header field 'payload_sha256' is not a SHA-256 hex digest")
        return
    if header["cipher"] != CIPHER_NAME:
        raise _tampered(source, f"unknown cipher {header['cipher']!r}")
    kdf = header["kdf"]
    if not isinstance(kdf, dict) or set(kdf) != _KDF_KEYS or kdf["name"] != KDF_NAME:
        raise _tampered(source, "header field 'kdf' is not a scrypt parameter set")
    reason = _check_scrypt_params(kdf["n"], kdf["r"], kdf["p"])
    if reason:
        raise _tampered(source, reason)
    reason = _scrypt_cost_error(kdf["n"], kdf["r"], kdf["p"])
    if reason:
        raise KeyDerivationCostError(f"{source} was refused: {reason}. This pack never writes such files.")
    _decode_b64(kdf["salt_b64"], SALT_BYTES, "kdf.salt_b64", source)
    _decode_b64(header["nonce_b64"], NONCE_BYTES, "nonce_b64", source)
    _decode_b64(header["verifier_b64"], VERIFIER_BYTES, "verifier_b64", source)


def _decode(data: bytes, passphrase: str | None, source: str, allow_plaintext: bool) -> PrivacyKeys:
    """The single face's keys of a key file; a whole-photo file with several faces is refused with a pointer to
    the whole-photo loaders."""
    photo = _decode_photo(data, passphrase, source, allow_plaintext)
    if len(photo.faces) != 1:
        raise ForeignKeyFileError(
            f"{source} holds the keys of {len(photo.faces)} faces of one photo; recover it as a whole photo "
            f"(Recover Photo node, or the CLI's recover with the protected photo).")
    return photo.faces[0]


def _decode_photo(data: bytes, passphrase: str | None, source: str, allow_plaintext: bool) -> PhotoKeys:
    box = _parse_container(data, source)
    header = box.header
    if not header["encrypted"] and not allow_plaintext:
        raise PlaintextKeyFileError(
            f"{source} is not encrypted, so anyone could have written it; it was refused. Load unencrypted key "
            f"files only on purpose: switch on allow_plaintext (on the Load Privacy Keys node) for files you "
            f"saved yourself with allow_plaintext.")
    if not header["encrypted"]:
        if not hmac.compare_digest(hashlib.sha256(box.payload).hexdigest(), header["payload_sha256"]):
            raise _tampered(source, "the payload's SHA-256 does not match the header")
        return payload_to_photo_keys(box.payload, source)
    if _missing_passphrase(passphrase):
        raise PassphraseRequiredError(
            f"{source} is encrypted: give the passphrase that was used when the keys were saved."
        )
    kdf = header["kdf"]
    salt = _decode_b64(kdf["salt_b64"], SALT_BYTES, "kdf.salt_b64", source)
    aes_key, verifier = derive_key_material(passphrase, salt, kdf["n"], kdf["r"], kdf["p"])
    stored = _decode_b64(header["verifier_b64"], VERIFIER_BYTES, "verifier_b64", source)
    if not hmac.compare_digest(verifier, stored):
        raise WrongPassphraseError(
            f"The passphrase does not open {source}. Check spelling, keyboard layout and caps lock; it must be "
            f"the passphrase given when these keys were saved."
        )
    nonce = _decode_b64(header["nonce_b64"], NONCE_BYTES, "nonce_b64", source)
    try:
        payload = AESGCM(aes_key).decrypt(nonce, box.payload, box.frame)
    except InvalidTag:
        raise _tampered(source, "AES-GCM authentication failed although the passphrase is right") from None
    return payload_to_photo_keys(payload, source)


def decode_keys(data: bytes, passphrase: str | None, *, allow_plaintext: bool = False) -> PrivacyKeys:
    """Inverse of :func:`encode_keys`. Tensors come back float32 on the CPU.

    An unencrypted file is refused unless ``allow_plaintext`` (PlaintextKeyFileError). Raises
    PassphraseRequiredError, WrongPassphraseError, TamperedKeyFileError, DamagedKeyFileError,
    TruncatedKeyFileError, ForeignKeyFileError or KeyDerivationCostError (see module docstring).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _decode(bytes(data), passphrase, "the key data", allow_plaintext)


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------

def _exists_error(path: Path) -> KeyFileExistsError:
    return KeyFileExistsError(errno.EEXIST, "A key file of this name exists already and is never replaced "
                                            "(it may be the only way to recover a face); choose another name",
                              str(path))


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (0o600) with ``data`` complete, never replacing an existing file.

    The bytes go to a temp file in the same folder, are fsynced, and are then hard-linked to ``path``: the link
    appears atomically with the whole content and fails if the name exists. Where hard links are not supported
    the file is created with O_EXCL and written in place.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists_error(path) from None
        except OSError:  # no hard links here (e.g. FAT, some network shares)
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:
                raise _exists_error(path) from None
            try:
                with os.fdopen(out, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # never leave a partial key file under the final name (it is ours: O_EXCL)
                try:
                    os.unlink(path)
                except OSError:
                    pass
                raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_keys(
    path: str | os.PathLike,
    keys: PrivacyKeys | PhotoKeys,
    passphrase: str | None,
    *,
    allow_plaintext: bool = False,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> Path:
    """Encrypt and write ``keys`` to a *new* file ``path`` (mode 0o600; parent folders are created).

    ``passphrase=None`` raises PassphraseRequiredError unless ``allow_plaintext=True``; an existing ``path``
    raises KeyFileExistsError and is left unchanged; other errors as :func:`encode_keys`, plus OSError from
    writing. Returns the path.
    """
    path = Path(path)
    if path.exists():
        raise _exists_error(path)
    data = encode_keys(keys, passphrase, allow_plaintext=allow_plaintext, scrypt_n=scrypt_n)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, data)
    return path


def _read_key_file(path: Path) -> bytes:
    """Read a key file, refusing foreign files after their first bytes (they may be large)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PREFIX_BYTES)
            _check_signature(head, f"'{path}'")
            return head + f.read()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "Recovery key file not found", str(path)) from None


def load_keys(path: str | os.PathLike, passphrase: str | None, *, allow_plaintext: bool = False) -> PrivacyKeys:
    """Read and, if encrypted, decrypt a key file written by :func:`save_keys`.

    Tensors come back float32 on the CPU. Raises FileNotFoundError for a missing file, otherwise the errors
    of :func:`decode_keys`, whose messages name the file.
    """
    path = Path(path)
    return _decode(_read_key_file(path), passphrase, f"'{path}'", allow_plaintext)


def decode_photo_keys(data: bytes, passphrase: str | None, *, allow_plaintext: bool = False) -> PhotoKeys:
    """Like :func:`decode_keys` but returns the whole photo's keys (:class:`PhotoKeys`); single-face files come
    back as one face without geometry."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _decode_photo(bytes(data), passphrase, "the key data", allow_plaintext)


def load_photo_keys(path: str | os.PathLike, passphrase: str | None, *, allow_plaintext: bool = False) -> PhotoKeys:
    """Like :func:`load_keys` but returns :class:`PhotoKeys` (every face of a whole-photo key file, or the one
    face of an older single-face file, without geometry)."""
    path = Path(path)
    return _decode_photo(_read_key_file(path), passphrase, f"'{path}'", allow_plaintext)


def inspect_key_file(path: str | os.PathLike) -> dict[str, Any]:
    """The non-secret facts of a key file, without a passphrase and without decrypting anything.

    Returns ``{"path", "file_size", "format", "version", "encrypted", "payload_length"}`` plus, when
    encrypted, ``"cipher"`` and ``"kdf": {"name", "n", "r", "p"}``. Salt, nonce, verifier and all tensor
    data are left out. Structural problems raise the same errors as :func:`load_keys`.
    """
    path = Path(path)
    data = _read_key_file(path)
    header = _parse_container(data, f"'{path}'").header
    info: dict[str, Any] = {
        "path": str(path),
        "file_size": len(data),
        "format": header["format"],
        "version": header["version"],
        "encrypted": header["encrypted"],
        "payload_length": header["payload_length"],
    }
    if header["encrypted"]:
        kdf = header["kdf"]
        info["cipher"] = header["cipher"]
        info["kdf"] = {"name": kdf["name"], "n": kdf["n"], "r": kdf["r"], "p": kdf["p"]}
    return info
