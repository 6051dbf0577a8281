"""Save Privacy Keys / Load Privacy Keys: key-E + key-I encrypted at rest (scrypt → AES-256-GCM).

Key files live in the keys folder, ``<ComfyUI models>/diff_privacy_keys`` unless extra_model_paths.yaml maps
``diff_privacy_keys`` elsewhere: outside every folder ComfyUI serves over HTTP. Save names them
``<prefix>_<NNNNN>.dpkey`` with the next free counter and never replaces a file; Load opens only files inside
the keys folders.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from comfy_api.latest import io, ui

from ..core.autograd import as_normal
from ..core.errors import KeyFileError, KeyFileExistsError, KeyFileLocationError
from ..core.keyfile import load_keys, save_keys
from ..core.keys import PrivacyKeys
from .comfy.folders import (KEY_FILE_EXTENSION, key_file_path, keys_directory, list_key_files,
                            served_keys_folder_message)
from .comfy.models import to_comfy_latent, to_scaled_latent
from .types import CATEGORY, PrivacyEmbeds, PrivacyEmbedsType

SAVE_NODE = "Save Privacy Keys"
LOAD_NODE = "Load Privacy Keys"
ENV_PREFIX = "env:"
DEFAULT_PASSPHRASE_SOURCE = "env:DIFF_PRIVACY_PASSPHRASE"
PASSPHRASE_TOOLTIP = ("Passphrase that encrypts the keys. Prefer 'env:NAME' (read from the environment variable "
                      "NAME of the ComfyUI process): text typed here is stored in the workflow and in the "
                      "metadata of every image SaveImage writes.")
#: names tried in a row when another save takes the next counter between the listing and the write
SAVE_ATTEMPTS = 16
COUNTER_DIGITS = 5
def resolve_passphrase(value: str) -> str | None:
    """'env:NAME' → the variable's value; '' → None; anything else is the passphrase itself."""
    value = value or ""
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):].strip()
        secret = os.environ.get(name)
        if not secret:
            raise ValueError(f"The passphrase is to be read from the environment variable {name!r}, which is not "
                             f"set in the ComfyUI process. Set it before starting ComfyUI "
                             f"(e.g. export {name}='…') or type the passphrase into the node.")
        return secret
    return value or None


# ------------------------------------------------------------------------------------------ file names
def safe_prefix(prefix: str) -> str:
    """``filename_prefix`` as a plain file-name start: runs of anything but letters, digits, '_', '.', '-'
    become '_', leading dots go (no hidden files, no '..'); 'keys' when nothing is left."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", (prefix or "").strip()).lstrip(".")
    return prefix or "keys"


def key_file_name(prefix: str, counter: int) -> str:
    """``<prefix>_<NNNNN>.dpkey`` (ComfyUI's image-saver numbering)."""
    return f"{prefix}_{counter:0{COUNTER_DIGITS}d}{KEY_FILE_EXTENSION}"


def next_key_counter(folder: str, prefix: str) -> int:
    """1 + the highest counter of the ``<prefix>_<NNNNN>.dpkey`` files in ``folder`` (1 when there are none or
    the folder does not exist yet)."""
    pattern = re.compile(rf"{re.escape(prefix)}_(\d{{{COUNTER_DIGITS},}}){re.escape(KEY_FILE_EXTENSION)}")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 1
    counters = [int(m.group(1)) for m in map(pattern.fullmatch, names) if m]
    return max(counters, default=0) + 1


def write_key_file(keys: PrivacyKeys, filename_prefix: str, secret: str | None, allow_plaintext: bool) -> Path:
    """Write ``keys`` as a new ``<prefix>_<NNNNN>.dpkey`` in the keys folder with the next free counter.

    The file is created by ``core.keyfile.save_keys``, which never replaces a file; when another save takes the
    name between the listing and the write (KeyFileExistsError), the next counter is tried, up to
    :data:`SAVE_ATTEMPTS` names. Returns the path written.

    Raises:
        KeyFileLocationError: the keys folder lies inside a folder ComfyUI serves over HTTP.
        KeyFileExistsError: :data:`SAVE_ATTEMPTS` names in a row were taken.
        OSError: the folder or file cannot be written.
        Other errors of ``core.keyfile.save_keys`` (no passphrase without ``allow_plaintext``).
    """
    refusal = served_keys_folder_message(SAVE_NODE)
    if refusal:
        raise KeyFileLocationError(refusal)
    folder = keys_directory()
    prefix = safe_prefix(filename_prefix)
    counter = next_key_counter(folder, prefix)
    for _ in range(SAVE_ATTEMPTS):
        try:
            return save_keys(os.path.join(folder, key_file_name(prefix, counter)), keys, secret,
                             allow_plaintext=allow_plaintext)
        except KeyFileExistsError:
            counter = max(counter + 1, next_key_counter(folder, prefix))
    raise KeyFileExistsError(errno.EEXIST, f"{SAVE_NODE}: {SAVE_ATTEMPTS} key file names in a row were taken by "
                                           f"other saves; nothing was written, run the prompt again",
                             os.path.join(folder, key_file_name(prefix, counter)))


class SavePrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacy_SaveKeys",
            display_name="Save Privacy Keys",
            category=CATEGORY,
            description="Writes key-E and key-I, encrypted with the passphrase, to a new file "
                        "<prefix>_<NNNNN>.dpkey (next free number, never replacing a file) in the keys folder: "
                        "<ComfyUI models>/diff_privacy_keys, or where extra_model_paths.yaml maps "
                        "diff_privacy_keys. ComfyUI serves no model folder over HTTP (unlike output/). Whoever "
                        "holds the file and passphrase can restore the face.",
            is_output_node=True,
            inputs=[
                PrivacyEmbedsType.Input("embeds", tooltip="key-E from MSI Invert."),
                io.Latent.Input("key_latent", tooltip="key-I from MSI Invert."),
                io.String.Input("filename_prefix", default="face", tooltip="Start of the key file's name."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
                io.Boolean.Input("allow_plaintext", default=False,
                                 tooltip="Write an UNENCRYPTED key file when the passphrase is empty. Keys are "
                                         "biometric secrets: leave this off."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the key file was written.")],
        )

    @classmethod
    def execute(cls, embeds, key_latent, filename_prefix, passphrase, allow_plaintext) -> io.NodeOutput:
        secret = resolve_passphrase(passphrase)
        # key-I travels as a LATENT (unscaled, what MSI Invert outputs); the file stores the scaled z_T. Key
        # files belong to SD1.x checkpoints, so without a MODEL input the SD1.x latent format converts it.
        z_T = as_normal(to_scaled_latent(None, key_latent).cpu())
        keys = PrivacyKeys(as_normal(embeds.stage_tokens), as_normal(embeds.stage_conds), z_T, embeds.metadata)
        path = write_key_file(keys, filename_prefix, secret, allow_plaintext)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"keys saved: {path.name}"))


class LoadPrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacy_LoadKeys",
            display_name="Load Privacy Keys",
            category=CATEGORY,
            description="Opens a .dpkey file from the keys folder (<ComfyUI models>/diff_privacy_keys, or where "
                        "extra_model_paths.yaml maps diff_privacy_keys) with its passphrase. Files outside it are "
                        "refused.",
            inputs=[
                io.Combo.Input("key_file", options=list_key_files(),
                               tooltip="A key file in the keys folder, models/diff_privacy_keys (press R to "
                                       "refresh)."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
            ],
            outputs=[
                PrivacyEmbedsType.Output(display_name="embeds", tooltip="key-E."),
                io.Latent.Output(display_name="key_latent", tooltip="key-I."),
            ],
        )

    @classmethod
    def validate_inputs(cls, key_file=None):
        """Refuse the prompt before anything runs when ``key_file`` is not a file in the keys folders."""
        if key_file is None:  # a linked input, unknown before running
            return True
        try:
            key_file_path(key_file, LOAD_NODE)
        except (KeyFileError, OSError) as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, key_file, passphrase=None):
        try:
            return os.path.getmtime(key_file_path(key_file, LOAD_NODE))
        except (KeyFileError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, key_file, passphrase) -> io.NodeOutput:
        keys = load_keys(key_file_path(key_file, LOAD_NODE), resolve_passphrase(passphrase))
        embeds = PrivacyEmbeds(keys.stage_tokens, keys.stage_conds, keys.metadata)
        latent = to_comfy_latent(None, keys.z_T)  # SD1.x latent format: see SavePrivacyKeys
        return io.NodeOutput(embeds, latent)
