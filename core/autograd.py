"""Autograd next to ``torch.inference_mode()``: the one place the core deals with it.

Why this exists: ComfyUI's executor runs every node inside ``torch.inference_mode()``. Every tensor created
there — checkpoint weights, latents, conditionings, σ — is an *inference tensor*, and autograd refuses to save
an inference tensor for backward. So a gradient cannot flow *through* a module whose weights are inference
tensors, even w.r.t. its input, and new parameters (MSI, optimiser state) made inside a node would be
inference tensors too. The core is written for plain PyTorch, where none of this applies; callers that may
run under inference mode (ComfyUI nodes, servers that wrap the CLI core) need three things, provided here:

1. :func:`normal_tensors` — a block in which new tensors are normal (modules built, caches filled, clones
   taken), optionally with autograd switched on (``grad=True``) for a forward/backward pass;
2. :func:`prepare_for_autograd` — swap a module's inference-tensor weights for normal clones, in place, so
   gradients can flow through it;
3. :func:`as_normal` — a normal clone of one incoming tensor that an op will save for backward.

Outside inference mode all three are cheap no-ops apart from the explicit clones.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def normal_tensors(grad: bool | None = None) -> Iterator[None]:
    """Leave inference mode for the block; ``grad`` True/False also sets autograd on/off, None keeps it."""
    with torch.inference_mode(False):
        if grad is None:
            yield
        else:
            with torch.set_grad_enabled(grad):
                yield


def as_normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a normal tensor, else a normal clone (same device, dtype and values)."""
    if not t.is_inference():
        return t
    with normal_tensors():
        return t.clone()


def prepare_for_autograd(*modules: nn.Module) -> int:
    """Replace inference-tensor parameters and buffers of ``modules`` by normal clones, in place.

    The clones keep device, dtype and values; replaced parameters get ``requires_grad=False``.

    Returns:
        How many tensors were replaced (0 when the modules are already fine, which costs one pass over their
        tensors).
    """
    replaced = 0
    with normal_tensors():
        for module in modules:
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.is_inference():
                        sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                        replaced += 1
                for name, b in list(sub._buffers.items()):
                    if b is not None and b.is_inference():
                        sub._buffers[name] = b.clone()
                        replaced += 1
    return replaced


def explain_inference_error(err: RuntimeError, where: str) -> RuntimeError:
    """A clearer error when autograd hit an inference tensor; ``where`` says which modules to prepare."""
    if "nference tensor" not in str(err):
        return err
    return RuntimeError(f"{err}. A module on the gradient path holds weights created under "
                        f"torch.inference_mode(); {where} (see core/autograd.py).")
