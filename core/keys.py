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
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

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



# --------------------------------------------------------------------------------------------------------
# Whole-photo key sets (payload format version 2)
# --------------------------------------------------------------------------------------------------------

PHOTO_KEYS_FORMAT_VERSION = 2
PHOTO_METADATA_KEY = "diffprivacy.photo_keys"


@dataclass(frozen=True)
class FaceGeometry:
    """Where one aligned face sits in its photo, enough to paste a recovered face back.

    number: the face's 1-based number in reading order. box: detection box (x0, y0, x1, y1) in photo pixels.
    matrix: 2×3 affine map from aligned-crop pixel coordinates to photo pixel coordinates (pixel centres at
    +0.5). crop_size: the aligned crop's side in pixels. photo_size: the photo's (H, W). quad: the crop's corners
    in the photo, 4 × (x, y) (top-left, bottom-left, bottom-right, top-right). All finite.
    """

    number: int
    box: tuple[float, float, float, float]
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    crop_size: int
    photo_size: tuple[int, int]
    quad: tuple[tuple[float, float], ...]

    def __post_init__(self):
        def floats(values, shape, name):
            try:
                arr = [float(v) for v in _flatten(values)]
            except (TypeError, ValueError):
                raise ValueError(f"geometry {name} must be numbers") from None
            if len(arr) != math.prod(shape) or not all(math.isfinite(v) for v in arr):
                raise ValueError(f"geometry {name} must be {shape} finite numbers")
            return arr

        if not _is_int(self.number) or self.number < 1:
            raise ValueError(f"geometry number must be an int ≥ 1, got {self.number!r}")
        box = floats(self.box, (4,), "box")
        m = floats(self.matrix, (2, 3), "matrix")
        q = floats(self.quad, (4, 2), "quad")
        if not _is_int(self.crop_size) or not 8 <= self.crop_size <= 4096:
            raise ValueError(f"geometry crop_size must be an int in [8, 4096], got {self.crop_size!r}")
        size = tuple(self.photo_size) if isinstance(self.photo_size, (list, tuple)) else ()
        if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
            raise ValueError(f"geometry photo_size must be (H, W) positive ints, got {self.photo_size!r}")
        object.__setattr__(self, "box", tuple(box))
        object.__setattr__(self, "matrix", (tuple(m[:3]), tuple(m[3:])))
        object.__setattr__(self, "quad", tuple((q[i], q[i + 1]) for i in range(0, 8, 2)))
        object.__setattr__(self, "photo_size", (int(size[0]), int(size[1])))

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "box": list(self.box), "matrix": [list(r) for r in self.matrix],
                "crop_size": self.crop_size, "photo_size": list(self.photo_size), "quad": [list(p) for p in self.quad]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FaceGeometry":
        if not isinstance(d, dict) or set(d) != {"number", "box", "matrix", "crop_size", "photo_size", "quad"}:
            raise ValueError("face geometry must have exactly number, box, matrix, crop_size, photo_size, quad")
        return cls(**d)


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


@dataclass(eq=False, repr=False)
class PhotoKeys:
    """The recovery keys of one protected photo: per protected face, its key set (key-E + key-I) and its
    geometry. ``photo_size`` is the photo's (H, W). Older single-face key files (payload version 1) load as one
    face without geometry (``geometry[0] is None``): they recover the aligned crop, not the whole photo.
    """

    faces: list[PrivacyKeys]
    geometry: list[Optional[FaceGeometry]]
    photo_size: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if not self.faces or not all(isinstance(k, PrivacyKeys) for k in self.faces):
            raise ValueError("PhotoKeys needs at least one PrivacyKeys")
        if len(self.geometry) != len(self.faces):
            raise ValueError(f"{len(self.faces)} key sets but {len(self.geometry)} geometries")
        placed = [g for g in self.geometry if g is not None]
        if placed and len(placed) != len(self.geometry):
            raise ValueError("either every face has its geometry or none has")
        if placed:
            sizes = {g.photo_size for g in placed}
            if len(sizes) != 1 or (self.photo_size is not None and tuple(self.photo_size) not in sizes):
                raise ValueError("every face's geometry must refer to the same photo size")
            self.photo_size = next(iter(sizes))
            numbers = [g.number for g in placed]
            if len(set(numbers)) != len(numbers):
                raise ValueError(f"face numbers repeat: {numbers}")
        fingerprints = {k.metadata.model_fingerprint.strip().lower() for k in self.faces}
        if len(fingerprints) != 1:
            raise ValueError("every face of a photo must have keys of the same base model")

    @classmethod
    def single(cls, keys: PrivacyKeys) -> "PhotoKeys":
        """One face without geometry (what a version-1 key file holds)."""
        return cls([keys], [None], None)

    @property
    def placed(self) -> bool:
        """True when every face knows where it sits in the photo (whole-photo recovery is possible)."""
        return self.geometry[0] is not None

    @property
    def metadata(self) -> KeyMetadata:
        """The first face's metadata (model fingerprint and DDIM grid are shared by every face)."""
        return self.faces[0].metadata

    def __repr__(self) -> str:
        return f"PhotoKeys(faces={len(self.faces)}, photo_size={self.photo_size}, model={self.metadata.model_fingerprint!r})"


def photo_keys_to_payload(keys: PhotoKeys) -> bytes:
    """Safetensors bytes of a whole-photo key set: tensors ``face{i}.stage_tokens``, ``face{i}.stage_conds``,
    ``face{i}.z_T`` (float32) and one metadata entry (:data:`PHOTO_METADATA_KEY`) with the JSON
    ``{"format_version": 2, "photo_size", "faces": [{"keys": KeyMetadata, "geometry": FaceGeometry}]}``."""
    if not keys.placed:
        raise ValueError("a key set without face geometry is written in the single-face format (keys_to_payload)")
    tensors = {}
    faces = []
    for i, (face, geometry) in enumerate(zip(keys.faces, keys.geometry)):
        for name in _TENSOR_NAMES:
            tensors[f"face{i}.{name}"] = getattr(face, name).detach().to(device="cpu", dtype=torch.float32).contiguous()
        faces.append({"keys": face.metadata.to_dict(), "geometry": geometry.to_dict()})
    meta = {"format_version": PHOTO_KEYS_FORMAT_VERSION, "photo_size": list(keys.photo_size), "faces": faces}
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return safetensors.torch.save(tensors, metadata={PHOTO_METADATA_KEY: meta_json})


def payload_to_photo_keys(payload: bytes, source: str = "<bytes>") -> PhotoKeys:
    """Any key payload → PhotoKeys: version 1 (one face, no geometry) or version 2 (a whole photo).

    Raises ForeignKeyFileError when the payload is neither (or is a newer version than this pack reads).
    """
    try:
        meta = _safetensors_metadata(payload)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ForeignKeyFileError(f"{source}: the authenticated payload is not a Diff-Privacy key set ({e})") from None
    if PHOTO_METADATA_KEY not in meta:
        return PhotoKeys.single(payload_to_keys(payload, source))
    try:
        info = json.loads(meta[PHOTO_METADATA_KEY])
        version = info.get("format_version") if isinstance(info, dict) else None
    except (ValueError, RecursionError, TypeError) as e:
        raise ForeignKeyFileError(f"{source}: the key set's description is damaged ({e})") from None
    if _is_int(version) and version > PHOTO_KEYS_FORMAT_VERSION:
        raise ForeignKeyFileError(
            f"{source}: the keys use payload format version {version}, but this pack reads up to version "
            f"{PHOTO_KEYS_FORMAT_VERSION}. Update the Diff-Privacy node pack to load them.")
    try:
        if version != PHOTO_KEYS_FORMAT_VERSION or not isinstance(info.get("faces"), list) or not info["faces"]:
            raise ValueError("not a whole-photo key set")
        tensors = safetensors.torch.load(payload)
        expected = {f"face{i}.{n}" for i in range(len(info["faces"])) for n in _TENSOR_NAMES}
        if set(tensors) != expected:
            raise ValueError(f"expected tensors for {len(info['faces'])} faces, found {sorted(tensors)[:6]}…")
        faces, geometry = [], []
        for i, face in enumerate(info["faces"]):
            faces.append(PrivacyKeys(tensors[f"face{i}.stage_tokens"], tensors[f"face{i}.stage_conds"],
                                     tensors[f"face{i}.z_T"], KeyMetadata.from_dict(face["keys"])))
            geometry.append(FaceGeometry.from_dict(face["geometry"]))
        return PhotoKeys(faces, geometry, tuple(info["photo_size"]))
    except (ValueError, TypeError, KeyError, RuntimeError, safetensors.SafetensorError) as e:
        raise ForeignKeyFileError(f"{source}: the authenticated payload is not a valid key set ({e})") from None


def photo_keys_digest(keys: PhotoKeys) -> str:
    """SHA-256 (hex) tying a gate receipt to a whole photo's keys: over each face's :func:`stage_conds_digest`
    and geometry, in order. Holds no secret."""
    h = hashlib.sha256()
    for face, geometry in zip(keys.faces, keys.geometry):
        h.update(stage_conds_digest(face.stage_conds).encode())
        h.update(json.dumps(None if geometry is None else geometry.to_dict(), sort_keys=True).encode())
    return h.hexdigest()
