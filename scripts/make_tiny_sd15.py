#!/usr/bin/env python3
"""Write a tiny, random-weight, single-file SD1.5 checkpoint that ComfyUI loads as MODEL, CLIP and VAE.

No downloads. Key names and shapes come from ComfyUI's own module classes built on the ``meta`` device,
so they always match the ComfyUI version in use; values come from one seeded ``torch.Generator`` walked
in sorted key order, so a given seed and option set gives a byte-identical file.

What ComfyUI (0.3.75) detects and what it infers from the keys:

* UNet: "SD15" needs ``model_channels=320``, ``context_dim=768``, a conv ``proj_in``
  (``use_linear_in_transformer=False``), no ``label_emb`` and ``in_channels=4``. Levels, res blocks,
  transformer depths and the middle block are read off the keys, so the default is one level with one res
  block carrying one transformer block, no middle block and plain output blocks (13.6 M parameters).
* CLIP: ``comfy/sd1_clip_config.json`` is fixed (CLIP-L text encoder, 123 M parameters). Layers missing
  from the file would stay uninitialised and turn the conditioning into NaN, so the full encoder is written.
* VAE: the KL autoencoder config is fixed (83.7 M parameters), but ComfyUI switches to TAESD (2.45 M,
  same 8x factor and 4 latent channels) when ``first_stage_model.taesd_decoder.1.weight`` is present.

Usage::

    python scripts/make_tiny_sd15.py --comfyui PATH -o tiny_sd15.safetensors \\
        [--seed 0] [--dtype fp16] [--clip-dtype fp8] [--vae taesd|kl] [--levels 1] [--mid-block]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

FACENET_CLASSES = 8631  # VGGFace2 identities; the real checkpoint's logits layer has this many rows

DTYPE_NAMES = ("fp16", "bf16", "fp32", "fp8")
VAE_KINDS = ("taesd", "kl")
METADATA_KEY = "tiny_sd15"
# SD1.x first-stage config, fixed inside ComfyUI; repeated here to build the KL layout on `meta`.
SD1_KL_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                   "dropout": 0.0}


def _import_comfy(comfyui_dir: Path) -> None:
    """Put ComfyUI on sys.path with CPU args set before its model_management import probes CUDA."""
    scripts_dir = str(Path(__file__).resolve().parent)
    if scripts_dir not in sys.path:
        sys.path.append(scripts_dir)
    from comfyui_env import import_comfyui
    import_comfyui(comfyui_dir, cpu=True)


def unet_shapes(levels: int, mid_block: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of a minimal SD1.5-detectable UNet, keyed ``model.diffusion_model.*``.

    ``levels`` resolution levels with channel multipliers 1, 2, 2, ...; only the first input res block
    carries a transformer; ``mid_block`` adds res + attention + res in the middle.
    """
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[1] * levels, channel_mult=[1] + [2] * (levels - 1),
        transformer_depth=[1] + [0] * (levels - 1), transformer_depth_output=[0] * (2 * levels),
        transformer_depth_middle=1 if mid_block else -2,  # -2 tells UNetModel to build no middle block
        context_dim=768, num_heads=8, num_head_channels=-1,
        use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
        adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
        device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    return {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()}


def clip_shapes(comfyui_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the CLIP-L text encoder ComfyUI builds for SD1.x, keyed ``cond_stage_model.transformer.*``."""
    import torch
    import comfy.clip_model
    import comfy.ops

    config = json.loads((comfyui_dir / "comfy" / "sd1_clip_config.json").read_text(encoding="utf-8"))
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, torch.device("meta"), comfy.ops.manual_cast)
    # SD1 files carry no text projection; ComfyUI only notes its absence at debug level.
    return {"cond_stage_model.transformer." + k: tuple(v.shape) for k, v in clip.state_dict().items()
            if k != "text_projection.weight"}


def vae_shapes(vae: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the first-stage model (``taesd`` or the SD1 ``kl`` autoencoder), keyed ``first_stage_model.*``."""
    import torch

    if vae not in VAE_KINDS:
        raise ValueError(f"vae must be one of {VAE_KINDS}, got {vae!r}")
    with torch.device("meta"):
        if vae == "kl":
            from comfy.ldm.models.autoencoder import AutoencoderKL
            module = AutoencoderKL(ddconfig=dict(SD1_KL_DDCONFIG), embed_dim=4)
        else:
            from comfy.taesd.taesd import TAESD
            module = TAESD()
    return {"first_stage_model." + k: tuple(v.shape) for k, v in module.state_dict().items()}


def init_tensor(name: str, shape: tuple[int, ...], generator):
    """fp32 initial value: N(0, 1/fan_in) weights, 0.02-std embeddings, zero biases, unit 1-D weights.

    TAESD's ``vae_scale``/``vae_shift`` scalars get the identity (1 and 0).
    """
    import torch

    if name.endswith("vae_scale"):
        return torch.ones(shape)
    if name.endswith("vae_shift") or name.rsplit(".", 1)[-1] == "bias":
        return torch.zeros(shape)
    if len(shape) <= 1:  # norm weights and scalars
        return torch.ones(shape)
    std = 0.02 if "embedding" in name else 1.0 / math.sqrt(math.prod(shape[1:]))
    return torch.randn(shape, generator=generator) * std


def _torch_dtype(name: str):
    import torch

    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
    if name not in table:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    return table[name]


def make_state_dict(comfyui_dir, seed: int = 0, vae: str = "taesd", dtype: str = "fp16",
                    clip_dtype: str | None = None, levels: int = 1, mid_block: bool = False):
    """Build the checkpoint's state dict. Returns ``(state_dict, parameter_counts_by_part)``.

    fp8 storage (``float8_e4m3fn``) keeps 1-D tensors in fp16 so norms, biases and scalars stay exact.
    """
    import torch

    comfyui_dir = Path(comfyui_dir).resolve()
    _import_comfy(comfyui_dir)
    parts = {"unet": unet_shapes(levels, mid_block), "clip": clip_shapes(comfyui_dir), "vae": vae_shapes(vae)}
    storage = {"unet": dtype, "vae": dtype, "clip": clip_dtype or dtype}
    part_of = {name: part for part, shapes in parts.items() for name in shapes}
    shape_of = {name: shape for shapes in parts.values() for name, shape in shapes.items()}

    generator = torch.Generator().manual_seed(seed)
    state_dict, counts = {}, {part: 0 for part in parts}
    for name in sorted(shape_of):
        value = init_tensor(name, shape_of[name], generator)
        want = storage[part_of[name]]
        value = value.to(torch.float16 if want == "fp8" and value.ndim <= 1 else _torch_dtype(want))
        state_dict[name] = value.contiguous()
        counts[part_of[name]] += value.numel()
    return state_dict, counts


def generator_options(seed: int = 0, vae: str = "taesd", dtype: str = "fp16", clip_dtype: str | None = None,
                      levels: int = 1, mid_block: bool = False) -> dict:
    """The normalised options recorded in the file's metadata (and usable as a cache key)."""
    return {"seed": int(seed), "vae": vae, "dtype": dtype, "clip_dtype": clip_dtype or dtype,
            "levels": int(levels), "mid_block": bool(mid_block)}


def make_checkpoint(comfyui_dir, out_path, seed: int = 0, vae: str = "taesd", dtype: str = "fp16",
                    clip_dtype: str | None = None, levels: int = 1, mid_block: bool = False) -> dict:
    """Write the tiny SD1.5 checkpoint to ``out_path`` (atomically) and return a summary dict.

    The summary holds ``output``, ``bytes``, ``params`` (per part), ``tensors``, ``seconds`` and ``options``.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    options = generator_options(seed, vae, dtype, clip_dtype, levels, mid_block)
    state_dict, counts = make_state_dict(comfyui_dir, **options)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Exactly one metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make otherwise identical files differ byte-wise between runs.
    metadata = {METADATA_KEY: json.dumps({"generator": "make_tiny_sd15.py", **options}, sort_keys=True)}
    partial = out_path.with_name(out_path.name + f".{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata=metadata)
    os.chmod(partial, 0o644)
    os.replace(partial, out_path)
    return {"output": str(out_path), "bytes": out_path.stat().st_size, "params": counts,
            "tensors": len(state_dict), "seconds": round(time.perf_counter() - start, 2), "options": options}


def make_random_facenet(path: Path, seed: int = 0) -> Path:
    """Save a seeded random InceptionResnetV1 state dict laid out like facenet-pytorch's VGGFace2 file.

    The real file also holds the classifier (``logits.weight`` [8631, 512], ``logits.bias`` [8631]), so the
    model is built with that head; the global RNG is restored afterwards. The BatchNorm statistics are set
    from seeded smooth-noise images (no real photo): with the default statistics a random network maps every
    image to almost the same embedding (cosine ≈ 0.9999), which makes identity energies meaningless in tests.
    """
    import torch
    import torch.nn.functional as F
    from facenet_pytorch import InceptionResnetV1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionResnetV1(pretrained=None, classify=True, num_classes=FACENET_CLASSES)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        model.classify = False
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _ in range(4):
                coarse = torch.randn(16, 3, 10, 10, generator=generator)
                model(torch.tanh(F.interpolate(coarse, size=(160, 160), mode="bicubic", align_corners=False)))
        model.classify = True
        model.eval()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert state["logits.weight"].shape == (FACENET_CLASSES, 512)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("DP_COMFYUI_DIR") or os.environ.get("COMFYUI_PATH"),
                        help="root of a ComfyUI tree (default: $DP_COMFYUI_DIR)")
    parser.add_argument("-o", "--output", default="tiny_sd15.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp16", choices=DTYPE_NAMES,
                        help="storage dtype of UNet and VAE weights (fp8 = float8_e4m3fn, 1-D tensors stay fp16)")
    parser.add_argument("--clip-dtype", default=None, choices=DTYPE_NAMES,
                        help="storage dtype of the CLIP-L weights (default: --dtype); fp8 halves the file")
    parser.add_argument("--vae", default="taesd", choices=VAE_KINDS)
    parser.add_argument("--levels", type=int, default=1, help="UNet resolution levels (1 = no down/upsampling)")
    parser.add_argument("--mid-block", action="store_true", help="add a UNet middle block (res + attention + res)")
    opts = parser.parse_args(argv)
    if not opts.comfyui:
        parser.error("--comfyui is required when DP_COMFYUI_DIR is not set")
    summary = make_checkpoint(opts.comfyui, opts.output, seed=opts.seed, vae=opts.vae, dtype=opts.dtype,
                              clip_dtype=opts.clip_dtype, levels=opts.levels, mid_block=opts.mid_block)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
