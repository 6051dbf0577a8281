"""The pack's folders in ComfyUI's ``folder_paths``: face-recognizer weights and key files.

Recognizer weights live in ``models/face_recognition`` (or wherever the user's ``extra_model_paths.yaml``
maps the key ``face_recognition``); key files in ``output/diff_privacy_keys`` (docs/comfyui-internals.md §3.2).
Every "file not found" message names the folder and what to put there.
"""
from __future__ import annotations

import os

import folder_paths

from ...core.errors import WeightsNotFoundError

RECOGNIZER_FOLDER = "face_recognition"
KEYS_FOLDER = "diff_privacy_keys"
KEY_FILE_EXTENSION = ".dpkey"
KNOWN_RECOGNIZER_FILES = {
    "facenet": "20180402-114759-vggface2.pt",
    "arcface": "model_ir_se50.pth",
}


def register_folders() -> None:
    """Register the pack's folders without clobbering paths a user set in extra_model_paths.yaml."""
    exts = set(folder_paths.supported_pt_extensions)
    if RECOGNIZER_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER]
    else:
        paths = [os.path.join(folder_paths.models_dir, RECOGNIZER_FOLDER)]
    folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER] = (paths, exts)
    if KEYS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[KEYS_FOLDER] = ([keys_directory()], {KEY_FILE_EXTENSION})


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
def keys_directory() -> str:
    """``<ComfyUI output>/diff_privacy_keys`` (it may not exist yet)."""
    return os.path.join(folder_paths.get_output_directory(), KEYS_FOLDER)


def list_key_files() -> list[str]:
    """Sorted ``*.dpkey`` names in the keys folder (what Load Privacy Keys offers); [] when it is absent."""
    directory = keys_directory()
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.endswith(KEY_FILE_EXTENSION))


def key_file_path(name: str) -> str:
    """Resolve a key file name (inside the keys folder) or an absolute path."""
    if os.path.isabs(name):
        return name
    return os.path.join(keys_directory(), name)


def missing_key_file_message(name: str) -> str:
    """What Load Privacy Keys says when ``name`` is not in the keys folder."""
    return (f"Key file {name!r} not found in {keys_directory()}; put the {KEY_FILE_EXTENSION} file there "
            f"and press R to refresh.")
