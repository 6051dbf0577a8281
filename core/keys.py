"""Diff-Privacy recovery keys (key-E and key-I): the key set, its metadata and its serialised payload.

The recovery keys are biometric secrets: whoever holds them and the base model can regenerate the original
face. They are

* key-E: the S = 10 MSI stage tokens ``stage_tokens`` [S, D] and the stage conditionings ``stage_conds``
  [S, 77, D] (D = 768 for SD 1.x);
* key-I: the DDIM-inverted latent ``z_T`` [B, 4, h, w] (scaled SD latent, h = H/8, w = W/8; B is usually 1).

The payload (:func:`keys_to_payload`) is a safetensors blob with the float32 tensors ``stage_tokens``,
``stage_conds`` and ``z_T`` and one string metadata entry, ``diffprivacy.keys``, holding the JSON of
:class:`KeyMetadata`. One metadata key keeps the bytes deterministic for the same keys. Files on disk wrap
this payload in an encrypted container: see :mod:`core.keyfile`.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import safetensors.torch
import torch

from .diffusion import NUM_TRAIN_TIMESTEPS, STAGE_WIDTH
from .errors import ForeignKeyFileError, KeyMismatchError

KEYS_FORMAT_VERSION = 1  # version of the payload (KeyMetadata.format_version)
METADATA_KEY = "diffprivacy.keys"
TOKENS_PER_COND = 77
LATENT_CHANNELS = 4
MSI_MODES = ("faithful", "lite")
_TENSOR_NAMES = ("stage_conds", "stage_tokens", "z_T")


# --------------------------------------------------------------------------------------------------------
# Key set and metadata
# --------------------------------------------------------------------------------------------------------

def utc_now_iso() -> str:
    """Current UTC time, ISO 8601 to the second, e.g. ``2024-05-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_int(x: Any) -> bool:
    """True for a real int (bool excluded); also used by :mod:`core.keyfile`'s header checks."""
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(kw_only=True)
class KeyMetadata:
    """Non-tensor facts about how a key set was made; stored inside the (encrypted) payload.

    ``ddim_steps`` is N_key, the DDIM grid the inversion used (recovery must use the same grid).
    ``schedule`` names the embedding schedule of the inversion ("recover", or a switch timestep).
    ``image_size`` is the pixel (H, W) of the aligned source image. ``created`` is ISO 8601 with a UTC offset.
    """

    format_version: int = KEYS_FORMAT_VERSION
    model_fingerprint: str
    ddim_steps: int
    schedule: str
    stage_width: int = STAGE_WIDTH
    msi_mode: str
    image_size: tuple[int, int]
    created: str = field(default_factory=utc_now_iso)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not _is_int(self.format_version) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive int, got {self.format_version!r}")
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint.strip():
            raise ValueError("model_fingerprint must be a non-empty string (the base model's hash)")
        if not _is_int(self.ddim_steps) or not 1 <= self.ddim_steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"ddim_steps must be an int in [1, {NUM_TRAIN_TIMESTEPS}], got {self.ddim_steps!r}")
        if not isinstance(self.schedule, str) or not self.schedule:
            raise ValueError(f"schedule must be a non-empty string, got {self.schedule!r}")
        if not _is_int(self.stage_width) or not 1 <= self.stage_width <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"stage_width must be an int in [1, {NUM_TRAIN_TIMESTEPS}], got {self.stage_width!r}")
        if self.msi_mode not in MSI_MODES:
            raise ValueError(f"msi_mode must be one of {MSI_MODES}, got {self.msi_mode!r}")
        size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else ()
        if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
            raise ValueError(f"image_size must be (H, W) with positive ints, got {self.image_size!r}")
        self.image_size = (int(size[0]), int(size[1]))
        try:
            stamp = datetime.fromisoformat(self.created) if isinstance(self.created, str) else None
        except ValueError:
            stamp = None
        if stamp is None or stamp.tzinfo is None:
            raise ValueError(f"created must be an ISO 8601 time with a UTC offset, got {self.created!r}")
        if not isinstance(self.extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()
        ):
            raise ValueError("extra must be a dict[str, str]")
        self.extra = dict(self.extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (image_size as a list)."""
        return {
            "format_version": self.format_version,
            "model_fingerprint": self.model_fingerprint,
            "ddim_steps": self.ddim_steps,
            "schedule": self.schedule,
            "stage_width": self.stage_width,
            "msi_mode": self.msi_mode,
            "image_size": list(self.image_size),
            "created": self.created,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyMetadata:
        """Inverse of :meth:`to_dict`; unknown or missing fields raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(d).__name__}")
        fields = set(cls.__dataclass_fields__)
        if set(d) - fields:
            raise ValueError(f"unexpected metadata fields {sorted(set(d) - fields)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise ValueError(str(e)) from None


@dataclass(eq=False, repr=False)
class PrivacyKeys:
    """A full recovery key set. Tensors are float, finite; any device.

    stage_tokens: [S, D] MSI stage tokens (key-E, token form).
    stage_conds:  [S, 77, D] stage conditionings c_0 … c_{S−1} (key-E, what the sampler uses).
    z_T:          [B, 4, h, w] DDIM-inverted scaled latent (key-I).
    S · metadata.stage_width must equal 1000.
    """

    stage_tokens: torch.Tensor
    stage_conds: torch.Tensor
    z_T: torch.Tensor
    metadata: KeyMetadata

    def __post_init__(self):
        for name in _TENSOR_NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if not isinstance(self.metadata, KeyMetadata):
            raise ValueError(f"metadata must be a KeyMetadata, got {type(self.metadata).__name__}")
        tok, cond, z = self.stage_tokens, self.stage_conds, self.z_T
        if tok.ndim != 2:
            raise ValueError(f"stage_tokens must be [S, D], got shape {tuple(tok.shape)}")
        if cond.ndim != 3 or cond.shape[1] != TOKENS_PER_COND:
            raise ValueError(f"stage_conds must be [S, {TOKENS_PER_COND}, D], got shape {tuple(cond.shape)}")
        if tok.shape[0] != cond.shape[0]:
            raise ValueError(f"stage count differs: stage_tokens has {tok.shape[0]}, stage_conds {cond.shape[0]}")
        if tok.shape[1] != cond.shape[2]:
            raise ValueError(f"embedding width differs: stage_tokens D={tok.shape[1]}, stage_conds D={cond.shape[2]}")
        if tok.shape[0] * self.metadata.stage_width != NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"{tok.shape[0]} stages × stage_width {self.metadata.stage_width} do not cover the "
                f"{NUM_TRAIN_TIMESTEPS} training timesteps"
            )
        if z.ndim != 4 or z.shape[0] < 1 or z.shape[1] != LATENT_CHANNELS or z.shape[2] < 1 or z.shape[3] < 1:
            raise ValueError(f"z_T must be [B, {LATENT_CHANNELS}, h, w], got shape {tuple(z.shape)}")
        for name in _TENSOR_NAMES:
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} contains NaN or infinite values; these keys cannot be used")

    @property
    def num_stages(self) -> int:
        return int(self.stage_tokens.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.stage_tokens.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PrivacyKeys:
        """Copy with every tensor moved/cast; metadata is shared."""
        return PrivacyKeys(
            self.stage_tokens.to(device=device, dtype=dtype),
            self.stage_conds.to(device=device, dtype=dtype),
            self.z_T.to(device=device, dtype=dtype),
            self.metadata,
        )

    def __repr__(self) -> str:
        # Shapes only: the values are biometric secrets and must never reach a log.
        return (
            f"PrivacyKeys(stages={self.num_stages}, dim={self.embed_dim}, z_T={tuple(self.z_T.shape)}, "
            f"model={self.metadata.model_fingerprint!r}, ddim_steps={self.metadata.ddim_steps})"
        )


def check_compatible(keys: PrivacyKeys | KeyMetadata, model_fingerprint: str, ddim_steps: int | None = None) -> None:
    """Raise KeyMismatchError unless ``keys`` (or their metadata) were made with this model (and, if given, this
    DDIM grid). Fingerprints are compared after trimming whitespace, case-insensitively (hex digests).
    """
    if not isinstance(model_fingerprint, str) or not model_fingerprint.strip():
        raise ValueError("model_fingerprint must be a non-empty string")
    meta = keys if isinstance(keys, KeyMetadata) else keys.metadata
    if meta.model_fingerprint.strip().lower() != model_fingerprint.strip().lower():
        raise KeyMismatchError(
            f"These recovery keys were made with base model {meta.model_fingerprint!r}, but the loaded model is "
            f"{model_fingerprint!r}. Load the same Stable Diffusion checkpoint that created the keys; with "
            f"another model the recovered face will be wrong."
        )
    if ddim_steps is not None and int(ddim_steps) != meta.ddim_steps:
        raise KeyMismatchError(
            f"These recovery keys were inverted on a {meta.ddim_steps}-step DDIM grid, but {int(ddim_steps)} steps "
            f"were requested. Set the recovery steps to {meta.ddim_steps}."
        )


# --------------------------------------------------------------------------------------------------------
# Payload (safetensors)
# --------------------------------------------------------------------------------------------------------

def stage_conds_digest(stage_conds: torch.Tensor) -> str:
    """SHA-256 (hex) of key-E's stage conditionings [10,77,D] as float32 bytes: ties a gate receipt to the
    keys of the run it vouches for, without carrying the secret itself."""
    data = stage_conds.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def keys_to_payload(keys: PrivacyKeys) -> bytes:
    """Safetensors bytes: float32 contiguous CPU tensors plus the metadata JSON under one key."""
    tensors = {
        name: getattr(keys, name).detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name in _TENSOR_NAMES
    }
    meta_json = json.dumps(keys.metadata.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return safetensors.torch.save(tensors, metadata={METADATA_KEY: meta_json})


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors blob (u64 little-endian header length, then JSON)."""
    if len(payload) < 8:
        raise ValueError("payload too short for a safetensors header")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > len(payload) - 8:
        raise ValueError("safetensors header runs past the payload")
    header = json.loads(payload[8:8 + n].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("safetensors payload has no metadata")
    return meta


def payload_to_keys(payload: bytes, source: str = "<bytes>") -> PrivacyKeys:
    """Inverse of :func:`keys_to_payload`. Raises ForeignKeyFileError if the payload is not a key set."""
    try:
        meta_json = _safetensors_metadata(payload).get(METADATA_KEY)
        if not isinstance(meta_json, str):
            raise ValueError(f"metadata entry {METADATA_KEY!r} is missing")
        meta_dict = json.loads(meta_json)
    except (ValueError, RecursionError) as e:
        raise ForeignKeyFileError(f"{source}: the authenticated payload is not a Diff-Privacy key set ({e})") from None
    version = meta_dict.get("format_version") if isinstance(meta_dict, dict) else None
    if _is_int(version) and version > KEYS_FORMAT_VERSION:
        raise ForeignKeyFileError(
            f"{source}: the keys use payload format version {version}, but this pack reads up to version "
            f"{KEYS_FORMAT_VERSION}. Update the Diff-Privacy node pack to load them."
        )
    try:
        tensors = safetensors.torch.load(payload)
        if sorted(tensors) != sorted(_TENSOR_NAMES):
            raise ValueError(f"expected tensors {sorted(_TENSOR_NAMES)}, found {sorted(tensors)}")
        return PrivacyKeys(
            stage_tokens=tensors["stage_tokens"],
            stage_conds=tensors["stage_conds"],
            z_T=tensors["z_T"],
            metadata=KeyMetadata.from_dict(meta_dict),
        )
    except (ValueError, TypeError, RuntimeError, safetensors.SafetensorError) as e:
        raise ForeignKeyFileError(f"{source}: the authenticated payload is not a valid key set ({e})") from None

