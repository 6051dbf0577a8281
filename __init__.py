"""Diff-Privacy for ComfyUI: diffusion-based face anonymization, visual identity hiding and recovery."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class DiffPrivacyExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DiffPrivacyExtension:
    return DiffPrivacyExtension()
