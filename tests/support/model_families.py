"""Tiny checkpoints of every model family, with the real tensor names of each layout and tiny shapes.

Each builder returns ``{name: shape}``; :func:`write_checkpoint` stores zeros of those shapes as a safetensors (or
Lightning-style ``.ckpt``) file. The dimensions that tell the families apart are the real ones (UNet input
channels 4/8/9, cross-attention width 768/1024/2048/1280, SDXL's 2816-wide ``label_emb``); every other dimension
is as small as the layout allows. The SD 1.x-shaped UNets come from :mod:`tests.support.tiny_diffusers`; with
``model_channels=320`` (the default here) ComfyUI's own model detection recognises them, so the node tests can load
them with Load Checkpoint.

Key names follow the LDM/CompVis single-file layout the original releases and ComfyUI use:
SD 1.x ``cond_stage_model.transformer.text_model.*``; SD 2.x ``cond_stage_model.model.*`` (OpenCLIP); SDXL
``conditioner.embedders.{0,1}.*`` and ``label_emb.0.0.weight``; SD3 ``joint_blocks.*``/``x_embedder.proj``;
Flux ``double_blocks.*``/``single_blocks.*``/``img_in``; SVD ``time_stack``; kohya LoRA ``lora_unet_*.lora_down``.
"""
from __future__ import annotations

import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import tiny_diffusers as td

U = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."


def _prefixed(prefix: str, shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {prefix + k: v for k, v in shapes.items()}


def _linear_projections(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """SD 2.x / SDXL transformers project with Linear layers: 1×1 conv weights [c, c, 1, 1] → [c, c]."""
    return {k: (v[:2] if k.endswith(("proj_in.weight", "proj_out.weight")) else v) for k, v in shapes.items()}


def sd1(*, in_channels: int = 4, vae: bool = True, text: bool = True, model_channels: int = 320,
        v_pred: bool = False) -> dict[str, tuple]:
    """SD 1.x single file: LDM UNet (context 768), TAESD VAE, a 2-layer CLIP-L text encoder."""
    s = _prefixed(U, td.ldm_unet_shapes(model_channels=model_channels, in_channels=in_channels))
    if vae:
        s.update(_prefixed(VAE, td.taesd_shapes()))
    if text:
        s.update(_prefixed(SD1_TEXT, td.clip_text_shapes(num_layers=2)))
    if v_pred:
        s["v_pred"] = (0,)  # the empty marker tensor ComfyUI saves into v-prediction models
    return s


def sd2(*, in_channels: int = 4, model_channels: int = 320, text: bool = True) -> dict[str, tuple]:
    """SD 2.x: UNet with 1024-wide cross-attention and linear projections, OpenCLIP ViT-H text tensors (a few, with a
    tiny vocabulary: ComfyUI cannot build a text encoder from them, so files loaded by ComfyUI leave them out)."""
    unet = td.ldm_unet_shapes(model_channels=model_channels, in_channels=in_channels, context_dim=1024)
    s = _prefixed(U, _linear_projections(unet))
    s.update(_prefixed(VAE, td.taesd_shapes()))
    if not text:
        return s
    s.update({"cond_stage_model.model.token_embedding.weight": (8, 1024),
              "cond_stage_model.model.positional_embedding": (77, 1024),
              "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
              "cond_stage_model.model.ln_final.weight": (1024,)})
    return s


def sdxl(*, refiner: bool = False) -> dict[str, tuple]:
    """SDXL base (or refiner): class/size ``label_emb``, 2048-wide (1280) cross-attention, two text encoders."""
    context, adm, c = (1280, 2560, 32) if refiner else (2048, 2816, 32)
    s = {U + "input_blocks.0.0.weight": (c, 4, 3, 3), U + "input_blocks.0.0.bias": (c,),
         U + "time_embed.0.weight": (4 * c, c),
         U + "label_emb.0.0.weight": (4 * c, adm), U + "label_emb.0.0.bias": (4 * c,),
         U + "input_blocks.4.1.proj_in.weight": (c, c),
         U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (c, context),
         U + "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight": (c, context),
         U + "out.2.weight": (4, c, 3, 3)}
    s.update(_prefixed(VAE, td.taesd_shapes()))
    if refiner:
        s["conditioner.embedders.0.model.token_embedding.weight"] = (8, 1280)
    else:
        s["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (8, 768)
        s["conditioner.embedders.1.model.token_embedding.weight"] = (8, 1280)
    return s


def sd3() -> dict[str, tuple]:
    """SD3 (MMDiT): joint blocks, patch embedder over 16 latent channels, three text encoders."""
    return {U + "x_embedder.proj.weight": (64, 16, 2, 2), U + "pos_embed": (1, 16, 64),
            U + "context_embedder.weight": (64, 4096),
            U + "joint_blocks.0.context_block.attn.qkv.weight": (192, 64),
            U + "joint_blocks.0.x_block.attn.qkv.weight": (192, 64),
            U + "final_layer.linear.weight": (64, 64),
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
            VAE + "decoder.conv_in.weight": (8, 16, 3, 3)}


def flux(*, prefix: str = U) -> dict[str, tuple]:
    """Flux: double and single stream blocks; ``prefix=""`` is a diffusion_models file (the transformer only)."""
    return {prefix + "img_in.weight": (64, 64), prefix + "txt_in.weight": (64, 4096),
            prefix + "double_blocks.0.img_attn.qkv.weight": (192, 64),
            prefix + "double_blocks.0.img_attn.norm.key_norm.scale": (64,),
            prefix + "single_blocks.0.linear1.weight": (320, 64),
            prefix + "final_layer.linear.weight": (64, 64)}


def svd() -> dict[str, tuple]:
    """Stable Video Diffusion: an LDM UNet with temporal ``time_stack`` blocks and 8 input channels."""
    return {U + "input_blocks.0.0.weight": (32, 8, 3, 3), U + "label_emb.0.0.weight": (128, 768),
            U + "input_blocks.1.0.time_stack.in_layers.0.weight": (32,),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 1024),
            U + "out.2.weight": (4, 32, 3, 3)}


def unet_only() -> dict[str, tuple]:
    """An SD 1.x UNet saved on its own (ComfyUI's diffusion_models layout: no prefix, no VAE, no text)."""
    return td.ldm_unet_shapes(model_channels=32)


def lora() -> dict[str, tuple]:
    """A kohya-style SD 1.x LoRA."""
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{base}.lora_down.weight": (4, 768), f"{base}.lora_up.weight": (320, 4), f"{base}.alpha": (),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)}


def vae_only() -> dict[str, tuple]:
    """A standalone LDM VAE file (e.g. vae-ft-mse-840000), no prefix."""
    return {"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3),
            "quant_conv.weight": (8, 8, 1, 1)}


def text_encoder_only() -> dict[str, tuple]:
    """A CLIP-L text encoder file (HF names)."""
    return {"text_model.embeddings.token_embedding.weight": (8, 768),
            "text_model.final_layer_norm.weight": (768,)}


def embedding() -> dict[str, tuple]:
    """A textual-inversion embedding (A1111 safetensors layout)."""
    return {"emb_params": (2, 768)}


def foreign() -> dict[str, tuple]:
    """Weights of something else entirely (an image classifier)."""
    return {"conv1.weight": (8, 3, 7, 7), "fc.weight": (10, 8)}


#: every builder by family key (the key ``core.model_family`` must report), for the family rows of the matrix
BUILDERS = {
    "sd1": lambda: sd1(), "sd1-inpaint": lambda: sd1(in_channels=9), "sd1-edit": lambda: sd1(in_channels=8),
    "sd1-v": lambda: sd1(v_pred=True), "sd2": lambda: sd2(), "sd2-inpaint": lambda: sd2(in_channels=9),
    "sdxl": lambda: sdxl(), "sdxl-refiner": lambda: sdxl(refiner=True), "sd3": sd3, "flux": flux,
    "flux-transformer-only": lambda: flux(prefix=""), "video": svd, "unet-only": unet_only, "lora": lora,
    "vae": vae_only, "text-encoder": text_encoder_only, "embedding": embedding, "foreign": foreign,
}


def zeros(shapes: dict[str, tuple], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Zero tensors of the given shapes (1-D and scalar tensors in float32, as real files keep norms)."""
    return {k: torch.zeros(v, dtype=dtype if len(v) > 1 else torch.float32) for k, v in shapes.items()}


def write_checkpoint(path: Path, shapes: dict[str, tuple], dtype: torch.dtype = torch.float16) -> Path:
    """Zeros of ``shapes`` as safetensors at ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(zeros(shapes, dtype), str(path))
    return path


# ------------------------------------------------------------------------------------------ legacy .ckpt
#: Where the original SD 1.x releases' pickles point (PyTorch Lightning's callback, numpy 1.x's scalar).
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
OLD_NUMPY_MODULE = "numpy.core.multiarray"


@contextmanager
def _old_style_globals():
    """Stand-ins for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` and numpy 1.x's
    ``numpy.core.multiarray.scalar``, registered in ``sys.modules`` only while a file is written, so that the
    pickle names them exactly as a 2022 Lightning checkpoint does (neither package is needed)."""
    lightning = types.ModuleType(LIGHTNING_MODULE)

    class ModelCheckpoint:  # the callback object whose state Lightning stores
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING_MODULE, "ModelCheckpoint"
    lightning.ModelCheckpoint = ModelCheckpoint
    old_numpy = types.ModuleType(OLD_NUMPY_MODULE)

    def scalar(dtype, data):  # never called here: only its name goes into the pickle
        raise AssertionError("only pickled, never called")

    scalar.__module__, scalar.__qualname__ = OLD_NUMPY_MODULE, "scalar"
    old_numpy.scalar = scalar
    fakes = {LIGHTNING_MODULE: lightning, OLD_NUMPY_MODULE: old_numpy}
    for name in (LIGHTNING_MODULE, OLD_NUMPY_MODULE):  # parent packages pickle imports first
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in sys.modules and parent not in fakes:
                fakes[parent] = types.ModuleType(parent)
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield ModelCheckpoint, scalar
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], *, zip_format: bool = True) -> Path:
    """A ``.ckpt`` laid out like the original SD 1.x releases (sd-v1-4-full-ema.ckpt and kin): the weights under
    ``state_dict`` next to Lightning's training state — ``global_step``, ``epoch``, the version string, the
    ModelCheckpoint callback's state keyed by its class (with a numpy float64 score pickled through numpy 1.x's
    ``numpy.core.multiarray.scalar``), optimizer and scheduler states. ``zip_format`` False writes PyTorch's legacy
    (pre-1.6) format."""
    with _old_style_globals() as (callback, scalar):

        class Pickler(pickle.Pickler):
            def reducer_override(self, obj):
                if type(obj) is np.float64:
                    return scalar, (obj.dtype, obj.tobytes())
                return NotImplemented

        def dump(obj, file, protocol=None):
            Pickler(file, protocol).dump(obj)

        module = types.SimpleNamespace(Pickler=Pickler, dump=dump, __name__="pickle")
        content = {
            "epoch": 5, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": {callback: {"monitor": None, "best_model_score": np.float64(0.0123),
                                     "best_model_path": "logs/checkpoints/last.ckpt", "current_score": None,
                                     "dirpath": "logs/checkpoints"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": []}]}],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 470000, "_step_count": 470001,
                               "lr_lambdas": [None]}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(content, path, pickle_module=module, _use_new_zipfile_serialization=zip_format)
    return path


class _Payload:
    """A pickle payload that runs ``func(*args)`` when unpickled by an unrestricted unpickler."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_malicious_ckpt(path: Path, marker: Path, how: str) -> Path:
    """A ``.ckpt`` whose unpickling would create ``marker`` — through ``os.system`` (``how="os.system"``) or
    ``builtins.eval`` (``how="eval"``) — next to a valid-looking state dict. Only pickled here, never loaded."""
    import builtins
    import os

    if how == "os.system":
        payload = _Payload(os.system, f"touch '{marker}'")
    elif how == "eval":
        payload = _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    else:
        raise ValueError(how)
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "hook": payload}, path)
    return path
