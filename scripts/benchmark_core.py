#!/usr/bin/env python3
"""Cost of one MSI step and one guided sampling step with SD1.5-shaped random weights, and what that implies
for the paper's recipe (6100 MSI steps; 30 guided steps × 4 samples for anonymization, 80 × 1 for hiding).

    python scripts/benchmark_core.py [--size 64] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--repeats 3]

Builds a full-size SD1.5 UNet (860 M), KL VAE and CLIP-L text encoder with random weights (no download), plus a
random FaceNet, and times ``core`` directly (no ComfyUI). On a CPU use a small --size (64 px = 8×8 latents);
on a GPU use 512. Prints seconds per step and ratios (guided vs unguided step, recipe totals).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from core import msi, sampling  # noqa: E402
from core.msi import MSIOptions  # noqa: E402
from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend, load_clip_tokenizer  # noqa: E402
from core.energies import IdentityGuidance  # noqa: E402
from core.recognizers import FACENET_INPUT_SIZE, FACENET_NAME, FaceCrop, FaceRecognizer, build_facenet  # noqa: E402
from core.schedules import EmbeddingSchedule  # noqa: E402
from core.text_encoder import CLIPTextEncoder  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_step(run, steps: int, device, repeats: int) -> float:
    """Seconds per step, without the per-run setup: (T(2k) − T(k)) / k for runs of k and 2k steps."""
    return (median_time(run(2 * steps), device, repeats) - median_time(run(steps), device, repeats)) / steps


def median_time(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_backend(device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import comfyui_env
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval().requires_grad_(False)
    vae = AutoencoderKL(**SD15_VAE).to(device, dtype).eval().requires_grad_(False)
    text = CLIPTextEncoder().to(device).eval().requires_grad_(False)
    for p in text.parameters():
        p.data.normal_(0, 0.02)
    tokenizer = load_clip_tokenizer(comfyui_env.prepare_comfyui() / "comfy" / "sd1_tokenizer")
    return DiffusersBackend(unet, vae, text, tokenizer, vae_kind="kl", device=device, dtype=dtype, vae_dtype=dtype,
                            fingerprint="random-sd15")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--msi-steps", type=int, default=4, help="k: MSI runs of k and 2k steps are timed")
    ap.add_argument("--sample-steps", type=int, default=4, help="k: sampling runs of k and 2k steps are timed")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    backend = random_backend(device, dtype)
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    vision = ClipVisionEncoder.from_config(device=device, dtype=dtype)
    with torch.no_grad():
        z0 = backend.encode_image(image)

    def msi_run(mode: str):
        return lambda steps: lambda: msi.train_msi(
            backend, image, MSIOptions.preset(mode, steps=steps, grad_checkpointing=device.type == "cuda"),
            vision=vision)

    t_lite = per_step(msi_run("lite"), args.msi_steps, device, args.repeats)
    t_faithful = per_step(msi_run("faithful"), args.msi_steps, device, args.repeats)

    with torch.inference_mode(False):
        facenet = FaceRecognizer(build_facenet(), FACENET_NAME, FACENET_INPUT_SIZE).to(device)
    crop = FaceCrop.official(facenet)
    with torch.no_grad():
        source = facenet(crop(image))
    conds = 0.5 * torch.randn(10, 77, 768, generator=g).to(device)
    null = backend.null_conditioning()

    def sample_run(task: str, batch: int, guided: bool):
        guidance = IdentityGuidance(decode=backend.decode_latent, recognizer=facenet, crop=crop,
                                    source_embedding=source, mode=task) if guided else None
        schedule = EmbeddingSchedule.preset(task)
        # strength so that exactly `steps` denoising steps run on a 50-step grid
        return lambda steps: lambda: sampling.protect(
            backend, z0, conds, null, guidance, schedule=schedule,
            options=sampling.SamplingOptions(steps=50, strength=(steps + 0.5) / 50, batch_size=batch, seed=0))

    step_cost = {}
    for task, batch in (("anonymize", 4), ("hide", 1)):
        for guided in (False, True):
            step_cost[task, guided] = per_step(sample_run(task, batch, guided), args.sample_steps, device,
                                               args.repeats)

    anon_run = 30 * step_cost["anonymize", True]
    hide_run = 80 * step_cost["hide", True]
    inversion = 50 * step_cost["hide", False]  # one UNet call per step, batch 1
    print(f"SD1.5-shaped random weights, {args.size}px, {device} {args.dtype}, median of {args.repeats}")
    print(f"MSI step (lite):                        {t_lite * 1000:9.1f} ms")
    print(f"MSI step (faithful):                    {t_faithful * 1000:9.1f} ms   faithful/lite = {t_faithful / t_lite:.2f}")
    for task, batch in (("anonymize", 4), ("hide", 1)):
        u, gd = step_cost[task, False], step_cost[task, True]
        print(f"{task:9s} step, batch {batch}: unguided {u * 1000:9.1f} ms, guided {gd * 1000:9.1f} ms   "
              f"guided/unguided = {gd / u:.2f}")
    msi_total = 6100 * t_faithful
    print("Paper recipe (implied):")
    print(f"  MSI 6100 steps (faithful):            {msi_total:9.1f} s")
    print(f"  key-I inversion, 50 steps:            {inversion:9.1f} s")
    print(f"  anonymization, 30 guided steps × 4:   {anon_run:9.1f} s   MSI / anonymization = {msi_total / anon_run:.1f}")
    print(f"  hiding, 80 guided steps × 1:          {hide_run:9.1f} s   MSI / hiding = {msi_total / hide_run:.1f}")
    print(f"  share of MSI in a full anonymization: {msi_total / (msi_total + inversion + anon_run):9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
