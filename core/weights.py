"""Weight files on local disk: the one reader every loader in the core uses, with one policy.

* ``.safetensors`` / ``.sft`` files are read with safetensors.
* ``.ckpt``, ``.pt``, ``.pth``, ``.bin`` and ``.pkl`` files are PyTorch pickles and are read with
  ``torch.load(weights_only=True)`` only: PyTorch's restricted unpickler, which builds tensors, storages and
  plain containers and refuses every other global, so a file can never run code while it is read. On top of
  PyTorch's own allow-list exactly :data:`LEGACY_CHECKPOINT_GLOBALS` is allowed, for the training state that
  the original SD 1.x ``.ckpt`` releases carry next to their weights (the globals ComfyUI's loader allows for
  the same files): PyTorch Lightning's ModelCheckpoint callback becomes an inert :class:`LightningCallbackState`
  holding plain data, and numpy's scalar and dtype reconstructors are replaced by checked versions that build
  numeric scalars only. Any other suffix is refused.
* A pickle holding ``{"state_dict": {...}, ...}`` or ``{"model_state_dict": {...}, ...}`` (Lightning and
  training checkpoints) is unwrapped: the inner mapping is the state dict and its siblings (``global_step``,
  ``epoch``, ``callbacks``, optimizer states …) are training metadata, dropped unread.
* A safetensors file whose size differs from what its header describes (a truncated download, bytes appended)
  is reported as damaged, with both sizes.
* What remains must be a non-empty mapping of str names to tensors; a non-tensor entry is an error, not
  something to skip silently.

Nothing is ever downloaded. Every failure raises :class:`core.errors.WeightsNotFoundError` (missing file)
or :class:`core.errors.IncompatibleWeightsError` (anything else) with a message that names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .autograd import normal_tensors
from .errors import IncompatibleWeightsError, WeightsNotFoundError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
#: Keys under which training checkpoints nest the state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict")

#: What ``torch.load`` raises for damaged files besides UnpicklingError (measured on truncated and bit-flipped
#: zip and legacy checkpoints): each is turned into an IncompatibleWeightsError naming the file.
_DAMAGED_PICKLE_ERRORS = (
    RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AssertionError, struct.error,
)


# --------------------------------------------------------------------------------- legacy .ckpt globals
class LightningCallbackState:
    """Inert stand-in for PyTorch Lightning's ModelCheckpoint callback in old ``.ckpt`` files: it only receives
    the callback's pickled attributes (paths, scores), is never called, and is dropped with the training state."""


_NUMERIC_KINDS = "biufc"  # bool, signed/unsigned int, float, complex


def _numeric_dtype(spec, align: bool = False, copy: bool = False) -> np.dtype:
    """numpy's ``dtype`` reconstructor limited to numeric dtypes (what a pickled numpy scalar carries)."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r}: only numeric dtypes may be unpickled")
    dtype = np.dtype(spec)
    if dtype.kind not in _NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r}: only numeric dtypes may be unpickled")
    return dtype


def _numeric_scalar(dtype, data=None):
    """numpy's scalar reconstructor (``numpy.core.multiarray.scalar``) for numeric dtypes and their raw bytes
    only (never the object dtype, whose "data" is an arbitrary Python object)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("refused a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0]


#: The globals allowed beyond ``torch.load(weights_only=True)``'s own list: (object, name in the pickle).
LEGACY_CHECKPOINT_GLOBALS = (
    (LightningCallbackState, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (LightningCallbackState, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (_numeric_scalar, "numpy.core.multiarray.scalar"),
    (_numeric_scalar, "numpy._core.multiarray.scalar"),
    (_numeric_dtype, "numpy.dtype"),
    # the dtype objects _numeric_dtype returns receive their pickled state (byte order …) through BUILD,
    # which the restricted unpickler allows only for allow-listed types
    *((type(np.dtype(code)), f"numpy.dtypes.{type(np.dtype(code)).__name__}") for code in "?bBhHiIlLqQefdFD"),
)


def read_state_dict(path: str | os.PathLike, *, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a local weight file as ``{name: tensor}``, on the CPU, with the dtypes stored in the file.

    ``what`` names the file in error messages, e.g. ``"SD1.x checkpoint"`` or ``"face-recognition weight
    file"``. The tensors are ordinary (not inference-mode) tensors even when called under
    ``torch.inference_mode()``. Key names are returned as stored (no prefix is stripped).

    Raises WeightsNotFoundError (a FileNotFoundError) when ``path`` is not a file, and
    IncompatibleWeightsError for an unsupported suffix, a damaged or truncated file, a pickle that holds
    Python objects other than tensors and plain containers, or content that is not a non-empty mapping of
    names to tensors.
    """
    path = _existing(path, what)
    suffix = path.suffix.lower()
    with normal_tensors():
        if suffix in SAFETENSORS_SUFFIXES:
            raw = _read_safetensors(path, what)
        elif suffix in PICKLE_SUFFIXES:
            raw = _read_pickle(path, what)
        else:
            _unsupported(path, what, suffix)
    return _plain_state_dict(raw, path, what)


#: A safetensors header longer than this is not believed (real headers are well below 10 MB).
MAX_SAFETENSORS_HEADER = 100 * 2 ** 20
_AGAIN = "Copy or download the file again (and compare its size with the original's)."
#: :func:`safetensors_damage`'s answer for a file that does not start like a safetensors file at all
FOREIGN = "it does not start with a safetensors header"


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, in words, or None when its size matches its header.

    Reads the 8-byte little-endian header length and the JSON header (the safetensors format's first two parts),
    never the tensor data. Distinguishes a file that is not safetensors at all, one cut short (inside the header or
    inside the data) and one with bytes appended after its data.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes long, too short to be a safetensors file (truncated?)"
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER:
            return FOREIGN
        if size < 8 + length:
            return f"it ends after {size} bytes, inside its {length}-byte header: the file is truncated"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not valid safetensors JSON"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"it is {size} bytes but its header describes {expected} bytes: the file is truncated"
    if size > expected:
        return (f"it is {size} bytes but its header describes {expected} bytes: {size - expected} extra bytes "
                f"follow the data (damaged, or two files joined)")
    return None


def read_tensor_shapes(path: str | os.PathLike, *, what: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor in a weight file, read cheaply, with :func:`read_state_dict`'s policy.

    A safetensors file is checked for damage and only its header is read (no tensor data, instant even for
    multi-GB files); a PyTorch pickle goes through the same restricted unpickler as :func:`read_state_dict`
    (memory-mapped for the zip format, so the data is not read either) and is unwrapped the same way.

    Raises:
        WeightsNotFoundError, IncompatibleWeightsError: as :func:`read_state_dict`, for the same files.
    """
    path = _existing(path, what)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        problem = safetensors_damage(path)
        if problem is not None:
            _read_safetensors(path, what)  # raises the damaged/foreign error for this problem
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length).decode("utf-8"))
        try:
            shapes = {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()
                      if name != "__metadata__"}
        except (KeyError, TypeError, ValueError):
            raise IncompatibleWeightsError(f"The {what} '{path}' is a damaged or truncated safetensors file: its "
                                           f"header is not valid safetensors JSON. {_AGAIN}") from None
        if not shapes:
            raise IncompatibleWeightsError(f"The {what} '{path}' holds no tensors.")
        return shapes
    if suffix not in PICKLE_SUFFIXES:
        _unsupported(path, what, suffix)
    with normal_tensors():
        raw = _read_pickle(path, what, mmap=True)
    return {name: tuple(tensor.shape) for name, tensor in _plain_state_dict(raw, path, what).items()}


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"The {what} '{path}' was not found. Put the file there or give its correct path; nothing is ever "
            "downloaded."
        )
    return path


def _unsupported(path: Path, what: str, suffix: str):
    raise IncompatibleWeightsError(
        f"The {what} '{path}' has the unsupported file type {suffix or '(none)'!r}: use a "
        f"{'/'.join(SAFETENSORS_SUFFIXES)} file or a PyTorch {'/'.join(PICKLE_SUFFIXES)} checkpoint."
    )


def _read_safetensors(path: Path, what: str) -> object:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problem = safetensors_damage(path)
    if problem is None:
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError):
            problem = "its header or tensor table is inconsistent"
    if problem == FOREIGN:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a safetensors file: {problem}. Check that this is the model file (and not, "
            f"e.g., a web page saved under its name); a PyTorch checkpoint needs a .ckpt/.pt suffix.")
    raise IncompatibleWeightsError(f"The {what} '{path}' is a damaged or truncated safetensors file: {problem}. "
                                   f"{_AGAIN}")


def _read_pickle(path: Path, what: str, mmap: bool = False) -> object:
    """torch.load(weights_only=True) with :data:`LEGACY_CHECKPOINT_GLOBALS`; ``mmap`` maps the storages of a zip-format
    file instead of reading them (the legacy format cannot be mapped and is read)."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(LEGACY_CHECKPOINT_GLOBALS)):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False; it is deliberately not repeated here.
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a plain state dict: it holds pickled Python objects, which are refused "
            "for safety, or it is not a PyTorch checkpoint at all. Use the original file (a dict of tensors) or "
            "a .safetensors copy."
        ) from exc
    except _DAMAGED_PICKLE_ERRORS as exc:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is a damaged or truncated PyTorch checkpoint: it cannot be read "
            f"({type(exc).__name__}). {_AGAIN}"
        ) from exc


def _plain_state_dict(raw: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint and check that a non-empty {str: Tensor} mapping remains."""
    if isinstance(raw, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a plain state dict (a mapping of names to tensors): it holds a "
            f"{type(raw).__name__}."
        )
    if not raw:
        raise IncompatibleWeightsError(f"The {what} '{path}' holds no tensors.")
    unnamed = [k for k in raw if not isinstance(k, str)]
    if unnamed:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a plain state dict: it has names that are not strings, e.g. {unnamed[:5]}."
        )
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a plain state dict: entries {not_tensors[:5]} are not tensors "
            f"({len(not_tensors)} in all)."
        )
    return dict(raw)
