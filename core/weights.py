"""Weight files on local disk: the one reader every loader in the core uses, with one policy.

* ``.safetensors`` / ``.sft`` files are read with safetensors.
* ``.ckpt``, ``.pt``, ``.pth``, ``.bin`` and ``.pkl`` files are PyTorch pickles and are read with
  ``torch.load(weights_only=True)`` only, so a file can never run code while it is read. Any other suffix
  is refused.
* A pickle holding ``{"state_dict": {...}, ...}`` or ``{"model_state_dict": {...}, ...}`` (Lightning and
  training checkpoints) is unwrapped: the inner mapping is the state dict and its siblings (``global_step``,
  ``epoch`` …) are training metadata, dropped unread.
* What remains must be a non-empty mapping of str names to tensors; a non-tensor entry is an error, not
  something to skip silently.

Nothing is ever downloaded. Every failure raises :class:`core.errors.WeightsNotFoundError` (missing file)
or :class:`core.errors.IncompatibleWeightsError` (anything else) with a message that names the file.
"""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Mapping

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
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"The {what} '{path}' was not found. Put the file there or give its correct path; nothing is ever "
            "downloaded."
        )
    suffix = path.suffix.lower()
    with normal_tensors():
        if suffix in SAFETENSORS_SUFFIXES:
            raw = _read_safetensors(path, what)
        elif suffix in PICKLE_SUFFIXES:
            raw = _read_pickle(path, what)
        else:
            raise IncompatibleWeightsError(
                f"The {what} '{path}' has the unsupported file type {suffix or '(none)'!r}: use a "
                f"{'/'.join(SAFETENSORS_SUFFIXES)} file or a PyTorch {'/'.join(PICKLE_SUFFIXES)} checkpoint."
            )
    return _plain_state_dict(raw, path, what)


def _read_safetensors(path: Path, what: str) -> object:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a readable safetensors file (damaged or truncated?): {exc}"
        ) from exc


def _read_pickle(path: Path, what: str) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False; it is deliberately not repeated here.
        raise IncompatibleWeightsError(
            f"The {what} '{path}' is not a plain state dict: it holds pickled Python objects, which are refused "
            "for safety, or it is not a PyTorch checkpoint at all. Use the original file (a dict of tensors) or "
            "a .safetensors copy."
        ) from exc
    except _DAMAGED_PICKLE_ERRORS as exc:
        raise IncompatibleWeightsError(
            f"The {what} '{path}' cannot be read as a PyTorch checkpoint (damaged or truncated file?): "
            f"{type(exc).__name__}: {exc}"
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
