"""ComfyUI's output folder for the pack's own save node: where a file prefix lands and ComfyUI's counter naming
(``<prefix>_00001_.png``), as SaveImage names its files (docs/comfyui-internals.md §3.2)."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths


@dataclass(frozen=True)
class OutputTarget:
    """Where a batch goes: ``folder`` (absolute), the file stem ``name`` and the first free ``counter``, and the
    ``subfolder`` relative to the output folder (what ComfyUI's /view and the UI take)."""

    folder: str
    name: str
    counter: int
    subfolder: str


def output_target(filename_prefix: str, width: int, height: int) -> OutputTarget:
    """ComfyUI's ``get_save_image_path`` in the output folder (``%width%``, ``%date%``-style variables,
    subfolders in the prefix, the next free counter).

    Raises:
        Exception: ComfyUI's own, when the prefix points outside the output folder.
    """
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    return OutputTarget(folder, name, int(counter), subfolder)


def blocked(message: str):
    """An output value that stops every node connected to it with ``message`` (ComfyUI's ExecutionBlocker), for
    outputs a node cannot fill for this input; nodes not connected to it run normally."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)
