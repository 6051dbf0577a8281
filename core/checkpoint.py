"""SD1.x single-file checkpoints (LDM/CompVis layout) read for diffusers: splitting and config inference.

A single-file checkpoint holds the UNet under ``model.diffusion_model.*``, the VAE under
``first_stage_model.*`` and the CLIP text encoder under ``cond_stage_model.transformer.*``. This module
splits such a state dict into its three parts, reads the diffusers ``UNet2DConditionModel`` and
``AutoencoderKL`` configs off the tensor shapes (nothing is fetched from a hub) and maps the TAESD layout
(``taesd_encoder.*`` / ``taesd_decoder.*``, what ComfyUI loads as a tiny VAE) onto diffusers'
``AutoencoderTiny`` names. The UNet and KL-VAE key renaming itself is done by diffusers' public
``single_file_utils`` helpers with these configs (see :class:`core.diffusers_backend.DiffusersBackend`).
Files are read with :func:`core.weights.read_state_dict`. Pure torch: no module is built here.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from .diffusion import LATENT_SCALE
from .errors import IncompatibleWeightsError
from .model_family import check_supported, classify_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.transformer.",)

#: SD1.x UNet: 8 attention heads at every level (diffusers' ``attention_head_dim`` = heads for SD1).
SD1_UNET_HEADS = 8


# ------------------------------------------------------------------------------------------- checking
def check_sd1_checkpoint(state_dict: Mapping[str, Any], source: str) -> None:
    """The checks every single-file checkpoint passes before any module is built, in this order: the model family
    (:func:`core.model_family.check_supported`), then the parts an SD 1.x file must hold (UNet, VAE, CLIP text
    encoder). Reads names and shapes only, so ``state_dict`` may map names to tensors or to shapes
    (:func:`core.weights.read_tensor_shapes`). ``source`` starts the messages, e.g. "The checkpoint 'x.safetensors'".

    Raises:
        UnsupportedModelError: another model family (named, with what to load instead).
        IncompatibleWeightsError: an SD 1.x file without its VAE or its text encoder.
    """
    check_supported(classify_state_dict(state_dict), source)
    names = [k for k in state_dict if isinstance(k, str)]
    if not any(k.startswith(UNET_PREFIX) for k in names):  # unreachable after the family check; kept as a guard
        raise IncompatibleWeightsError(f"{source} has no '{UNET_PREFIX}*' tensors: not an SD1.x single-file model.")
    if not any(k.startswith(VAE_PREFIX) for k in names):
        raise IncompatibleWeightsError(
            f"{source} has no VAE ('{VAE_PREFIX}*' tensors): it was saved without one. Use a checkpoint with its "
            f"VAE built in (most SD 1.x files have one; ComfyUI can pair a VAE-less file with Load VAE).")
    if not any(k.startswith(TEXT_PREFIXES) for k in names):
        raise IncompatibleWeightsError(
            f"{source} has no CLIP text encoder ('{TEXT_PREFIXES[0]}*' tensors). Use a complete SD 1.x "
            f"checkpoint (UNet, VAE and text encoder in one file).")


# ------------------------------------------------------------------------------------------- splitting
def split_checkpoint(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split a single-file SD checkpoint into (unet, vae, text) dicts with their LDM prefixes removed."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    text: dict[str, torch.Tensor] = {}
    for prefix in TEXT_PREFIXES:
        text.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return unet, vae, text


# ------------------------------------------------------------------------------------------- UNet config
def _count_indices(keys: Sequence[str], pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` (a regex with one group) among keys; 0 if none."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def unet_config_from_ldm(unet_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config for an SD1.x-family LDM UNet, read off its tensor shapes.

    Handles the standard SD1.x layout and reduced ones (fewer levels or res blocks, no middle block,
    transformers only in some blocks), as long as every level has the same number of res blocks and each
    level's blocks either all carry a transformer or none does (what diffusers' block types can express).
    Heads are fixed to SD1.x's 8 (head count is not recoverable from weights). ``unet_sd`` has the
    ``model.diffusion_model.`` prefix removed (see :func:`split_checkpoint`); tensors may be on the meta device.
    Raises IncompatibleWeightsError for anything that is not such a UNet.
    """
    keys = list(unet_sd)
    if "input_blocks.0.0.weight" not in unet_sd or "out.2.weight" not in unet_sd:
        raise IncompatibleWeightsError("No SD UNet found (expected 'model.diffusion_model.input_blocks.0.0.weight').")
    if any(k.startswith("label_emb.") for k in keys):
        raise IncompatibleWeightsError("This UNet has class/ADM embeddings (SDXL or an upscaler), not SD1.x.")
    conv_in = unet_sd["input_blocks.0.0.weight"]
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(unet_sd["out.2.weight"].shape[0])

    def depth(block: str) -> int:
        return _count_indices(keys, rf"{re.escape(block)}\.transformer_blocks\.(\d+)\.")

    # Walk the input blocks: a downsample op closes a level.
    n_in = _count_indices(keys, r"input_blocks\.(\d+)\.")
    levels: list[dict[str, Any]] = [dict(res=0, ch=model_channels, depths=[])]
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in unet_sd:
            levels.append(dict(res=0, ch=None, depths=[]))
            continue
        conv2 = unet_sd.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if conv2 is None:
            raise IncompatibleWeightsError(f"Unrecognised UNet input block {i}.")
        lvl = levels[-1]
        lvl["res"] += 1
        lvl["ch"] = int(conv2.shape[0])
        lvl["depths"].append(depth(f"input_blocks.{i}.1"))
    res_counts = {lvl["res"] for lvl in levels}
    if len(res_counts) != 1 or 0 in res_counts:
        raise IncompatibleWeightsError(f"UNet levels have differing res-block counts {sorted(res_counts)}.")
    layers_per_block = res_counts.pop()

    down_types, down_depths = [], []
    for lvl in levels:
        d = set(lvl["depths"])
        if len(d) != 1:
            raise IncompatibleWeightsError("A UNet level mixes blocks with and without transformers.")
        d0 = d.pop()
        down_types.append("CrossAttnDownBlock2D" if d0 else "DownBlock2D")
        down_depths.append(d0)

    up_types, up_depths = [], []
    per_up = layers_per_block + 1
    for u in range(len(levels)):
        d = {depth(f"output_blocks.{u * per_up + j}.1") for j in range(per_up)}
        if len(d) != 1:
            raise IncompatibleWeightsError("A UNet output level mixes blocks with and without transformers.")
        d0 = d.pop()
        up_types.append("CrossAttnUpBlock2D" if d0 else "UpBlock2D")
        up_depths.append(d0)
    if _count_indices(keys, r"output_blocks\.(\d+)\.") != per_up * len(levels):
        raise IncompatibleWeightsError("UNet output blocks do not mirror the input blocks.")

    has_mid = any(k.startswith("middle_block.") for k in keys)
    mid_depth = depth("middle_block.1") if has_mid else 0
    if has_mid and not mid_depth:
        raise IncompatibleWeightsError("UNet middle block without a transformer is not an SD1.x layout.")
    # diffusers takes the middle block's depth from the last level's entry; a level without attention
    # ignores its entry, so the last entry can carry the middle depth in the SD1 layout.
    if has_mid and down_depths[-1] and down_depths[-1] != mid_depth:
        raise IncompatibleWeightsError("UNet middle-block depth differs from the deepest level's depth.")
    down_layers = [d or 1 for d in down_depths]
    if has_mid and not down_depths[-1]:
        down_layers[-1] = mid_depth

    proj_in = next((unet_sd[k] for k in keys if k.endswith(".proj_in.weight")), None)
    attn_k = next((unet_sd[k] for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    if attn_k is None:
        raise IncompatibleWeightsError("UNet has no cross-attention: it cannot be text conditioned.")
    return dict(
        sample_size=64,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        mid_block_type="UNetMidBlock2DCrossAttn" if has_mid else None,
        block_out_channels=tuple(lvl["ch"] for lvl in levels),
        layers_per_block=layers_per_block,
        transformer_layers_per_block=down_layers,
        reverse_transformer_layers_per_block=[d or 1 for d in up_depths],
        cross_attention_dim=int(attn_k.shape[1]),
        attention_head_dim=SD1_UNET_HEADS,
        use_linear_projection=bool(proj_in is not None and proj_in.ndim == 2),
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
    )


def kl_vae_config_from_ldm(vae_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config for an LDM KL autoencoder, read off its shapes (SD1: 128·[1,2,4,4]).

    ``vae_sd`` has the ``first_stage_model.`` prefix removed. Raises KeyError when a tensor the config is read
    from is missing (an incomplete VAE).
    """
    keys = list(vae_sd)
    n_levels = _count_indices(keys, r"encoder\.down\.(\d+)\.")
    n_res = _count_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    chans = tuple(int(vae_sd[f"encoder.down.{i}.block.{n_res - 1}.conv2.weight"].shape[0]) for i in range(n_levels))
    return dict(
        in_channels=int(vae_sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(vae_sd["decoder.conv_out.weight"].shape[0]),
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=chans,
        layers_per_block=n_res,
        latent_channels=int(vae_sd["decoder.conv_in.weight"].shape[1]),
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=LATENT_SCALE,
        use_quant_conv="quant_conv.weight" in vae_sd,
        use_post_quant_conv="post_quant_conv.weight" in vae_sd,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in vae_sd,
    )


def taesd_to_diffusers(vae_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI TAESD names → diffusers ``AutoencoderTiny`` names.

    ``taesd_encoder.{i}.*`` → ``encoder.layers.{i}.*``; ``taesd_decoder.{i}.*`` → ``decoder.layers.{i-1}.*``
    (ComfyUI's decoder Sequential starts with a parameter-free Clamp that diffusers applies in forward()).
    """
    out = {}
    for k, v in vae_sd.items():
        m = re.match(r"taesd_(encoder|decoder)\.(\d+)\.(.*)", k)
        if m is None:
            continue
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        out[f"{part}.layers.{idx - (part == 'decoder')}.{rest}"] = v
    return out
