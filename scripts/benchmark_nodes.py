#!/usr/bin/env python3
"""ComfyUI overhead of a guided step: the same guided DDIM run through the pack's ComfyUI path (guider +
custom SAMPLER inside ComfyUI's sampler stack) and through ``core`` directly on the same loaded model.

    python scripts/benchmark_nodes.py [--size 64] [--batch 2] [--steps 10] [--repeats 3] [--checkpoint CKPT]

Both paths share one MODEL/VAE (ComfyUI-loaded), one guidance object (private VAE decoder + FaceNet) and the
same start latent, so the ratio isolates what ComfyUI's stack adds (conditioning processing, wrappers, model
patcher, callbacks). Without --checkpoint it uses the generated tiny SD1.5 checkpoint and a random FaceNet.
Prints seconds per step and the ratio nodes/core (target ≤ 1.2).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfyui_env  # noqa: E402
import make_tiny_sd15  # noqa: E402


def load_pack():
    import nodes
    asyncio.run(nodes.load_custom_node(str(REPO)))
    name = next(m for m in sys.modules if m.endswith(".nodes.privacy_sampler"))
    root = name[: -len(".nodes.privacy_sampler")]
    return {k: sys.modules[f"{root}.{k}"] for k in (
        "nodes.comfy.backend", "nodes.comfy.models", "nodes.comfy.sampling", "nodes.privacy_sampler",
        "nodes.embedding_scheduler", "nodes.types", "core.sampling",
        "core.recognizers", "core.faces", "core.keys", "core.schedules", "core.energies")}


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call unless ``warmup`` is off
    (off when the first call is the thing measured, e.g. before a cache fills)."""
    if warmup:
        fn()  # first loads, private decoder copy, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="guided denoising steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint")
    ap.add_argument("--facenet")
    ap.add_argument("--gpu", action="store_true", help="do not force ComfyUI onto the CPU")
    args = ap.parse_args(argv)

    comfy_dir = comfyui_env.prepare_comfyui()
    cache = REPO / ".cache" / "benchmark"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else cache / "tiny_sd15.safetensors"
    if not ckpt.exists():
        make_tiny_sd15.make_checkpoint(comfy_dir, ckpt)
    facenet = Path(args.facenet) if args.facenet else cache / "facenet_random.pt"
    if not facenet.exists():
        make_tiny_sd15.make_random_facenet(facenet)

    comfyui_env.import_comfyui(comfy_dir, cpu=not args.gpu)
    import torch
    import comfy.sd
    from skimage import data

    pack = load_pack()
    models, comfy_sampling = pack["nodes.comfy.models"], pack["nodes.comfy.sampling"]
    ComfyBackend = pack["nodes.comfy.backend"].ComfyBackend
    ps, sched = pack["nodes.privacy_sampler"], pack["nodes.embedding_scheduler"]
    sampling, rec, faces, keys = pack["core.sampling"], pack["core.recognizers"], pack["core.faces"], pack["core.keys"]
    schedules, energies, types = pack["core.schedules"], pack["core.energies"], pack["nodes.types"]

    with torch.inference_mode():  # what ComfyUI's executor does
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
        photo = torch.from_numpy(data.astronaut()).float() / 255.0
        aligned = faces.align_face(photo, faces.single_face(photo), size=args.size).crop
        image = aligned.permute(2, 0, 1).unsqueeze(0) * 2 - 1
        recognizer = models.to_compute_device(rec.load_recognizer(str(facenet), "facenet"))
        crop = rec.FaceCrop.official(recognizer)
        spec = types.GuidanceSpec(recognizer=recognizer, crop=crop,
                                  source_embedding=rec.reference_embedding(recognizer, crop, image),
                                  mode="anonymize", diversity_weight=1.0,
                                  step_size=energies.StepSizeSchedule.preset("anonymize"), target="x0",
                                  max_grad_norm=None, max_identity_similarity=1.0)
        guidance = ps.bind_guidance(spec, vae, model)
        z0 = models.encode_image(vae, model, ((image + 1) / 2).permute(0, 2, 3, 1))
        gen = torch.Generator().manual_seed(0)
        stage_conds = torch.randn(10, 77, 768, generator=gen) * 0.5
        null = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        meta = keys.KeyMetadata(model_fingerprint=models.model_fingerprint(model), ddim_steps=50,
                                schedule="recover", msi_mode="lite", image_size=(args.size, args.size))
        embeds = types.PrivacyEmbeds(stage_conds[:, 0].clone(), stage_conds, meta)
        schedule = schedules.EmbeddingSchedule.preset("anonymize")
        conditioning = sched.scheduled_conditioning(embeds, null, schedule)
        num_steps = 50
        strength = min(1.0, args.steps / num_steps)
        plan = sampling.protection_plan(z0, sampling.SamplingOptions(num_steps, strength, args.batch, seed=0))

        def through_nodes():
            comfy_sampling.run_plan_in_comfy(model, conditioning, plan, 0, guidance=guidance)

        backend = ComfyBackend(model, clip, vae)
        null_cond = backend.null_conditioning()
        denoise = sampling.make_backend_denoiser(backend, schedule, stage_conds.to(backend.device), null_cond,
                                                 args.batch)

        def through_core():
            sampling.run_plan(denoise, plan, guidance=guidance)

        n = plan.num_steps
        t_nodes = timed(through_nodes, args.repeats) / n
        t_core = timed(through_core, args.repeats) / n
    device = models.torch_device()
    print(f"device {device}, {args.size}px, batch {args.batch}, {n} guided steps per run, median of {args.repeats}")
    print(f"guided step through ComfyUI nodes: {t_nodes * 1000:8.1f} ms")
    print(f"guided step through core directly: {t_core * 1000:8.1f} ms")
    print(f"ComfyUI overhead ratio nodes/core: {t_nodes / t_core:8.3f}  (target ≤ 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
