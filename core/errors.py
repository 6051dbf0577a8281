"""Exceptions the core raises. Each message says what went wrong and what to do about it."""
from __future__ import annotations


class DiffPrivacyError(Exception):
    """Base class of every error this package raises on purpose."""


class FaceNotFoundError(DiffPrivacyError):
    """No face was detected in an image that needs one."""


class MultipleFacesError(DiffPrivacyError):
    """More than one face was found where exactly one is required."""


class InvalidImageError(DiffPrivacyError):
    """The image cannot be used (wrong channel count, too small, too large, NaN …)."""


class WeightsNotFoundError(DiffPrivacyError, FileNotFoundError):
    """A model weight file is missing; the message names the folder and the expected file."""


class IncompatibleWeightsError(DiffPrivacyError):
    """A weight file was found but does not match the expected architecture."""


class UnsupportedModelError(IncompatibleWeightsError):
    """The model is of another family than SD 1.x ε-prediction text-to-image (inpainting, SD 2.x, SDXL, SD3, Flux, a
    LoRA …); the message names the family and what to load instead. ``family`` is the key of
    ``core.model_family.FAMILIES``."""

    def __init__(self, message: str, family: str = "unknown"):
        super().__init__(message)
        self.family = family


class KeyFileError(DiffPrivacyError):
    """Base class for problems with a recovery-key file."""


class WrongPassphraseError(KeyFileError):
    """The passphrase does not open this key file."""


class PassphraseRequiredError(KeyFileError):
    """The key file is encrypted (or must be written encrypted) and no passphrase was given."""


class PassphraseFormatError(KeyFileError, ValueError):
    """A passphrase for new keys starts or ends with whitespace or an invisible character (usually copied along by
    mistake); it is refused rather than written into a key file that would need it, exactly, to open."""


class TamperedKeyFileError(KeyFileError):
    """The key file was opened with the right passphrase but its content fails authentication."""


class TruncatedKeyFileError(KeyFileError):
    """The key file is shorter than its header says: an incomplete copy or download."""


class ForeignKeyFileError(KeyFileError):
    """The file is not a Diff-Privacy key file (or a newer format this version cannot read)."""


class DamagedKeyFileError(TamperedKeyFileError):
    """The key file's header no longer matches its own checksum (a damaged salt, KDF parameter, …)."""


class KeyDerivationCostError(KeyFileError):
    """A key file asks for more key-derivation work than any file this pack writes (a denial-of-service guard)."""


class PlaintextKeyFileError(KeyFileError):
    """An unencrypted key file was offered without the explicit opt-in to load unencrypted keys."""


class KeyFileExistsError(KeyFileError, FileExistsError):
    """A key file of that name exists already; key files are never replaced."""


class KeyFileLocationError(KeyFileError, ValueError):
    """A key file name points outside the folders key files are kept in (an absolute path, a ``..`` or a symbolic
    link leading out), or the keys folder itself lies where a web server hands files out."""


class KeyMismatchError(KeyFileError):
    """The keys were made with another base model or other settings than the ones given now."""


class CancelledError(DiffPrivacyError):
    """A long loop was stopped by the caller's cancellation check."""


class ProtectionFailedError(DiffPrivacyError):
    """A protected output still matches the source identity; nothing was output (fail closed)."""
