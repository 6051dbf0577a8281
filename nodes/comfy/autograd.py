"""Gradients through ComfyUI's models (docs/comfyui-internals.md §2.5).

ComfyUI's executor runs every node under ``torch.inference_mode()``, so checkpoint weights are inference
tensors and autograd cannot save them. core/autograd.py explains the rules and provides the helpers; this
module applies them to ComfyUI's objects:

* :func:`private_copy` — a gradient-ready deep copy of a module (VAE decoder);
* :func:`grad_ready_model` — a MODEL clone whose UNet weights reach every op as normal clones;
* :func:`set_unet_checkpointing` — activation checkpointing of the UNet blocks for MSI's backward pass;
* :class:`DifferentiableDecoder` — scaled latent → image through a private copy of the VAE's decoder.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.utils.checkpoint

from ...core.autograd import normal_tensors, prepare_for_autograd
from .models import load_models, torch_device, unscale_latent, unet

_PLAIN_FORWARD = "_dp_plain_forward"


def private_copy(module: torch.nn.Module, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A gradient-ready copy of a ComfyUI module: normal (non-inference) weights, frozen, eval mode, optionally
    moved to ``device`` / cast to ``dtype``. The original is untouched (ComfyUI shares it with other nodes)."""
    with normal_tensors():
        twin = copy.deepcopy(module)
        prepare_for_autograd(twin)
        twin.requires_grad_(False).eval()
        if device is not None or dtype is not None:
            twin = twin.to(device=device, dtype=dtype)
    return twin


def _clone_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight an op of the grad-ready UNet gets: a normal tensor autograd may save, copied at most once.

    ComfyUI's ``cast_bias_weight`` already hands a weight with weight functions to them as a fresh copy
    (``cast_to(copy=True)``), which is a normal tensor when the forward runs outside inference mode: that copy
    is used as it is. A clone is taken only when the tensor is an inference tensor, or a view (of a cast or
    offload buffer ComfyUI reuses), and a backward pass can follow; without autograd nothing is saved, so
    nothing is copied."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return w
    if w.is_inference() or w._is_view():
        return w.clone()
    return w


def grad_ready_model(model):
    """A clone of the MODEL patcher whose UNet can be differentiated through: a weight wrapper hands every
    weight and bias of every castable module to its op as a clone (a normal tensor). The shared MODEL is not
    changed."""
    m = model.clone()
    for name, module in m.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        if getattr(module, "weight", None) is not None:
            m.add_weight_wrapper(f"{name}.weight", _clone_weight)
        if getattr(module, "bias", None) is not None:
            m.add_weight_wrapper(f"{name}.bias", _clone_weight)
    return m


def _checkpointed(forward, *args, **kwargs):
    """Run a UNet block under activation checkpointing when a backward pass will follow."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def set_unet_checkpointing(model, enabled: bool) -> None:
    """Turn activation checkpointing of the MODEL's UNet blocks (input, middle, output) on or off.

    Checkpointing trades ~30 % compute for most of the activation memory of MSI's backward pass (what makes
    512 px MSI fit on 8 GB cards). The blocks are ComfyUI's shared modules, so callers must turn it off
    again; turning it off restores each block's own ``forward``. Idempotent both ways.
    """
    net = unet(model)
    blocks = [*net.input_blocks, getattr(net, "middle_block", None), *net.output_blocks]
    for block in (b for b in blocks if b is not None):
        if enabled and _PLAIN_FORWARD not in block.__dict__:
            setattr(block, _PLAIN_FORWARD, block.forward)
            block.forward = functools.partial(_checkpointed, block.__dict__[_PLAIN_FORWARD])
        elif not enabled and _PLAIN_FORWARD in block.__dict__:
            block.forward = block.__dict__.pop(_PLAIN_FORWARD)


#: submodules of ComfyUI's VAE models that only encoding uses (KL autoencoder, TAESD); decoding never reads them
ENCODER_PARTS = ("encoder", "quant_conv", "taesd_encoder")


def decoder_only_copy(vae_model: torch.nn.Module, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> torch.nn.Module:
    """:func:`private_copy` of a ComfyUI VAE model without its encoder parts (:data:`ENCODER_PARTS`, set to
    None): its ``decode`` works as the original's, at about half the weights (SD1's KL encoder is 34 M of 84 M)."""
    shell = copy.copy(vae_model)  # a new object sharing the original's attribute values...
    shell._modules = {name: (None if name in ENCODER_PARTS else sub) for name, sub in vae_model._modules.items()}
    shell._parameters = dict(vae_model._parameters)  # ...with its own registries, so the original is untouched
    shell._buffers = dict(vae_model._buffers)
    return private_copy(shell, device, dtype)


class DifferentiableDecoder:
    """Scaled latent [B,4,h,w] → image [B,3,H,W] in ≈[−1,1], float32, differentiable, unclamped.

    Runs a private copy of ComfyUI's VAE *decoder* (:func:`decoder_only_copy`, normal weights) on the compute
    device, because ComfyUI's ``VAE.decode`` writes into a preallocated buffer, may tile, clamps and returns
    CPU tensors. ``dtype`` None keeps ComfyUI's VAE dtype; float32 is the safe choice for the backward pass in
    fp16 setups.
    """

    def __init__(self, vae, model, dtype: torch.dtype | None = None):
        load_models(vae.patcher)
        self.model = model
        self.dtype = dtype or vae.vae_dtype
        self.module = decoder_only_copy(vae.first_stage_model, torch_device(), self.dtype)

    def __call__(self, z_scaled: torch.Tensor) -> torch.Tensor:
        z = unscale_latent(self.model, z_scaled).to(self.dtype)
        return self.module.decode(z).float()
