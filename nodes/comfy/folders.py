"""The pack's folders in ComfyUI's ``folder_paths``: face-recognizer weights and key files.

Recognizer weights live in ``models/face_recognition`` and key files in ``models/diff_privacy_keys``, or
wherever the user's ``extra_model_paths.yaml`` maps the keys ``face_recognition`` / ``diff_privacy_keys``
(docs/comfyui-internals.md §3.2). Key files are secrets: they are kept out of every folder ComfyUI's HTTP API
hands files out from (output, input and temp through ``/view``, the user folder through ``/userdata``); ComfyUI
serves no model folder's files, only their names. Every "file not found" message names the folder and what to
put there.
"""
from __future__ import annotations

import logging
import os

import folder_paths

from ...core.errors import KeyFileLocationError, WeightsNotFoundError

RECOGNIZER_FOLDER = "face_recognition"
KEYS_FOLDER = "diff_privacy_keys"
KEY_FILE_EXTENSION = ".dpkey"
KNOWN_RECOGNIZER_FILES = {
    "facenet": "20180402-114759-vggface2.pt",
    "arcface": "model_ir_se50.pth",
}


def register_folders() -> None:
    """Register the pack's folders without clobbering paths a user set in extra_model_paths.yaml.

    ``face_recognition`` accepts ComfyUI's usual weight extensions, ``diff_privacy_keys`` only ``.dpkey``; each
    gets its folder under ComfyUI's models directory unless the user's YAML named folders for it. Logs a warning
    when key files are still in ``output/diff_privacy_keys`` (where earlier versions saved them).
    """
    exts = set(folder_paths.supported_pt_extensions)
    if RECOGNIZER_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER]
    else:
        paths = [os.path.join(folder_paths.models_dir, RECOGNIZER_FOLDER)]
    folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER] = (paths, exts)
    if KEYS_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[KEYS_FOLDER]
    else:
        paths = [os.path.join(folder_paths.models_dir, KEYS_FOLDER)]
    folder_paths.folder_names_and_paths[KEYS_FOLDER] = (paths, {KEY_FILE_EXTENSION})
    legacy = legacy_key_files()
    if legacy:
        logging.warning("[Diff-Privacy] %d key file(s) in %s, which ComfyUI serves over HTTP (/view): move them "
                        "to %s (Load Privacy Keys reads only from there).", len(legacy), legacy_keys_directory(),
                        keys_directory())


# ------------------------------------------------------------------------------------- recognizers
def list_recognizer_files() -> list[str]:
    """File names in the face_recognition folders (what Face Recognizer Loader offers)."""
    return folder_paths.get_filename_list(RECOGNIZER_FOLDER)


def recognizer_folders() -> list[str]:
    """The directories ComfyUI searches for recognizer weights."""
    return list(folder_paths.get_folder_paths(RECOGNIZER_FOLDER))


def missing_recognizer_message(name: str) -> str:
    """What Face Recognizer Loader says when ``name`` is not in its folders: where to put which file."""
    folders = ", ".join(recognizer_folders()) or os.path.join(folder_paths.models_dir, RECOGNIZER_FOLDER)
    return (f"Face recognizer weights {name!r} not found. Put the file into ComfyUI's models folder "
            f"'{RECOGNIZER_FOLDER}' ({folders}): FaceNet VGGFace2 as '{KNOWN_RECOGNIZER_FILES['facenet']}' "
            f"and/or ArcFace IR-SE50 as '{KNOWN_RECOGNIZER_FILES['arcface']}' (see the pack README), "
            f"then press R in ComfyUI to refresh the list.")


def recognizer_path(name: str) -> str:
    """Full path of the recognizer file ``name``.

    Raises:
        WeightsNotFoundError: with :func:`missing_recognizer_message` when there is no such file.
    """
    path = folder_paths.get_full_path(RECOGNIZER_FOLDER, name) if name else None
    if path is None or not os.path.isfile(path):
        raise WeightsNotFoundError(missing_recognizer_message(name))
    return path


# ------------------------------------------------------------------------------------------- keys
def _real(path: str) -> str:
    """``path`` with symbolic links resolved, absolute and case-normalised (for containment tests)."""
    return os.path.normcase(os.path.realpath(path))


def _inside(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies below it (both from :func:`_real`)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives (Windows)
        return False


def key_folders() -> list[str]:
    """The registered keys folders (``folder_paths`` name ``diff_privacy_keys``); the first is where keys are
    saved. They may not exist yet."""
    return list(folder_paths.get_folder_paths(KEYS_FOLDER))


def keys_directory() -> str:
    """The folder Save Privacy Keys writes to: the first registered keys folder (by default
    ``<ComfyUI models>/diff_privacy_keys``)."""
    return key_folders()[0]


def served_directories() -> dict[str, str]:
    """ComfyUI's folders whose files its HTTP API hands out: ``{"output"|"input"|"temp": …}`` (``/view``) and
    ``"user"`` (``/userdata``)."""
    return {"output": folder_paths.get_output_directory(), "input": folder_paths.get_input_directory(),
            "temp": folder_paths.get_temp_directory(), "user": folder_paths.get_user_directory()}


def served_folder_containing(path: str) -> str | None:
    """"the output folder (…)" when ``path`` (symbolic links resolved) lies inside a folder ComfyUI serves over
    HTTP (:func:`served_directories`), else None."""
    real = _real(path)
    for kind, folder in served_directories().items():
        if folder and _inside(real, _real(folder)):
            return f"ComfyUI's {kind} folder ({folder})"
    return None


def served_keys_folder_message(node: str) -> str | None:
    """Why ``node`` refuses to write key files, when the keys folder lies inside a folder ComfyUI serves over
    HTTP (a user's extra_model_paths.yaml may map it there); None when it does not."""
    folder = keys_directory()
    served = served_folder_containing(folder)
    if served is None:
        return None
    return (f"{node}: the keys folder {folder} lies inside {served}, whose files anyone who can reach this ComfyUI "
            f"can download over HTTP; key files are secrets and are not written there. Map '{KEYS_FOLDER}' in "
            f"extra_model_paths.yaml to a folder outside ComfyUI's output, input, temp and user folders (by default "
            f"it is {os.path.join(folder_paths.models_dir, KEYS_FOLDER)}).")


def _key_file_candidate(name: str) -> tuple[str | None, bool]:
    """(real path of the first file ``name`` inside a keys folder or None, whether ``name`` led outside a keys
    folder in any of them)."""
    escaped = False
    for folder in key_folders():
        candidate = os.path.realpath(os.path.join(folder, name))
        if not _inside(os.path.normcase(candidate), _real(folder)):
            escaped = True
            continue
        if os.path.isfile(candidate):
            return candidate, escaped
    return None, escaped


def list_key_files() -> list[str]:
    """Sorted ``*.dpkey`` names (relative to their keys folder, subfolders included) that Load Privacy Keys
    offers; names that lead outside the keys folders (symbolic links) are left out. [] when there are none."""
    names = folder_paths.get_filename_list(KEYS_FOLDER)
    return [name for name in names if _key_file_candidate(name)[0] is not None]


def key_file_location_message(node: str, name, reason: str) -> str:
    """The refusal of a key file name that is not a file in the keys folders, in ``node``'s terms."""
    folders = ", ".join(key_folders())
    return (f"{node}: key_file must be a file in the keys folder ({folders}), given by its name as listed; "
            f"{name!r} {reason}. Copy the key file into the keys folder and pick it from the list (press R to "
            f"refresh it).")


def key_file_path(name: str, node: str = "Load Privacy Keys") -> str:
    """The real path of the key file ``name`` (a name as :func:`list_key_files` gives it) in a keys folder.

    Raises:
        KeyFileLocationError: ``name`` is empty, absolute, not a ``.dpkey`` name, or leads (through ``..`` or a
            symbolic link, resolved with ``os.path.realpath``) outside every keys folder; the message is in
            ``node``'s terms (:func:`key_file_location_message`).
        FileNotFoundError: there is no such file in the keys folders (:func:`missing_key_file_message`).
    """
    if not isinstance(name, str) or not name.strip():
        raise KeyFileLocationError(key_file_location_message(node, name, "is no file name (is the list empty?)"))
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\")):
        raise KeyFileLocationError(key_file_location_message(node, name, "is an absolute path"))
    if not name.lower().endswith(KEY_FILE_EXTENSION):
        raise KeyFileLocationError(key_file_location_message(
            node, name, f"does not end in {KEY_FILE_EXTENSION}, the extension of key files"))
    path, escaped = _key_file_candidate(name)
    if path is not None:
        return path
    if escaped:
        raise KeyFileLocationError(key_file_location_message(
            node, name, "leads outside it (through '..' or a symbolic link)"))
    raise FileNotFoundError(missing_key_file_message(name, node))


def legacy_keys_directory() -> str:
    """``<ComfyUI output>/diff_privacy_keys``, where earlier versions of the pack saved key files."""
    return os.path.join(folder_paths.get_output_directory(), KEYS_FOLDER)


def legacy_key_files() -> list[str]:
    """``*.dpkey`` names still in :func:`legacy_keys_directory` ([] when it is absent)."""
    directory = legacy_keys_directory()
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(KEY_FILE_EXTENSION))
    except OSError:
        return []


def missing_key_file_message(name: str, node: str = "Load Privacy Keys") -> str:
    """What ``node`` says when ``name`` is not in the keys folders: where to put it (and, for a file still in the
    old output/diff_privacy_keys folder, to move it)."""
    folders = ", ".join(key_folders())
    message = (f"{node}: key file {name!r} not found in the keys folder ({folders}); put the {KEY_FILE_EXTENSION} "
               f"file there and press R to refresh the list.")
    if os.path.basename(name) in legacy_key_files():
        message += (f" It is in {legacy_keys_directory()}, where earlier versions saved keys and ComfyUI serves "
                    f"them over HTTP: move it from there into the keys folder.")
    return message
