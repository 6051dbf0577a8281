"""Save Privacy Keys / Load Privacy Keys: key-E + key-I encrypted at rest (scrypt → AES-256-GCM)."""
from __future__ import annotations

import os
import re
import time

from comfy_api.latest import io, ui

from ..core.autograd import as_normal
from ..core.errors import KeyMismatchError
from ..core.keyfile import load_keys, save_keys
from ..core.keys import PrivacyKeys, stage_conds_digest
from .comfy.folders import key_file_path, keys_directory, list_key_files, missing_key_file_message
from .comfy.models import to_comfy_latent, to_scaled_latent
from .types import CATEGORY, PrivacyEmbeds, PrivacyEmbedsType, ReceiptType

ENV_PREFIX = "env:"
DEFAULT_PASSPHRASE_SOURCE = "env:DIFF_PRIVACY_PASSPHRASE"
PASSPHRASE_TOOLTIP = ("Passphrase that encrypts the keys. Prefer 'env:NAME' (read from the environment variable "
                      "NAME of the ComfyUI process): text typed here is stored in the workflow and in the "
                      "metadata of every image SaveImage writes.")


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


def check_receipt(receipt, embeds) -> None:
    """Refuse to save keys the identity gate did not vouch for: Privacy Sampler's receipt must name these
    key-E (``stage_conds_digest``) and the model they were made with.

    Raises:
        KeyMismatchError: saying which input does not match and how to wire the nodes.
    """
    if not receipt.keys_digest:
        raise KeyMismatchError(
            "Save Privacy Keys: the receipt at its 'receipt' input vouches for no keys, because Privacy Sampler's "
            "'embeds' input is not connected. Connect MSI Invert's 'embeds' output to Privacy Sampler's 'embeds' "
            "input as well; nothing was saved.")
    if receipt.keys_digest != stage_conds_digest(embeds.stage_conds):
        raise KeyMismatchError(
            "Save Privacy Keys: the receipt at its 'receipt' input is for other keys than the ones at its 'embeds' "
            "input. Connect the same MSI Invert 'embeds' output to Privacy Sampler's and Save Privacy Keys' "
            "'embeds' inputs; nothing was saved.")
    if receipt.model_fingerprint != embeds.metadata.model_fingerprint:
        raise KeyMismatchError(
            f"Save Privacy Keys: the keys at its 'embeds' input were made with model "
            f"{embeds.metadata.model_fingerprint!r}, but Privacy Sampler ran on model {receipt.model_fingerprint!r}. "
            f"Use the same checkpoint for MSI Invert and Privacy Sampler; nothing was saved.")


def safe_prefix(prefix: str) -> str:
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix.strip()) or "keys"
    return prefix.lstrip(".")


class SavePrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacy_SaveKeys",
            display_name="Save Privacy Keys",
            category=CATEGORY,
            description="Writes key-E and key-I to output/diff_privacy_keys/<prefix>_<time>.dpkey, encrypted "
                        "with the passphrase. Whoever holds the file and passphrase can restore the face.",
            is_output_node=True,
            inputs=[
                PrivacyEmbedsType.Input("embeds", tooltip="key-E from MSI Invert."),
                io.Latent.Input("key_latent", tooltip="key-I from MSI Invert."),
                io.String.Input("filename_prefix", default="face", tooltip="Start of the key file's name."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
                io.Boolean.Input("allow_plaintext", default=False,
                                 tooltip="Write an UNENCRYPTED key file when the passphrase is empty. Keys are "
                                         "biometric secrets: leave this off."),
                ReceiptType.Input("receipt",
                                  tooltip="From Privacy Sampler: it exists only once the identity gate has passed, "
                                          "so keys are never saved for a failed or cancelled run."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the key file was written.")],
        )

    @classmethod
    def execute(cls, embeds, key_latent, filename_prefix, passphrase, allow_plaintext, receipt) -> io.NodeOutput:
        check_receipt(receipt, embeds)
        secret = resolve_passphrase(passphrase)
        # key-I travels as a LATENT (unscaled, what MSI Invert outputs); the file stores the scaled z_T. Key
        # files belong to SD1.x checkpoints, so without a MODEL input the SD1.x latent format converts it.
        z_T = as_normal(to_scaled_latent(None, key_latent).cpu())
        keys = PrivacyKeys(as_normal(embeds.stage_tokens), as_normal(embeds.stage_conds), z_T, embeds.metadata)
        name = f"{safe_prefix(filename_prefix)}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid() % 1000:03d}.dpkey"
        path = save_keys(os.path.join(keys_directory(), name), keys, secret,
                         allow_plaintext=allow_plaintext)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"keys saved: {path.name}"))


class LoadPrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacy_LoadKeys",
            display_name="Load Privacy Keys",
            category=CATEGORY,
            description="Opens a .dpkey file from output/diff_privacy_keys with its passphrase.",
            inputs=[
                io.Combo.Input("key_file", options=list_key_files(),
                               tooltip="A key file in output/diff_privacy_keys (press R to refresh)."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
            ],
            outputs=[
                PrivacyEmbedsType.Output(display_name="embeds", tooltip="key-E."),
                io.Latent.Output(display_name="key_latent", tooltip="key-I."),
            ],
        )

    @classmethod
    def validate_inputs(cls, key_file):
        if not os.path.isfile(key_file_path(key_file)):
            return missing_key_file_message(key_file)
        return True

    @classmethod
    def fingerprint_inputs(cls, key_file, passphrase):
        path = key_file_path(key_file)
        return os.path.getmtime(path) if os.path.exists(path) else float("nan")

    @classmethod
    def execute(cls, key_file, passphrase) -> io.NodeOutput:
        keys = load_keys(key_file_path(key_file), resolve_passphrase(passphrase))
        embeds = PrivacyEmbeds(keys.stage_tokens, keys.stage_conds, keys.metadata)
        latent = to_comfy_latent(None, keys.z_T)  # SD1.x latent format: see SavePrivacyKeys
        return io.NodeOutput(embeds, latent)
