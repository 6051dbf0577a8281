#!/usr/bin/env python3
"""Cost of the effective-model fingerprint (``nodes/comfy/models.model_fingerprint``), in seconds.

    python scripts/benchmark_fingerprint.py [--repeats 3] [--no-sd15] [--sd15-dtypes float16 float32]

1. ComfyUI, tiny checkpoint (the tests' generated one): ``model_fingerprint`` of the MODEL as loaded (cache
   cleared before each run), again from the cache, and of a clone with a rank-8 LoRA on every linear UNet
   weight loaded through ComfyUI's own LoRA code (``comfy.sd.load_lora_for_models``).
2. SD1.5-shaped random weights (859.5 M parameters, shapes of diffusers' SD1.x UNet, built on the meta device):
   ``core.fingerprint.unet_fingerprint`` of the whole dict per dtype (float16 = 1.7 GB, float32 = 3.4 GB of
   memory), and the cost of applying a rank-32 LoRA to every attention/feed-forward linear weight the way the
   bridge does (``comfy.lora.calculate_weight`` on the CPU in the bridge's PATCH_DTYPE, float64), next to
   float32 (what ComfyUI spends loading the LoRA on a CPU).

Prints one line per measurement: median seconds and parameters.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfyui_env  # noqa: E402
import make_tiny_sd15  # noqa: E402
from benchmark import timed  # noqa: E402


def load_models_module():
    import nodes
    asyncio.run(nodes.load_custom_node(str(REPO)))
    name = next(m for m in sys.modules if m.endswith(".nodes.comfy.models"))
    return sys.modules[name]


def lora_state_dict(model, rank: int):
    """A rank-``rank`` LoRA (kohya names) on every 2-D UNet weight ComfyUI's key map knows."""
    import torch
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for lora_name, model_key in key_map.items():
        if not isinstance(model_key, str) or not lora_name.startswith("lora_unet_"):
            continue
        weight = weights.get(model_key)
        if weight is None or weight.dim() != 2:
            continue
        sd[f"{lora_name}.lora_up.weight"] = 1e-3 * torch.randn(weight.shape[0], rank, generator=gen)
        sd[f"{lora_name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=gen)
        sd[f"{lora_name}.alpha"] = torch.tensor(float(rank))
    return sd


def bench_comfy(args, models) -> None:
    import torch
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=False, output_clip=False)[0]
    params = sum(t.numel() for t in model.model.diffusion_model.state_dict().values())

    def cold(patcher):
        model.model.__dict__.pop(models.FINGERPRINT_CACHE_ATTRIBUTE, None)
        return models.model_fingerprint(patcher)

    with torch.inference_mode():
        cold(model)  # warm-up (imports, allocator)
        print(f"tiny checkpoint, {params / 1e6:.1f} M UNet parameters ({model.model_dtype()}):")
        print(f"  model_fingerprint, computed: {timed(lambda: cold(model), args.repeats, warmup=False):.3f} s")
        cached = timed(lambda: models.model_fingerprint(model), 1000, warmup=False)
        print(f"  model_fingerprint, cached:   {cached:.2e} s")
        lora = lora_state_dict(model, rank=8)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        print(f"  with a rank-8 LoRA on {len(patched.patches)} weights: "
              f"{timed(lambda: cold(patched), args.repeats, warmup=False):.3f} s "
              f"(id differs: {cold(patched) != cold(model)})")


def sd15_shapes() -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def bench_sd15(args, models) -> None:
    import torch
    import comfy.lora
    import comfy.weight_adapter

    from core.fingerprint import unet_fingerprint

    shapes = sd15_shapes()
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"SD1.5-shaped random UNet, {len(shapes)} tensors, {params / 1e6:.1f} M parameters:")
    gen = torch.Generator().manual_seed(0)
    for dtype_name in args.sd15_dtypes:
        dtype = getattr(torch, dtype_name)
        weights = {k: torch.randn(s, generator=gen, dtype=torch.float32).to(dtype) for k, s in shapes.items()}
        seconds = timed(lambda: unet_fingerprint(weights), args.repeats, warmup=False)
        print(f"  unet_fingerprint, {dtype_name} weights ({params * dtype.itemsize / 2**30:.2f} GiB): {seconds:.2f} s")
        if dtype == torch.float32:
            linear = [k for k, s in shapes.items() if len(s) == 2 and (".attn" in k or ".ff." in k)]
            rank = 32
            adapters = {k: comfy.weight_adapter.LoRAAdapter(set(), (
                1e-3 * torch.randn(shapes[k][0], rank, generator=gen), torch.randn(rank, shapes[k][1], generator=gen),
                float(rank), None, None, None)) for k in linear}

            def apply_all(work_dtype):
                for k in linear:
                    comfy.lora.calculate_weight([(1.0, adapters[k], 1.0, None, None)],
                                                weights[k].to(work_dtype, copy=True), k, intermediate_dtype=work_dtype)

            for work_dtype in (models.PATCH_DTYPE, torch.float32):
                print(f"  rank-{rank} LoRA applied to {len(linear)} linear weights ({work_dtype}, CPU): "
                      f"{timed(lambda: apply_all(work_dtype), args.repeats, warmup=False):.2f} s")
        del weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--comfyui", help="ComfyUI tree (default: the pinned 0.3.75 copy)")
    ap.add_argument("--checkpoint", help="SD1.x checkpoint (default: the generated tiny one)")
    ap.add_argument("--no-sd15", action="store_true", help="skip the SD1.5-shaped measurement")
    ap.add_argument("--sd15-dtypes", nargs="+", default=["float16", "float32"])
    args = ap.parse_args(argv)
    root = Path(args.comfyui).resolve() if args.comfyui else comfyui_env.prepare_comfyui()
    if args.checkpoint is None:
        args.checkpoint = REPO / ".cache" / "benchmark" / "tiny_sd15.safetensors"  # shared with benchmark.py --comfyui
        if not args.checkpoint.exists():
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            make_tiny_sd15.make_checkpoint(root, args.checkpoint)
    comfyui_env.import_comfyui(root, cpu=True)
    models = load_models_module()
    bench_comfy(args, models)
    if not args.no_sd15:
        sys.path.insert(0, str(REPO))
        bench_sd15(args, models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
