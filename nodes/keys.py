"""Save Privacy Keys / Load Privacy Keys: key-E + key-I encrypted at rest (scrypt → AES-256-GCM).

Key files live in the keys folder, ``<ComfyUI models>/diff_privacy_keys`` unless extra_model_paths.yaml maps
``diff_privacy_keys`` elsewhere: outside every folder ComfyUI serves over HTTP. Save names them
``<prefix>_<NNNNN>.dpkey`` with the next free counter and never replaces a file; Load opens only files inside
the keys folders. Both check what they can before anything runs (``validate_inputs``), and every error names the
node and the widget to change.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..core.autograd import as_normal
from ..core.errors import (KeyFileError, KeyFileExistsError, KeyFileLocationError, KeyMismatchError,
                           PassphraseFormatError, PassphraseRequiredError, PlaintextKeyFileError,
                           WrongPassphraseError)
from ..core.keyfile import inspect_key_file, load_photo_keys, save_keys
from ..core.keys import PhotoKeys, PrivacyKeys, stage_conds_digest
from ..core.passphrase import invisible_edge
from .comfy.folders import (KEY_FILE_EXTENSION, key_file_path, keys_directory, list_key_files,
                            served_keys_folder_message)
from .comfy.models import to_comfy_latent, to_scaled_latent
from .comfy.outputs import blocked
from .schema import schema
from .types import CATEGORY, AlignmentType, PhotoKeysBatch, PhotoKeysType, PrivacyEmbeds, PrivacyEmbedsType, ReceiptType

SAVE_NODE = "Save Privacy Keys"
SAVE_PHOTO_NODE = "Save Photo Keys"
LOAD_NODE = "Load Privacy Keys"
ENV_PREFIX = "env:"
DEFAULT_PASSPHRASE_SOURCE = "env:DIFF_PRIVACY_PASSPHRASE"
PASSPHRASE_TOOLTIP = ("Passphrase that encrypts the keys. Prefer 'env:NAME' (read from the environment variable "
                      "NAME of the ComfyUI process): text typed here is stored in the workflow and in the "
                      "metadata of every image SaveImage writes.")
LOAD_PLAINTEXT_TOOLTIP = ("Also open UNENCRYPTED key files (saved with allow_plaintext). Anyone who can put a file "
                          "in the keys folder can write one, so they are refused unless this is on; encrypted files "
                          "are unaffected. Leave it off.")
#: names tried in a row when another save takes the next counter between the listing and the write
SAVE_ATTEMPTS = 16
COUNTER_DIGITS = 5
# ------------------------------------------------------------------------------------------ passphrases
def _env_name(value: str) -> str | None:
    """NAME of an 'env:NAME' passphrase source, None for a typed passphrase."""
    return value[len(ENV_PREFIX):].strip() if value.startswith(ENV_PREFIX) else None


def _env_problem(node: str, name: str) -> str:
    if not name:
        return (f"{node}: passphrase is 'env:' without a variable name; write env:NAME (the environment variable "
                f"NAME of the ComfyUI process holds the passphrase) or type the passphrase itself.")
    return (f"{node}: passphrase reads the environment variable {name}, which is not set (or is empty) in the "
            f"ComfyUI process. Set it before starting ComfyUI (e.g. export {name}='…') or type the passphrase into "
            f"the node's passphrase widget.")


def resolve_passphrase(value: str | None, node: str = LOAD_NODE) -> str | None:
    """The passphrase a passphrase widget stands for: 'env:NAME' → that environment variable's value, '' → None,
    anything else → itself (unchanged: whitespace is significant).

    Raises:
        PassphraseRequiredError: 'env:NAME' and NAME is not set or empty (the message names ``node``).
    """
    value = value or ""
    name = _env_name(value)
    if name is None:
        return value or None
    secret = os.environ.get(name) if name else None
    if not secret:
        raise PassphraseRequiredError(_env_problem(node, name))
    return secret


def _save_passphrase_check(passphrase: str, allow_plaintext: bool) -> tuple[type[KeyFileError], str] | None:
    """(error class, message) of :func:`save_passphrase_problem`, or None."""
    passphrase = passphrase or ""
    name = _env_name(passphrase)
    if name is not None:
        secret = os.environ.get(name) if name else None
        if not secret:
            return PassphraseRequiredError, _env_problem(SAVE_NODE, name)
        source = f"the environment variable {name}"
    elif not passphrase:
        if allow_plaintext:
            return None
        return PassphraseRequiredError, (
            f"{SAVE_NODE}: passphrase is empty. Recovery keys are biometric secrets and are saved encrypted: type a "
            f"passphrase (or env:NAME) into passphrase; to write an unencrypted key file on purpose, switch on "
            f"allow_plaintext on the {SAVE_NODE} node.")
    else:
        secret, source = passphrase, "the passphrase widget"
    edge = invisible_edge(secret)
    if edge:
        return PassphraseFormatError, (
            f"{SAVE_NODE}: the passphrase in {source} {edge}. That is usually an invisible character copied along "
            f"with it (a trailing space or newline, e.g. from a file read with $(cat …), or a zero-width space); it "
            f"would be needed, exactly, to open the key file again, so it is refused. Remove it from {source}.")
    return None


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


def save_inputs_problem(node: str, passphrase: str | None, allow_plaintext: bool | None) -> str | None:
    """What a key-saving node (``node``) refuses before the prompt runs: a keys folder ComfyUI serves over HTTP, or
    no usable passphrase (:func:`save_passphrase_problem`); None when nothing is wrong. Linked inputs arrive as None
    (unknown until run time) and are not judged."""
    refusal = served_keys_folder_message(node)
    if refusal:
        return refusal
    if passphrase is None or (allow_plaintext is None and not passphrase):
        return None
    return save_passphrase_problem(passphrase, bool(allow_plaintext))


def check_photo_receipt(receipt, keys: PhotoKeysBatch) -> None:
    """Refuse to save whole-photo keys the identity gate did not vouch for: Protect Faces' receipt must name
    exactly these keys and their model.

    Raises:
        KeyMismatchError: saying how to wire the nodes.
    """
    from .protect_faces import batch_digest

    if not keys.photos:
        raise KeyMismatchError(f"{SAVE_PHOTO_NODE}: the 'keys' input holds no keys (no face was protected by the "
                               f"method, e.g. only fallbacks were applied); nothing was saved.")
    if receipt.keys_digest != batch_digest(keys):
        raise KeyMismatchError(
            f"{SAVE_PHOTO_NODE}: the receipt at its 'receipt' input is for other keys than the ones at its 'keys' "
            f"input. Connect the same Protect Faces node's 'keys' and 'receipt' outputs; nothing was saved.")
    if any(k.metadata.model_fingerprint != receipt.model_fingerprint for k in keys.photos):
        raise KeyMismatchError(f"{SAVE_PHOTO_NODE}: the keys were made with another model than the receipt's run; "
                               f"nothing was saved.")


def save_passphrase_problem(passphrase: str, allow_plaintext: bool) -> str | None:
    """Why Save Privacy Keys cannot encrypt with the passphrase widget's value ``passphrase``, or None.

    Refused: an empty widget without allow_plaintext (with it, the file is written unencrypted on purpose),
    'env:NAME' with NAME unset or empty (always: a missing variable is a setup mistake, not a request for an
    unencrypted file), and a passphrase that starts or ends with whitespace or an invisible character.
    """
    check = _save_passphrase_check(passphrase, allow_plaintext)
    return check[1] if check else None


def save_passphrase(passphrase: str, allow_plaintext: bool) -> str | None:
    """The passphrase Save Privacy Keys encrypts with; None (an unencrypted file) only for an empty passphrase
    widget together with allow_plaintext.

    Raises:
        PassphraseRequiredError: no usable passphrase (see :func:`save_passphrase_problem`).
        PassphraseFormatError: the passphrase starts or ends with whitespace or an invisible character.
    """
    check = _save_passphrase_check(passphrase, allow_plaintext)
    if check:
        error, message = check
        raise error(message)
    return resolve_passphrase(passphrase, SAVE_NODE)


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


def write_key_file(keys: PrivacyKeys | PhotoKeys, filename_prefix: str, secret: str | None, allow_plaintext: bool,
                   node: str = SAVE_NODE) -> Path:
    """Write ``keys`` as a new ``<prefix>_<NNNNN>.dpkey`` in the keys folder with the next free counter.

    The file is created by ``core.keyfile.save_keys``, which never replaces a file; when another save takes the
    name between the listing and the write (KeyFileExistsError), the next counter is tried, up to
    :data:`SAVE_ATTEMPTS` names. Returns the path written.

    Raises:
        KeyFileLocationError: the keys folder lies inside a folder ComfyUI serves over HTTP.
        KeyFileExistsError: :data:`SAVE_ATTEMPTS` names in a row were taken.
        PassphraseRequiredError: ``secret`` None without ``allow_plaintext`` (in the node's terms).
        OSError: the folder or file cannot be written.
    """
    refusal = served_keys_folder_message(node)
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
        except PassphraseRequiredError as exc:
            raise PassphraseRequiredError(save_passphrase_problem("", allow_plaintext) or str(exc)) from exc
    raise KeyFileExistsError(errno.EEXIST, f"{SAVE_NODE}: {SAVE_ATTEMPTS} key file names in a row were taken by "
                                           f"other saves; nothing was written, run the prompt again",
                             os.path.join(folder, key_file_name(prefix, counter)))


# ------------------------------------------------------------------------------------------ loading
def load_problem(key_file, passphrase: str | None, allow_plaintext: bool | None) -> str | None:
    """What Load Privacy Keys can tell before running: the key file is not a file in the keys folder, it is
    unencrypted without allow_plaintext, it is damaged (header), or it is encrypted and the passphrase source is
    missing. None when nothing is wrong (the passphrase itself is only checked when the file is opened).
    ``passphrase`` or ``allow_plaintext`` None (a linked input, unknown before running) skips its check."""
    try:
        path = key_file_path(key_file, LOAD_NODE)
        encrypted = inspect_key_file(path)["encrypted"]
    except (KeyFileError, OSError) as exc:
        return str(exc) if str(exc).startswith(LOAD_NODE) else f"{LOAD_NODE}: {exc}"
    if not encrypted and allow_plaintext is False:
        return _plaintext_refusal(key_file)
    if encrypted and passphrase is not None:
        try:
            if resolve_passphrase(passphrase, LOAD_NODE) is None:
                return _passphrase_missing(key_file)
        except PassphraseRequiredError as exc:
            return str(exc)
    return None


def _plaintext_refusal(key_file: str) -> str:
    return (f"{LOAD_NODE}: {key_file!r} is not encrypted, so anyone who could put a file into the keys folder "
            f"could have written it; it was refused. Load unencrypted key files only on purpose: switch on "
            f"allow_plaintext on the {LOAD_NODE} node for files you saved yourself with allow_plaintext.")


def _passphrase_missing(key_file: str) -> str:
    return (f"{LOAD_NODE}: {key_file!r} is encrypted and passphrase is empty: give the passphrase (or env:NAME) the "
            f"keys were saved with.")


def open_key_file(key_file: str, passphrase: str | None, allow_plaintext: bool) -> PhotoKeys:
    """Resolve, read and decrypt the key file ``key_file`` as Load Privacy Keys does: every face's keys (one
    face without geometry for a single-face file).

    Raises (each message names Load Privacy Keys and the widget to change):
        KeyFileLocationError, FileNotFoundError: see ``nodes.comfy.folders.key_file_path``.
        PassphraseRequiredError: the file is encrypted and there is no passphrase ('env:NAME' unset included).
        WrongPassphraseError: the passphrase does not open it (with a hint when it has surrounding whitespace).
        PlaintextKeyFileError: the file is unencrypted and allow_plaintext is off.
        other core.errors.KeyFileError: damaged, truncated, tampered, foreign or over-costly files.
    """
    path = key_file_path(key_file, LOAD_NODE)
    name = _env_name(passphrase or "")
    if name is None:
        secret = passphrase or None
    else:
        secret = (os.environ.get(name) if name else None) or None
    try:
        return load_photo_keys(path, secret, allow_plaintext=allow_plaintext)
    except PassphraseRequiredError as exc:
        message = _env_problem(LOAD_NODE, name) if name is not None else _passphrase_missing(key_file)
        raise PassphraseRequiredError(message) from exc
    except PlaintextKeyFileError as exc:
        raise PlaintextKeyFileError(_plaintext_refusal(key_file)) from exc
    except WrongPassphraseError as exc:
        message = f"{LOAD_NODE}: {exc}"
        edge = invisible_edge(secret or "")
        if edge:
            source = f"the environment variable {name}" if name is not None else "the passphrase widget"
            message += (f" Note: the passphrase in {source} {edge}, probably copied along by mistake; remove it "
                        f"and try again.")
        raise WrongPassphraseError(message) from exc
    except KeyFileError as exc:
        raise type(exc)(f"{LOAD_NODE}: {exc}") from exc


class SavePrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_SaveKeys",
            display_name="Save Privacy Keys",
            category=CATEGORY,
            description="Writes key-E and key-I, encrypted with the passphrase, to a new file "
                        "<prefix>_<NNNNN>.dpkey (next free number, never replacing a file) in the keys folder: "
                        "<ComfyUI models>/diff_privacy_keys, or where extra_model_paths.yaml maps "
                        "diff_privacy_keys. ComfyUI serves no model folder over HTTP (unlike output/). Whoever "
                        "holds the file and passphrase can restore the face. With Face Align's alignment: one file "
                        "per photo of its batch, holding every protected face of that photo and where it sits.",
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
                AlignmentType.Input("alignment", optional=True,
                                    tooltip="From Face Align: also stores where each face sits in its photo, one key "
                                            "file per photo, so Recover Photo can restore the whole photo (not only "
                                            "the face crops). Required for the keys of several faces."),
            ],
            outputs=[io.String.Output(display_name="path",
                                      tooltip="Where the key file(s) were written, one per line.")],
        )

    @classmethod
    def validate_inputs(cls, passphrase=None, allow_plaintext=None):
        """Refuse the prompt before anything runs (:func:`save_inputs_problem`)."""
        return save_inputs_problem(SAVE_NODE, passphrase, allow_plaintext) or True

    @classmethod
    def execute(cls, embeds, key_latent, filename_prefix, passphrase, allow_plaintext, receipt,
                alignment=None) -> io.NodeOutput:
        check_receipt(receipt, embeds)
        secret = save_passphrase(passphrase, allow_plaintext)
        keys = face_keys(embeds, key_latent)
        if alignment is None:
            if len(keys) > 1:
                raise ValueError(f"{SAVE_NODE}: the keys at its 'embeds' input are those of {len(keys)} faces; connect "
                                 f"Face Align's 'alignment' output to its 'alignment' input, so each photo's faces are "
                                 f"saved in that photo's key file with where they sit. Nothing was saved.")
            path = write_key_file(keys[0], filename_prefix, secret, allow_plaintext)
            return io.NodeOutput(str(path), ui=ui.PreviewText(f"keys saved: {path.name}"))
        photos = photo_keys_of(keys, alignment)
        paths = [write_key_file(photo, filename_prefix, secret, allow_plaintext) for photo in photos if photo]
        lines = [f"photo {p + 1}: no face protected by the method, so no key file"
                 for p, photo in enumerate(photos) if photo is None]
        return io.NodeOutput("\n".join(str(p) for p in paths),
                             ui=ui.PreviewText("\n".join(["keys saved: " + ", ".join(p.name for p in paths), *lines])))


def face_keys(embeds: PrivacyEmbeds, key_latent: dict) -> list[PrivacyKeys]:
    """Each face's key set from key-E of N faces and key-I [N,4,h,w] (one face: key-I as given).

    key-I travels as a LATENT (unscaled, what MSI Invert outputs); the files store the scaled z_T. Key files
    belong to SD1.x checkpoints, so without a MODEL input the SD1.x latent format converts it.

    Raises:
        ValueError: key-I holds another number of latents than key-E holds faces.
    """
    z_T = as_normal(to_scaled_latent(None, key_latent).cpu())
    faces = embeds.num_faces
    if faces == 1:
        return [PrivacyKeys(as_normal(embeds.stage_tokens), as_normal(embeds.stage_conds), z_T, embeds.metadata)]
    if z_T.shape[0] != faces:
        raise ValueError(f"{SAVE_NODE}: its 'key_latent' holds {z_T.shape[0]} latent(s) but its 'embeds' the key-E "
                         f"of {faces} faces; connect both outputs of the same MSI Invert. Nothing was saved.")
    return [PrivacyKeys(as_normal(embeds.face_tokens[i]), as_normal(embeds.face_conds[i]), z_T[i : i + 1],
                        embeds.metadata) for i in range(faces)]


def photo_keys_of(keys: list[PrivacyKeys], alignment) -> list[PhotoKeys | None]:
    """One whole-photo key set per photo of Face Align's batch (None for a photo without a protected face): face k
    of the keys is face k of the alignment (both in Face Align's order).

    Raises:
        ValueError: another face count, or keys made for another crop size than the alignment's.
    """
    if len(alignment.faces) != len(keys):
        raise ValueError(f"{SAVE_NODE}: the alignment at its 'alignment' input has {len(alignment.faces)} face(s) but "
                         f"the keys are those of {len(keys)}; connect the Face Align node that fed MSI Invert. "
                         f"Nothing was saved.")
    size = alignment.crop_size
    if tuple(keys[0].metadata.image_size) != (size, size):
        raise ValueError(f"{SAVE_NODE}: the keys are for a {keys[0].metadata.image_size[1]} px face crop but the "
                         f"alignment at its 'alignment' input made {size} px crops; connect the Face Align node "
                         f"that fed MSI Invert. Nothing was saved.")
    out: list[PhotoKeys | None] = []
    for p in range(len(alignment.photos)):
        ks = alignment.faces_of(p)
        out.append(PhotoKeys([keys[k] for k in ks], [alignment.faces[k].geometry() for k in ks],
                             alignment.faces[ks[0]].aligned.source_size) if ks else None)
    return out


class SavePhotoKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_SavePhotoKeys",
            display_name=SAVE_PHOTO_NODE,
            description="Writes the recovery keys of whole photos from Protect Faces: one encrypted file per "
                        "photo, <prefix>_<NNNNN>.dpkey in the keys folder (never replacing a file), holding every "
                        "protected face's key-E and key-I and where the face sits, so Recover Photo can restore "
                        "the photo. Same folder, passphrase and rules as Save Privacy Keys.",
            is_output_node=True,
            inputs=[
                PhotoKeysType.Input("keys", tooltip="From Protect Faces."),
                io.String.Input("filename_prefix", default="photo", tooltip="Start of the key files' names."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
                io.Boolean.Input("allow_plaintext", default=False,
                                 tooltip="Write UNENCRYPTED key files when the passphrase is empty. Keys are "
                                         "biometric secrets: leave this off."),
                ReceiptType.Input("receipt", tooltip="From the same Protect Faces node: it exists only once every "
                                                     "face passed the identity gate."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the key files were written, one per line.")],
        )

    @classmethod
    def validate_inputs(cls, passphrase=None, allow_plaintext=None):
        """Refuse the prompt before anything runs (:func:`save_inputs_problem`)."""
        return save_inputs_problem(SAVE_PHOTO_NODE, passphrase, allow_plaintext) or True

    @classmethod
    def execute(cls, keys, filename_prefix, passphrase, allow_plaintext, receipt) -> io.NodeOutput:
        check_photo_receipt(receipt, keys)
        secret = save_passphrase(passphrase, allow_plaintext)
        paths = [write_key_file(photo, filename_prefix, secret, allow_plaintext, SAVE_PHOTO_NODE)
                 for photo in keys.photos]
        return io.NodeOutput("\n".join(str(p) for p in paths),
                             ui=ui.PreviewText("keys saved: " + ", ".join(p.name for p in paths)))


class LoadPrivacyKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_LoadKeys",
            display_name="Load Privacy Keys",
            category=CATEGORY,
            description="Opens a .dpkey file from the keys folder (<ComfyUI models>/diff_privacy_keys, or where "
                        "extra_model_paths.yaml maps diff_privacy_keys) with its passphrase. Files outside it are "
                        "refused, and unencrypted files unless allow_plaintext is on.",
            inputs=[
                io.Combo.Input("key_file", options=list_key_files(),
                               tooltip="A key file in the keys folder, models/diff_privacy_keys (press R to "
                                       "refresh)."),
                io.String.Input("passphrase", default=DEFAULT_PASSPHRASE_SOURCE, tooltip=PASSPHRASE_TOOLTIP),
                io.Boolean.Input("allow_plaintext", default=False, optional=True, tooltip=LOAD_PLAINTEXT_TOOLTIP),
            ],
            outputs=[
                PrivacyEmbedsType.Output(display_name="embeds",
                                         tooltip="key-E of every face of the file, for Recover Original."),
                io.Latent.Output(display_name="key_latent",
                                 tooltip="key-I of every face of the file [N,4,h,w], for Recover Original."),
                PhotoKeysType.Output(display_name="photo_keys",
                                     tooltip="Every face's keys with where it sits in the photo: for Recover Photo."),
            ],
        )

    @classmethod
    def validate_inputs(cls, key_file=None, passphrase=None, allow_plaintext=False):
        """Refuse the prompt before anything runs (:func:`load_problem`). Linked inputs arrive as None."""
        if key_file is None:
            return True
        return load_problem(key_file, passphrase, None if allow_plaintext is None else bool(allow_plaintext)) or True

    @classmethod
    def fingerprint_inputs(cls, key_file, passphrase=None, allow_plaintext=False):
        try:
            return os.path.getmtime(key_file_path(key_file, LOAD_NODE))
        except (KeyFileError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, key_file, passphrase, allow_plaintext=False) -> io.NodeOutput:
        photo = open_key_file(key_file, passphrase, allow_plaintext)
        shared = {(k.metadata.ddim_steps, k.metadata.image_size, k.metadata.msi_mode, k.metadata.schedule,
                   tuple(k.z_T.shape)) for k in photo.faces}
        if len(photo.faces) > 1 and (len(shared) != 1 or photo.faces[0].z_T.shape[0] != 1):
            # key sets made differently cannot form one N-face key-E: whatever is connected to them stops here
            message = (f"{LOAD_NODE}: {key_file!r} holds the keys of {len(photo.faces)} faces made with different "
                       f"settings; connect its 'photo_keys' output to Recover Photo (with the protected photo) "
                       f"instead of 'embeds'/'key_latent'.")
            return io.NodeOutput(blocked(message), blocked(message), PhotoKeysBatch((photo,)))
        embeds = PrivacyEmbeds.of_faces([k.stage_tokens for k in photo.faces], [k.stage_conds for k in photo.faces],
                                        photo.faces[0].metadata)
        z_T = torch.cat([k.z_T for k in photo.faces])
        latent = to_comfy_latent(None, z_T)  # SD1.x latent format: see face_keys
        return io.NodeOutput(embeds, latent, PhotoKeysBatch((photo,)))
