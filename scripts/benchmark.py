#!/usr/bin/env python3
"""Speed of Diff-Privacy, reference path against optimised path, measured in one run.

    python scripts/benchmark.py                                  # CPU, 64 px, tiny test models, 1 thread
    python scripts/benchmark.py --weights sd15 --sections components   # full-size SD1.5-shaped random weights
    python scripts/benchmark.py --device cuda --size 512 --weights sd15 [--compile on] [--cuda-graphs off]
    python scripts/benchmark.py --comfyui                         # also the ComfyUI bridge's own speed-ups

Every loop step is timed between two progress callbacks of the loop itself (MSI, inversion and sampling report
after each step; the guidance gradient is timed call by call), never by subtracting runs of different lengths;
the first --warmup steps of each loop are dropped and the median of the rest is reported (on CUDA the device is
synchronised at each callback, for the measurement only). Torch's CPU thread count is pinned (--threads,
default 1: the default of two threads collapses on a shared two-core machine).

Sections (--sections, comma-separated; default all but e2e for --weights sd15 on a CPU, which takes hours):

* components — per loop step, reference vs optimised and their ratio: MSI step and MSI cost per timestep seen
  (reference: the release's recipe as this pack ran it before, one timestep per step with UNet checkpointing
  always on and no autocast; optimised: the default recipe, 4 timesteps per step, checkpointing only when
  memory needs it, bf16 autocast on CUDA), key-I inversion step, guided anonymization step (batch 4) and the
  guidance gradient alone (VAE decode + recognizer, forward and backward). Reference and optimised backends
  are the same object on a CPU (float32, eager); on CUDA the optimised one runs bf16 weights, the UNet step
  replayed as CUDA graphs (--cuda-graphs, default auto) and, with --compile on, the compiled UNet step
  instead. Where graphs are on, three more rows isolate them: MSI, inversion and guided step of the optimised
  backend with its graphs kept off vs on.
* e2e — one face end to end (core.pipeline.protect_photo on scikit-image's astronaut photo, the aligned face
  at --size) for each preset (paper, default, fast), with the seconds per stage.
* batch — the optimised guided step for B = 1, 2, 4, 8 samples (--batches).
* faces — faces per photo, 1, 2, 4, 8 (--faces): one generated photo with n faces through protect_photo, the
  faces one at a time (faces_per_batch=1, the reference) and in one batch (the default: as many as fit into
  memory), both in this run, with their ratio and peak memory.
* comfyui (only with --comfyui; tiny checkpoint in an in-process ComfyUI on this machine's device setting):
  the guidance decoder copy (whole VAE vs decoder only), MSI Invert's inversion through the trainable UNet
  (reference) vs the plain MODEL, the trainable UNet's MSI step with a clone of every weight (reference) vs
  ComfyUI's own copy, and a guided step through ComfyUI's sampler stack vs core directly.

Peak memory per measurement: torch.cuda.max_memory_allocated on CUDA; on a CPU the peak rise of the process's
resident memory, sampled every 5 ms (PyTorch's CPU allocator is invisible to tracemalloc). Results also go to
--out as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

SECTIONS = ("components", "e2e", "batch", "faces")
PRESETS = ("paper", "default", "fast")
CACHE = REPO / ".cache" / "benchmark"

# Full-size SD1.5 layouts (diffusers names), for --weights sd15: UNet 860 M, KL VAE 84 M parameters.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


# ------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """A progress callback that stamps the time of each call; ``step_seconds`` are the gaps between calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, *args, **kwargs) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def start(self) -> None:
        sync(self.device)
        self.stamps = [time.perf_counter()]

    def step_seconds(self, warmup: int) -> list[float]:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return gaps[warmup:] if len(gaps) > warmup else gaps[-1:]


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or the peak rise of the CPU process's RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil
            _malloc_trim()  # hand memory freed by earlier runs back to the OS, so the rise is this block's
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_bytes = self._peak - self._base
            self.kind = "CPU RSS rise"
        return False


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): PyTorch's CPU tensors come from malloc, and memory a run freed stays in the
    process (RSS) until trimmed; without it a second run would reuse it and show no rise at all."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def timed_loop(device, warmup: int, run: Callable[[StepTimer], Any]) -> tuple[list[float], float]:
    """(seconds of each timed step, peak memory MiB) of a loop that calls the timer after each step."""
    timer = StepTimer(device)
    with PeakMemory(device) as mem:
        timer.start()
        run(timer)
    return timer.step_seconds(warmup), mem.peak_bytes / 2**20


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call unless ``warmup`` is off (for
    costs measured once per process, e.g. a first fingerprint)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ models
def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """N(0, 1/fan_in) weights, zero biases, unit norms: finite activations at every depth, no denormals. Drawn on
    the module's device (seconds for 1 G parameters on a GPU instead of a minute on a CPU)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() <= 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) / math.sqrt(p[0].numel()))


def tokenizer_dir() -> Path:
    import comfyui_env
    from tests.support import tiny_diffusers as td
    found = td.sd1_tokenizer_dir()
    return Path(found) if found else comfyui_env.prepare_comfyui() / "comfy" / "sd1_tokenizer"


def sd15_backend(device, seed: int = 0):
    """Full-size SD1.5-shaped float32 DiffusersBackend with random weights (no download, nothing read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from core.diffusers_backend import DiffusersBackend, load_clip_tokenizer
    from core.text_encoder import CLIPTextEncoder

    with torch.device("meta"):
        unet, vae, text = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE), CLIPTextEncoder()
    unet, vae, text = (m.to_empty(device=device).eval().requires_grad_(False) for m in (unet, vae, text))
    for i, module in enumerate((unet, vae, text)):
        _fill_random(module, seed + i)
    with torch.no_grad():
        text.token_embedding.weight.mul_(0.02 * math.sqrt(768))
        text.position_embedding.weight.mul_(0.02 * math.sqrt(768))
    tok = load_clip_tokenizer(tokenizer_dir())
    return DiffusersBackend(unet, vae, text, tok, vae_kind="kl", device=device, dtype=torch.float32,
                            vae_dtype=torch.float32, fingerprint="random-sd15", text_fingerprint="random-clip",
                            cuda_graphs="off")


def lower_precision_twin(reference, dtype: torch.dtype, compile_setting: str, graphs_setting: str):
    """The optimised path's backend: the reference's very weights cast to ``dtype`` (UNet and VAE; the text
    encoder stays float32 and is shared), with CUDA graphs and the compiled UNet step as asked."""
    import copy

    from core.diffusers_backend import DiffusersBackend
    # nn.Module.to: diffusers' own .to() warns about fp32-pinned modules, which SD1 models do not have
    unet = torch.nn.Module.to(copy.deepcopy(reference.unet), dtype=dtype)
    vae = torch.nn.Module.to(copy.deepcopy(reference.vae), dtype=dtype)
    return DiffusersBackend(unet, vae, reference.text_model, reference.tokenizer, vae_kind=reference.vae_kind,
                            device=reference.device, dtype=dtype, vae_dtype=dtype,
                            fingerprint=reference.model_fingerprint(),
                            text_fingerprint=reference.text_encoder_fingerprint(),
                            taesd_scale=reference._taesd_scale, taesd_shift=reference._taesd_shift,
                            compile_unet=compile_setting, cuda_graphs=graphs_setting)


def tiny_backend(device):
    """The tests' tiny SD1.5-shaped checkpoint (tests/support/tiny_diffusers.py, KL VAE) as a DiffusersBackend
    (the reference: eager UNet steps)."""
    from core.diffusers_backend import DiffusersBackend
    from tests.support import tiny_diffusers as td

    CACHE.mkdir(parents=True, exist_ok=True)
    path = td.tiny_checkpoint(str(CACHE), 0, vae="kl", text_layers=2)
    return DiffusersBackend.from_single_file(path, tokenizer_dir=tokenizer_dir(), device=device, cuda_graphs="off")


def facenet(device):
    import make_tiny_sd15

    from core.recognizers import load_recognizer
    path = CACHE / "facenet_random.pt"
    if not path.exists():
        make_tiny_sd15.make_random_facenet(path)
    return load_recognizer(str(path), "facenet", device=device)


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    reference: Any  # backend of the reference path (float32, eager)
    optimised: Any  # backend of the optimised path (the same object on a CPU)
    recognizer: Any
    image: torch.Tensor  # the aligned face [1,3,S,S] in [-1,1]
    photo: torch.Tensor  # the whole photo [H,W,3] in [0,1]
    results: dict
    tiny_decoder: Any = None  # the TAESD guidance decoder, made on first use (tiny_guidance_decoder)


def build_context(args) -> Context:
    from skimage import data

    from core import faces
    from core.speed import resolve_compute_dtype

    device = torch.device(args.device)
    fast_dtype = resolve_compute_dtype("auto", device)
    make = sd15_backend if args.weights == "sd15" else tiny_backend
    reference = make(device)
    graphs = args.cuda_graphs if device.type == "cuda" else "off"
    optimised = (reference if fast_dtype == torch.float32 and args.compile == "off" and graphs == "off"
                 else lower_precision_twin(reference, fast_dtype, args.compile, graphs))
    photo = torch.from_numpy(data.astronaut()).float() / 255.0
    aligned = faces.align_face(photo, faces.single_face(photo), size=args.size).crop
    image = (aligned.permute(2, 0, 1).unsqueeze(0) * 2 - 1).to(device)
    return Context(args, device, reference, optimised, facenet(device), image, photo, {})


# ------------------------------------------------------------------------------------------ components
def msi_step(ctx: Context, backend, options, steps: int) -> tuple[list[float], float]:
    """(seconds of each MSI step, peak MiB)."""
    from core import msi
    options = dataclasses.replace(options, steps=steps, loss_sync_every=10**9)
    return timed_loop(ctx.device, ctx.args.warmup,
                      lambda timer: msi.train_msi(backend, ctx.image, options, progress=timer))


def guidance_for(ctx: Context, backend, task: str = "anonymize", decoder=None):
    from core.energies import IdentityGuidance
    from core.recognizers import FaceCrop, reference_embedding
    crop = FaceCrop.official(ctx.recognizer)
    return IdentityGuidance(decode=decoder if decoder is not None else backend.decode_latent, recognizer=ctx.recognizer, crop=crop,
                            source_embedding=reference_embedding(ctx.recognizer, crop, ctx.image), mode=task)


def tiny_guidance_decoder(ctx: Context):
    """A TAESD guidance decoder (core.diffusers_backend.TinyGuidanceDecoder) of the real architecture with random
    weights (tests/support/tiny_diffusers.write_taesd_files), on the benchmark's device, made once."""
    if ctx.tiny_decoder is None:
        import tempfile

        from core.diffusers_backend import TinyGuidanceDecoder
        from tests.support import tiny_diffusers as td
        folder = tempfile.mkdtemp(prefix="dp-bench-taesd-")
        _, decoder_file = td.write_taesd_files(folder, seed=0)
        dtype = getattr(ctx.optimised, "vae_dtype", torch.float32)
        ctx.tiny_decoder = TinyGuidanceDecoder.from_file(decoder_file, device=ctx.device, dtype=dtype)
    return ctx.tiny_decoder


def guided_step(ctx: Context, backend, batch: int, steps: int, decoder=None) -> tuple[list[float], float]:
    """(seconds of each guided anonymization step with ``batch`` samples, peak MiB); ``decoder`` the guidance
    decoder (default: the backend's VAE)."""
    from core import sampling
    from core.schedules import EmbeddingSchedule
    with torch.no_grad():
        z0 = backend.encode_image(ctx.image)
    conds = 0.3 * torch.randn(10, 77, backend.token_dim, generator=torch.Generator().manual_seed(0))
    guidance = guidance_for(ctx, backend, decoder=decoder)
    # a 50-step grid with the strength that gives `steps` denoising steps
    options = sampling.SamplingOptions(steps=50, strength=(steps + 0.5) / 50, batch_size=batch, seed=0)
    return timed_loop(ctx.device, ctx.args.warmup, lambda timer: sampling.protect(
        backend, z0, conds.to(ctx.device), backend.null_conditioning(), guidance,
        schedule=EmbeddingSchedule.preset("anonymize"), options=options, progress=timer))


def inversion_step(ctx: Context, backend, steps: int) -> tuple[list[float], float]:
    from core import sampling
    with torch.no_grad():
        z0 = backend.encode_image(ctx.image)
    conds = 0.3 * torch.randn(10, 77, backend.token_dim, generator=torch.Generator().manual_seed(0))
    return timed_loop(ctx.device, ctx.args.warmup, lambda timer: sampling.ddim_invert(
        backend, z0, conds.to(ctx.device), steps, progress=timer))


def gradient_step(ctx: Context, backend, batch: int, calls: int, decoder=None) -> tuple[list[float], float]:
    """(seconds of each guidance gradient (decode + recognizer, forward and backward) on ``batch`` latents, MiB)."""
    with torch.no_grad():
        x0 = backend.encode_image(ctx.image).expand(batch, -1, -1, -1).contiguous()
    guidance = guidance_for(ctx, backend, decoder=decoder)

    def run(timer):
        for _ in range(calls):
            guidance.gradient(x0)
            timer()
    return timed_loop(ctx.device, ctx.args.warmup, run)


def compare(ctx: Context, *variants: Callable[[], tuple[list[float], float]]) -> list[tuple[float, float]]:
    """(median ms per step, peak MiB) of each variant, run in turn --rounds times (A, B, A, B…), so that a load
    change on a shared machine hits every variant alike."""
    steps: list[list[float]] = [[] for _ in variants]
    peaks = [0.0 for _ in variants]
    for _ in range(ctx.args.rounds):
        for i, measure in enumerate(variants):
            seconds, mib = measure()
            steps[i] += seconds
            peaks[i] = max(peaks[i], mib)
    return [(median_ms(s), p) for s, p in zip(steps, peaks)]


def components(ctx: Context) -> list[dict]:
    from core.msi import MSIOptions
    a = ctx.args
    rows = []

    def row(name, ref, opt, removed, unit="ms/step"):
        (ref_ms, ref_mib), (opt_ms, opt_mib) = ref, opt
        entry = {"component": name, "reference": round(ref_ms, 2), "optimised": round(opt_ms, 2),
                 "ratio": round(opt_ms / ref_ms, 3), "unit": unit, "what changed": removed,
                 "peak_mib": [round(ref_mib, 1), round(opt_mib, 1)]}
        rows.append(entry)
        print(f"  {name:42s} {ref_ms:10.1f} {opt_ms:10.1f} {opt_ms / ref_ms:7.3f}  {unit:12s} "
              f"{ref_mib:7.0f} {opt_mib:7.0f}  {removed}", flush=True)

    print(f"  {'component':42s} {'reference':>10s} {'optimised':>10s} {'ratio':>7s}  {'unit':12s} "
          f"{'ref MiB':>7s} {'opt MiB':>7s}  what changed   (peak: {_memory_kind(ctx.device)})", flush=True)
    reference = MSIOptions.preset("lite", "paper", grad_checkpointing=True)  # the path as it ran before
    no_ckpt = dataclasses.replace(reference, grad_checkpointing="auto")
    optimised = MSIOptions.preset("lite")
    k = optimised.timesteps_per_step
    n = a.msi_steps + a.warmup
    ref, nock, opt = compare(ctx, lambda: msi_step(ctx, ctx.reference, reference, n),
                             lambda: msi_step(ctx, ctx.reference, no_ckpt, n),
                             lambda: msi_step(ctx, ctx.optimised, optimised, n))
    row("MSI step, 1 timestep, checkpointing 'auto'", ref, nock, "UNet checkpointing only when memory needs it")
    row(f"MSI step (optimised: {k} timesteps)", ref, opt, f"one step now covers {k} timesteps")
    row("MSI cost per timestep seen", ref, (opt[0] / k, opt[1]),
        f"checkpointing off when it fits; {k} timesteps per UNet call" + ("; bf16" if ctx.device.type == "cuda" else ""),
        unit="ms/timestep")
    n = a.loop_steps + a.warmup
    row("inversion step (batch 1)", *compare(ctx, lambda: inversion_step(ctx, ctx.reference, n),
                                             lambda: inversion_step(ctx, ctx.optimised, n)),
        _backend_change(ctx) + "; constants made once")
    row("guided anonymize step (batch 4)", *compare(ctx, lambda: guided_step(ctx, ctx.reference, 4, n),
                                                    lambda: guided_step(ctx, ctx.optimised, 4, n)),
        _backend_change(ctx) + "; source embedding cloned once")
    row("decode + recognizer fwd+bwd (batch 4)", *compare(ctx, lambda: gradient_step(ctx, ctx.reference, 4, n),
                                                          lambda: gradient_step(ctx, ctx.optimised, 4, n)),
        _backend_change(ctx, vae=True))
    # not the same math: the guidance gradient through TAESD's decoder (guidance_decoder / guidance_vae) instead
    # of the checkpoint's VAE; results are still decoded and gated through the VAE
    tiny = tiny_guidance_decoder(ctx)
    row("guided step (batch 4), TAESD guidance decoder",
        *compare(ctx, lambda: guided_step(ctx, ctx.optimised, 4, n),
                 lambda: guided_step(ctx, ctx.optimised, 4, n, decoder=tiny)),
        f"guidance gradient through TAESD instead of the checkpoint's {ctx.optimised.vae_kind} VAE")
    row("decode + recognizer fwd+bwd (batch 4), TAESD",
        *compare(ctx, lambda: gradient_step(ctx, ctx.optimised, 4, n),
                 lambda: gradient_step(ctx, ctx.optimised, 4, n, decoder=tiny)),
        f"TAESD's decoder instead of the checkpoint's {ctx.optimised.vae_kind} VAE")
    if graphs_on(ctx.optimised):  # the same backend with its graphs kept off vs on: what graphs alone give
        n_msi = a.msi_steps + a.warmup
        row("MSI step, CUDA graphs", *compare(ctx, graphs_kept_off(ctx, lambda: msi_step(ctx, ctx.optimised, optimised, n_msi)),
                                              lambda: msi_step(ctx, ctx.optimised, optimised, n_msi)),
            f"{k} timesteps' UNet forward+backward replayed as one CUDA graph (same weights and dtype)")
        row("inversion step, CUDA graphs", *compare(ctx, graphs_kept_off(ctx, lambda: inversion_step(ctx, ctx.optimised, n)),
                                                    lambda: inversion_step(ctx, ctx.optimised, n)),
            "UNet forward replayed as one CUDA graph")
        row("guided step (batch 4), CUDA graphs", *compare(ctx, graphs_kept_off(ctx, lambda: guided_step(ctx, ctx.optimised, 4, n)),
                                                           lambda: guided_step(ctx, ctx.optimised, 4, n)),
            "UNet forward replayed as one CUDA graph (decoder and recognizer eager)")
    return rows


def _memory_kind(device: torch.device) -> str:
    return "CUDA max_memory_allocated" if device.type == "cuda" else "rise of the process's RSS"


def _backend_change(ctx: Context, vae: bool = False) -> str:
    if ctx.optimised is ctx.reference:
        return "same backend on a CPU (float32, eager): no change expected"
    what = f"{ctx.optimised.vae_dtype if vae else ctx.optimised.dtype} weights".replace("torch.", "")
    if not vae and ctx.optimised._unet_call.active:
        what += ", compiled UNet step"
    elif not vae and graphs_on(ctx.optimised):
        what += ", UNet step as CUDA graphs"
    return what


def graphs_on(backend) -> bool:
    """Whether ``backend`` may replay its UNet step as CUDA graphs inside loops (core/cuda_graphs.py)."""
    return bool(getattr(backend, "cuda_graphs_enabled", False))


def graphs_kept_off(ctx: Context, measure: Callable[[], tuple[list[float], float]]):
    """``measure`` with the optimised backend's CUDA graphs kept off (an enclosing scope opened disabled: the
    loops' own scopes join it), the eager reference of the graph rows."""
    def run():
        with ctx.optimised.unet_graphs(enabled=False, why="the benchmark's eager reference"):
            return measure()
    return run


# ------------------------------------------------------------------------------------------ end to end
def protect_once(ctx: Context, speed: str) -> dict:
    """One face through core.pipeline.protect_photo at a preset; seconds in total and per stage."""
    from core.pipeline import ProtectOptions, protect_photo
    options = ProtectOptions.preset("anonymize", speed, size=ctx.args.size, max_identity_similarity=1.0)
    if ctx.args.plumbing:  # a check of the script, not a measurement: every preset cut to a few steps
        options = dataclasses.replace(options, msi=dataclasses.replace(options.msi, steps=2), inversion_steps=4,
                                      sampling=dataclasses.replace(options.sampling, steps=4))
    marks: dict[str, list[float]] = {}

    def progress(stage, step, total):
        sync(ctx.device)
        marks.setdefault(stage, []).append(time.perf_counter())

    sync(ctx.device)
    start = time.perf_counter()
    with PeakMemory(ctx.device) as mem:
        protect_photo(ctx.optimised, ctx.recognizer, ctx.photo, options, progress=progress)
    sync(ctx.device)
    total = time.perf_counter() - start
    stages = {name: round(ts[-1] - ts[0], 2) for name, ts in marks.items()}
    return {"preset": speed, "seconds": round(total, 2), "stage_seconds_first_to_last_step": stages,
            "msi_steps": options.msi.steps, "timesteps_per_step": options.msi.timesteps_per_step,
            "guided_steps": options.sampling.denoising_steps, "inversion_steps": options.inversion_steps,
            "peak_mib": round(mem.peak_bytes / 2**20, 1), "plumbing": bool(ctx.args.plumbing)}


def end_to_end(ctx: Context) -> list[dict]:
    rows = []
    for speed in ctx.args.presets:
        r = protect_once(ctx, speed)
        rows.append(r)
        print(f"  {speed:8s} {r['seconds']:9.1f} s per face  (MSI {r['msi_steps']}×{r['timesteps_per_step']}, "
              f"{r['inversion_steps']} inversion, {r['guided_steps']} guided steps; stages "
              f"{r['stage_seconds_first_to_last_step']}; peak {r['peak_mib']} MiB)", flush=True)
    return rows


def n_face_photo(n: int):
    """A photo [H,W,3] in [0,1] with ``n`` copies of scikit-image's astronaut head in a grid on a grey canvas."""
    import torch
    from skimage import data

    head = torch.from_numpy(data.astronaut()[20:230, 140:310].copy()).float() / 255.0  # 210 × 170
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.full((rows * 250 + 20, cols * 210 + 20, 3), 0.5)
    for i in range(n):
        y, x = 20 + (i // cols) * 250, 20 + (i % cols) * 210
        canvas[y:y + 210, x:x + 170] = head
    return canvas


def protect_n_faces(ctx: Context, n: int, speed: str, faces_per_batch: Optional[int]) -> tuple[float, float, int]:
    """(seconds, peak MiB, faces in one batch) of ``protect_photo`` on one photo with ``n`` faces: detection and
    selection once, the faces ``faces_per_batch`` at a time (None: as many as fit, the default), one composition."""
    from core.pipeline import ProtectOptions, protect_photo, select_faces

    photo = n_face_photo(n)
    plan = select_faces(None, photo)
    if len(plan.with_action("protect")) != n:
        raise RuntimeError(f"the {n}-face benchmark photo shows {len(plan.with_action('protect'))} protectable faces")
    options = ProtectOptions.preset("anonymize", speed, size=ctx.args.size, max_identity_similarity=1.0,
                                    faces_per_batch=faces_per_batch)
    if ctx.args.plumbing:
        options = dataclasses.replace(options, msi=dataclasses.replace(options.msi, steps=2), inversion_steps=4,
                                      sampling=dataclasses.replace(options.sampling, steps=4))
    sync(ctx.device)
    start = time.perf_counter()
    with PeakMemory(ctx.device) as mem:
        result = protect_photo(ctx.optimised, ctx.recognizer, photo, options, plan=plan)
    sync(ctx.device)
    return time.perf_counter() - start, mem.peak_bytes / 2**20, int(result.report.settings["faces_in_one_batch"])


def faces_scaling(ctx: Context) -> list[dict]:
    """Per face count n: the photo's faces one at a time (faces_per_batch=1, the reference) and in one batch (the
    default), measured in this run, and their ratio. The two runs alternate which goes first from one n to the
    next, so neither always gets the warmer caches."""
    rows = []
    for index, n in enumerate(ctx.args.faces):
        if n == 1:
            one_s, one_mib, _ = protect_n_faces(ctx, n, ctx.args.faces_preset, 1)
            batch_s, batch_mib, group = one_s, one_mib, 1
        elif index % 2:
            batch_s, batch_mib, group = protect_n_faces(ctx, n, ctx.args.faces_preset, None)
            one_s, one_mib, _ = protect_n_faces(ctx, n, ctx.args.faces_preset, 1)
        else:
            one_s, one_mib, _ = protect_n_faces(ctx, n, ctx.args.faces_preset, 1)
            batch_s, batch_mib, group = protect_n_faces(ctx, n, ctx.args.faces_preset, None)
        rows.append({"faces": n, "one_at_a_time_s": round(one_s, 2), "batched_s": round(batch_s, 2),
                     "ratio": round(batch_s / one_s, 3), "per_face_batched_s": round(batch_s / n, 2),
                     "faces_in_one_batch": group, "peak_mib": [round(one_mib, 1), round(batch_mib, 1)],
                     "preset": ctx.args.faces_preset})
        print(f"  {n:2d} face(s): one at a time {one_s:8.1f} s, {group} per batch {batch_s:8.1f} s → ratio "
              f"{batch_s / one_s:5.2f}, {batch_s / n:6.1f} s per face ({ctx.args.faces_preset}; peak "
              f"{one_mib:.0f} / {batch_mib:.0f} MiB)", flush=True)
    return rows


def batch_scaling(ctx: Context) -> list[dict]:
    rows = []
    for b in ctx.args.batches:
        ((ms, mib),) = compare(ctx, lambda: guided_step(ctx, ctx.optimised, b, ctx.args.loop_steps + ctx.args.warmup))
        rows.append({"batch": b, "ms_per_step": round(ms, 1), "ms_per_sample": round(ms / b, 1),
                     "peak_mib": round(mib, 1)})
        print(f"  B={b:2d}: {ms:9.1f} ms per guided step, {ms / b:8.1f} ms per sample, peak {mib:.0f} MiB",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------ ComfyUI
def comfyui_section(args) -> list[dict]:
    """The bridge's own speed-ups, reference vs optimised, on the tiny checkpoint in an in-process ComfyUI."""
    import asyncio

    import comfyui_env
    import make_tiny_sd15

    from tests.support.toy_models import ToyRecognizer, toy_crop  # before ComfyUI's own `tests` package loads

    comfy_dir = comfyui_env.prepare_comfyui()
    CACHE.mkdir(parents=True, exist_ok=True)
    ckpt = CACHE / "tiny_sd15_kl.safetensors"  # the full SD1 KL VAE (84 M), so the decoder copy is realistic
    if not ckpt.exists():
        make_tiny_sd15.make_checkpoint(comfy_dir, ckpt, vae="kl")
    comfyui_env.import_comfyui(comfy_dir, cpu=args.device == "cpu")
    import comfy.sd
    import nodes

    asyncio.run(nodes.load_custom_node(str(REPO)))
    root = next(m for m in sys.modules if m.endswith(".nodes.privacy_sampler"))[: -len(".nodes.privacy_sampler")]
    mod = lambda name: sys.modules[f"{root}.{name}"]  # noqa: E731
    autograd, backend_mod, models = mod("nodes.comfy.autograd"), mod("nodes.comfy.backend"), mod("nodes.comfy.models")
    sampling, energies, msi = mod("core.sampling"), mod("core.energies"), mod("core.msi")
    bridge_sampling, sched, types = mod("nodes.comfy.sampling"), mod("nodes.embedding_scheduler"), mod("nodes.types")
    schedules, keys = mod("core.schedules"), mod("core.keys")
    device = models.torch_device()
    rows = []

    def row(name, ref, opt, unit, what):
        rows.append({"component": name, "reference": round(ref, 2), "optimised": round(opt, 2),
                     "ratio": round(opt / ref, 3), "unit": unit, "what changed": what})
        print(f"  {name:42s} {ref:10.1f} {opt:10.1f} {opt / ref:7.3f}  {unit:14s} {what}", flush=True)

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
        models.load_models(vae.patcher)
        full = lambda: autograd.private_copy(vae.first_stage_model, device)  # noqa: E731
        only = lambda: autograd.decoder_only_copy(vae.first_stage_model, device)  # noqa: E731
        size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20  # noqa: E731
        row("guidance decoder copy: MiB of weights", size(full()), size(only()), "MiB", "decoder only, no encoder")
        row("guidance decoder copy: time", 1000 * timed(full, args.repeats), 1000 * timed(only, args.repeats),
            "ms", "decoder only, no encoder")

        g = torch.Generator().manual_seed(0)
        conds = 0.3 * torch.randn(10, 77, 768, generator=g)
        z0 = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
        trainable = backend_mod.ComfyBackend(model, clip, vae, trainable=True)

        class OldInversionPath:  # the reference: no-grad calls through the grad-ready clone, as before
            device, token_dim = trainable.device, trainable.token_dim

            def predict_eps(self, z_t, t, cond):
                models.load_models(trainable.model)
                with autograd.normal_tensors():
                    return trainable._eps(z_t, t, cond)

        def inversion(backend):
            timer = StepTimer(device)
            timer.start()
            sampling.ddim_invert(backend, z0, conds, args.loop_steps + args.warmup, progress=timer)
            return median_ms(timer.step_seconds(args.warmup))
        old_path, times = OldInversionPath(), ([], [])
        for _ in range(args.rounds):
            times[0].append(inversion(old_path))
            times[1].append(inversion(trainable))
        row("MSI Invert's inversion step", statistics.median(times[0]), statistics.median(times[1]), "ms/step",
            "plain MODEL instead of the grad-ready clone")

        image = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1

        wrapped = [m for m in trainable.model.model.modules() if getattr(m, "weight_function", None)]

        def msi_steps(clone_every_weight: bool) -> list[float]:
            """MSI steps through the trainable UNet; the reference hands every op a clone of its weight, as the
            weight wrapper did before (on top of ComfyUI's own copy)."""
            saved = [(m, list(m.weight_function), list(m.bias_function)) for m in wrapped]
            try:
                if clone_every_weight:
                    for m in wrapped:
                        m.weight_function = [lambda w: w.clone()]
                        m.bias_function = [lambda b: b.clone()] if m.bias_function else []
                timer = StepTimer(device)
                timer.start()
                with autograd.normal_tensors():
                    msi.train_msi(trainable, image, msi.MSIOptions.preset(
                        "lite", "paper", steps=args.msi_steps + args.warmup, grad_checkpointing=False), progress=timer)
                return timer.step_seconds(args.warmup)
            finally:
                for m, wf, bf in saved:
                    m.weight_function, m.bias_function = wf, bf

        reference_steps, optimised_steps = [], []
        for _ in range(args.rounds):  # alternating, as compare() does
            reference_steps += msi_steps(True)
            optimised_steps += msi_steps(False)
        row("MSI step through the trainable UNet", median_ms(reference_steps), median_ms(optimised_steps), "ms/step",
            "ComfyUI's weight copy used as is (no second clone)")

        recognizer = ToyRecognizer(seed=1)
        decoder = autograd.DifferentiableDecoder(vae, model)
        guidance = energies.IdentityGuidance(decoder, recognizer, toy_crop, recognizer(toy_crop(decoder(z0))))
        meta = keys.KeyMetadata(model_fingerprint="w1:x", ddim_steps=4, schedule="recover", msi_mode="lite",
                                image_size=(args.size, args.size))
        embeds = types.PrivacyEmbeds(conds[:, 0].clone(), conds, meta)
        null = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        schedule = schedules.EmbeddingSchedule.preset("anonymize")
        conditioning = sched.scheduled_conditioning(embeds, null, schedule)
        plan = sampling.protection_plan(z0, sampling.SamplingOptions(50, (args.loop_steps + args.warmup + 0.5) / 50,
                                                                     2, seed=0))
        plain = backend_mod.ComfyBackend(model, clip, vae)
        denoise = sampling.make_backend_denoiser(plain, schedule, conds.to(device), plain.null_conditioning(), 2)

        def through(run):
            timer = StepTimer(device)
            timer.start()
            run(timer)
            return median_ms(timer.step_seconds(args.warmup))
        core_ms = through(lambda timer: sampling.run_plan(denoise, plan, guidance=guidance,
                                                          callback=lambda info: timer()))
        comfy_ms = through(lambda timer: _comfy_plan(bridge_sampling, model, conditioning, plan, guidance, timer))
        row("guided step: ComfyUI stack vs core", core_ms, comfy_ms, "ms/step",
            "overhead of ComfyUI's sampler stack (ratio = nodes/core, target ≤ 1.2)")
    return rows


def _comfy_plan(bridge_sampling, model, conditioning, plan, guidance, timer):
    original = bridge_sampling.core_sampling.run_plan

    def run_plan(denoise, plan_, **kwargs):
        inner = kwargs.pop("callback", None)

        def callback(info):
            if inner is not None:
                inner(info)
            timer()
        return original(denoise, plan_, callback=callback, **kwargs)

    bridge_sampling.core_sampling.run_plan = run_plan
    try:
        bridge_sampling.run_plan_in_comfy(model, conditioning, plan, 0, guidance=guidance)
    finally:
        bridge_sampling.core_sampling.run_plan = original


# ------------------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--size", type=int, default=None, help="face size in px (default 64 on a CPU, 512 on CUDA)")
    ap.add_argument("--weights", choices=("tiny", "sd15"), default="tiny",
                    help="tiny: the tests' generated checkpoint; sd15: full-size SD1.5-shaped random weights")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned; default 1)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)}, or none (e.g. with --comfyui)")
    ap.add_argument("--comfyui", action="store_true", help="also measure the ComfyUI bridge (in-process ComfyUI)")
    ap.add_argument("--compile", choices=("off", "on", "auto"), default="off",
                    help="the optimised backend's compiled UNet step (CUDA only; off with a log line elsewhere)")
    ap.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                    help="the optimised backend's UNet step as CUDA graphs (CUDA only; the reference never)")
    ap.add_argument("--warmup", type=int, default=2, help="loop steps dropped before timing (default 2)")
    ap.add_argument("--msi-steps", type=int, default=6, help="MSI steps timed per variant (default 6)")
    ap.add_argument("--loop-steps", type=int, default=5, help="inversion/guided steps timed per variant")
    ap.add_argument("--rounds", type=int, default=2,
                    help="reference and optimised runs alternate this many times per component (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the one-off timings (--comfyui)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="presets of the e2e section")
    ap.add_argument("--plumbing", action="store_true",
                    help="cut every preset of e2e/faces to 2 MSI steps, 4 inversion steps and a 4-step grid: a "
                         "check that the script runs (results are marked plumbing), not a measurement")
    ap.add_argument("--faces", default="1,2,4,8")
    ap.add_argument("--faces-preset", choices=PRESETS, default="fast")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    args.size = args.size or (512 if args.device.startswith("cuda") else 64)
    if args.sections is None:
        slow_e2e = args.weights == "sd15" and not args.device.startswith("cuda")
        args.sections = [s for s in SECTIONS if not (slow_e2e and s in ("e2e", "faces"))]
    else:
        args.sections = [s for s in args.sections.split(",") if s and s != "none"]
        unknown = set(args.sections) - set(SECTIONS)
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.presets = [p for p in args.presets.split(",") if p]
    args.faces = [int(n) for n in args.faces.split(",") if n]
    args.batches = [int(n) for n in args.batches.split(",") if n]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but this torch sees no CUDA device", file=sys.stderr)
        return 2
    header = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "size": args.size, "weights": args.weights, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "warmup": args.warmup, "rounds": args.rounds, "sections": args.sections, "compile": args.compile,
              "cuda_graphs": args.cuda_graphs,
              "plumbing": args.plumbing}
    print("benchmark " + json.dumps(header), flush=True)
    results: dict[str, Any] = {"config": header}
    started = time.perf_counter()
    if set(args.sections) & set(SECTIONS):
        ctx = build_context(args)
        for section, fn in (("components", components), ("e2e", end_to_end), ("batch", batch_scaling),
                            ("faces", faces_scaling)):
            if section in args.sections:
                print(f"[{section}]", flush=True)
                results[section] = fn(ctx)
        if ctx.optimised is not ctx.reference:  # after the runs: a switch that failed on the way says so
            results["config"]["optimised_backend"] = {"dtype": str(ctx.optimised.dtype),
                                                      "compile": ctx.optimised._unet_call.reason,
                                                      "cuda_graphs": ctx.optimised.cuda_graphs_status}
            print("optimised backend " + json.dumps(results["config"]["optimised_backend"]), flush=True)
    if args.comfyui:
        print("[comfyui]", flush=True)
        results["comfyui"] = comfyui_section(args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"done in {results['seconds']} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
