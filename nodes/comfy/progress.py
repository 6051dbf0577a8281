"""What the user sees while a node runs: ComfyUI's progress bar, the node's progress text, latent previews,
and the Cancel button (docs/comfyui-internals.md §3.1)."""
from __future__ import annotations

import time
from typing import Callable

import comfy.model_management as mm
import comfy.utils
import latent_preview
from comfy_execution.utils import get_executing_context
from server import PromptServer

#: the node's progress text is refreshed at most this often (seconds), and always at the last step
TEXT_INTERVAL_S = 1.0


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (the core's ``cancel``)."""
    mm.throw_exception_if_processing_interrupted()


def _send_progress_text(text: str, node_id: str) -> None:
    server = getattr(PromptServer, "instance", None)
    if server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)


def progress_bar(total: int, label: str = "") -> Callable[[int, int, dict], None]:
    """A core ``progress(step, total, info)`` callback (step = 1 … total) driving ComfyUI's progress bar of
    the running node; when ``info`` carries a ``loss`` it also becomes the node's progress text
    ("<label>step s/total · loss x")."""
    bar = comfy.utils.ProgressBar(total)
    node_id = getattr(get_executing_context(), "node_id", None)
    last_text = [0.0]

    def progress(step: int, total_steps: int, info: dict | None = None) -> None:
        bar.update_absolute(step, total_steps)
        loss = (info or {}).get("loss")
        now = time.monotonic()
        if loss is not None and node_id is not None and (now - last_text[0] > TEXT_INTERVAL_S or step == total_steps):
            last_text[0] = now
            _send_progress_text(f"{label}step {step}/{total_steps} · loss {float(loss):.4f}", node_id)
    return progress


def sampler_callback(model, steps: int) -> Callable:
    """ComfyUI's sampler callback for a MODEL: latent previews (per the user's preview setting) and the
    progress bar over ``steps`` steps."""
    return latent_preview.prepare_callback(model, steps)


def progress_bar_enabled() -> bool:
    """Whether ComfyUI shows console progress bars (``--disable-pbar`` off)."""
    return bool(comfy.utils.PROGRESS_BAR_ENABLED)
