"""Diff-Privacy for ComfyUI: diffusion-based face anonymization, visual identity hiding and recovery.

ComfyUI imports this package from ``custom_nodes`` and calls :func:`comfy_entrypoint`. Imported anywhere
else (plain Python, test collectors) it registers nothing; use ``core`` directly there.
"""
try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES

    class DiffPrivacyExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> DiffPrivacyExtension:
        return DiffPrivacyExtension()
