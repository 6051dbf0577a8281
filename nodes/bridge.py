"""The one module that touches ComfyUI internals (``comfy.*``, ``folder_paths``, ``latent_preview``).

Everything else in ``nodes/`` converts ComfyUI types and calls ``core/``; when a ComfyUI update changes an
internal API, this file is the one to fix. Tested against ComfyUI 0.3.75.

Autograd inside ComfyUI: the executor runs every node under ``torch.inference_mode()``, so checkpoint
weights, latents, conditionings and sigmas are inference tensors. Gradients therefore need (1) modules whose
weights are normal tensors — private copies made under ``inference_mode(False)`` for the VAE decoder and the
text encoder, weight wrappers that clone each weight for the UNet — and (2) clones of every incoming tensor
that an op saves for backward. See docs/comfyui-internals.md §2.5.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time
from typing import Callable

import torch
import torch.utils.checkpoint

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_execution.utils import get_executing_context
from server import PromptServer

from ..core import diffusion
from ..core.errors import WeightsNotFoundError
from ..core.autograd import normal_tensors, prepare_for_autograd
from ..core.fingerprint import unet_fingerprint
from ..core.text_encoder import CLIPTextEncoder, PlaceholderConditioner

RECOGNIZER_FOLDER = "face_recognition"
KEYS_FOLDER = "diff_privacy_keys"
KNOWN_RECOGNIZER_FILES = {
    "facenet": "20180402-114759-vggface2.pt",
    "arcface": "model_ir_se50.pth",
}


# ----------------------------------------------------------------------------------------- files
def register_folders() -> None:
    """Register the pack's model folders without clobbering paths a user set in extra_model_paths.yaml."""
    exts = set(folder_paths.supported_pt_extensions)
    if RECOGNIZER_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER]
    else:
        paths = [os.path.join(folder_paths.models_dir, RECOGNIZER_FOLDER)]
    folder_paths.folder_names_and_paths[RECOGNIZER_FOLDER] = (paths, exts)
    if KEYS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[KEYS_FOLDER] = (
            [keys_directory()], {".dpkey"})


def keys_directory() -> str:
    return os.path.join(folder_paths.get_output_directory(), KEYS_FOLDER)


def list_recognizer_files() -> list[str]:
    return folder_paths.get_filename_list(RECOGNIZER_FOLDER)


def list_key_files() -> list[str]:
    directory = keys_directory()
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.endswith(".dpkey"))


def recognizer_folders() -> list[str]:
    return list(folder_paths.get_folder_paths(RECOGNIZER_FOLDER))


def missing_recognizer_message(name: str) -> str:
    folders = ", ".join(recognizer_folders()) or os.path.join(folder_paths.models_dir, RECOGNIZER_FOLDER)
    return (f"Face recognizer weights {name!r} not found. Put the file into ComfyUI's models folder "
            f"'{RECOGNIZER_FOLDER}' ({folders}): FaceNet VGGFace2 as '{KNOWN_RECOGNIZER_FILES['facenet']}' "
            f"and/or ArcFace IR-SE50 as '{KNOWN_RECOGNIZER_FILES['arcface']}' (see the pack README), "
            f"then press R in ComfyUI to refresh the list.")


def recognizer_path(name: str) -> str:
    path = folder_paths.get_full_path(RECOGNIZER_FOLDER, name) if name else None
    if path is None or not os.path.isfile(path):
        raise WeightsNotFoundError(missing_recognizer_message(name))
    return path


def key_file_path(name: str) -> str:
    """Resolve a key file name (inside the keys folder) or an absolute path."""
    if os.path.isabs(name):
        return name
    return os.path.join(keys_directory(), name)


# ------------------------------------------------------------------------------ devices, progress
def torch_device() -> torch.device:
    return mm.get_torch_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int, label: str = "") -> Callable[[int, int, dict], None]:
    """A ``progress(step, total, info)`` callback driving ComfyUI's progress bar; when ``info`` carries a
    ``loss`` it is also shown as the node's progress text (at most about once a second)."""
    bar = comfy.utils.ProgressBar(total)
    context = get_executing_context()
    node_id = getattr(context, "node_id", None)
    last_text = [0.0]

    def progress(step: int, total_steps: int, info: dict | None = None) -> None:
        bar.update_absolute(step, total_steps)
        loss = (info or {}).get("loss")
        now = time.monotonic()
        if loss is not None and node_id is not None and (now - last_text[0] > 1.0 or step == total_steps):
            last_text[0] = now
            server = getattr(PromptServer, "instance", None)
            if server is not None and hasattr(server, "send_progress_text"):
                server.send_progress_text(f"{label}step {step}/{total_steps} · loss {float(loss):.4f}", node_id)
    return progress


def release_memory() -> None:
    mm.soft_empty_cache()


def load_models(*patchers) -> None:
    mm.load_models_gpu([p for p in patchers if p is not None])


def to_compute_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move an auxiliary module (face recognizer) to the compute device, freeing memory for it first."""
    device = torch_device()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    mm.free_memory(size * 2, device)
    return module.to(device)


# ------------------------------------------------------------------------------- autograd helpers
def private_copy(module: torch.nn.Module, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A gradient-ready copy of a ComfyUI module: normal (non-inference) weights, frozen, eval mode."""
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)
        prepare_for_autograd(twin)
        twin.requires_grad_(False).eval()
        if device is not None or dtype is not None:
            twin = twin.to(device=device, dtype=dtype)
    return twin


def _clone_weight(w: torch.Tensor) -> torch.Tensor:
    return w.clone()


def grad_ready_model(model):
    """Clone a MODEL patcher so the UNet can be differentiated through (weights reach ops as clones)."""
    m = model.clone()
    for name, module in m.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        if getattr(module, "weight", None) is not None:
            m.add_weight_wrapper(f"{name}.weight", _clone_weight)
        if getattr(module, "bias", None) is not None:
            m.add_weight_wrapper(f"{name}.bias", _clone_weight)
    return m


# ------------------------------------------------------------------------------------- VAE / latents
def encode_image(vae, model, image_bhwc: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,3] in [0,1] → scaled latent (× 0.18215) [B,4,H/8,W/8] float32 on the compute device."""
    z = vae.encode(image_bhwc[..., :3])
    return model.model.process_latent_in(z.to(torch_device(), torch.float32))


def scaled_to_comfy_latent(model, z: torch.Tensor) -> dict:
    """Scaled latent → ComfyUI LATENT dict (unscaled samples on the intermediate device)."""
    return {"samples": model.model.process_latent_out(z.float()).to(intermediate_device())}


def comfy_latent_to_scaled(model, latent: dict) -> torch.Tensor:
    return model.model.process_latent_in(latent["samples"].to(torch_device(), torch.float32))


def decode_to_images(vae, latent_samples: torch.Tensor) -> torch.Tensor:
    """Unscaled latent → IMAGE [B,H,W,3] in [0,1] (ComfyUI's own decode, no gradients)."""
    images = vae.decode(latent_samples)
    if images.dim() == 5:  # some VAEs return [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images


class DifferentiableDecoder:
    """Scaled latent [B,4,h,w] → image [B,3,H,W] in ≈[−1,1], float32, differentiable, unclamped.

    Runs a private copy of ComfyUI's VAE model (normal weights) on the compute device. ``dtype`` None keeps
    ComfyUI's VAE dtype; float32 is the safe choice for the backward pass in fp16 setups.
    """

    def __init__(self, vae, model, dtype: torch.dtype | None = None):
        load_models(vae.patcher)
        self.dtype = dtype or vae.vae_dtype
        self.module = private_copy(vae.first_stage_model, torch_device(), self.dtype)
        self.latent_out = model.model.process_latent_out

    def __call__(self, z_scaled: torch.Tensor) -> torch.Tensor:
        z = self.latent_out(z_scaled).to(self.dtype)
        return self.module.decode(z).float()


# -------------------------------------------------------------------------------- text / vision
def clip_prompt_ids(clip, text: str) -> torch.Tensor:
    """Token ids [77] of ``text`` exactly as ComfyUI's SD1 tokenizer produces them (BOS, tokens, EOS, pad)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return torch.tensor([int(t[0]) for t in tokens[key][0]], dtype=torch.long)


def hf_text_model_state(clip) -> dict[str, torch.Tensor]:
    """The SD1 CLIP-L text encoder's state dict in Hugging Face names (ComfyUI keeps the HF layout)."""
    load_models(clip.patcher)
    encoder = clip.cond_stage_model
    inner = getattr(encoder, "clip_l", encoder)
    return {k: v for k, v in inner.transformer.state_dict().items()}


def clip_vision_hidden_states(clip_vision, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """HF-convention hidden states (index 0 = embeddings, i = after layer i) of ComfyUI's CLIP_VISION model."""
    load_models(clip_vision.patcher)
    vision = clip_vision.model.vision_model if hasattr(clip_vision.model, "vision_model") else clip_vision.model
    device = clip_vision.load_device
    dtype = clip_vision.dtype
    pixels = pixel_values.to(device, dtype)
    embeds = vision.pre_layrnorm(vision.embeddings(pixels))
    _, stacked, _ = vision(pixels, intermediate_output="all")
    return [embeds.float()] + [stacked[:, i].float() for i in range(stacked.shape[1])]


# -------------------------------------------------------------------------------- sampling
def model_sampling(model):
    return model.get_model_object("model_sampling")


def with_timestep_range(conditioning: list, start: float, end: float) -> list:
    """Copy of a CONDITIONING with start/end percent set on every entry (ConditioningSetTimestepRange)."""
    out = []
    for tensor, extras in conditioning:
        extras = dict(extras)
        extras["start_percent"] = float(start)
        extras["end_percent"] = float(end)
        out.append([tensor, extras])
    return out


def start_noise(model, x_sigma: torch.Tensor, sigma0: float) -> torch.Tensor:
    """The NOISE for which KSAMPLER's start over an empty latent (``noise_scaling``) is exactly ``x_sigma``:
    ComfyUI multiplies by σ₀, or by √(1+σ₀²) when σ₀ reaches the model's σ_max ("max denoise")."""
    sigma_max = float(model_sampling(model).sigma_max)
    at_max = math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max
    return (x_sigma / (math.sqrt(1.0 + sigma0 * sigma0) if at_max else sigma0)).float()


class PrivacyGuider(comfy.samplers.CFGGuider):
    """A GUIDER with one scheduled conditioning (CFG 1, as the official method) and optional identity
    guidance applied as an x̂₀ correction, so it also works with core ``SamplerCustomAdvanced`` and any sampler.

    For an Euler/DDIM step σ → σ', shifting x̂₀ by δ moves x' by δ·(1 − σ'/σ); δ is chosen so the step equals
    the official update x'_VP −= ρ(t)·g, i.e. δ = −ρ·g·√(1+σ'²)/(1 − σ'/σ).
    """

    def __init__(self, model_patcher, conditioning, guidance_factory=None):
        super().__init__(model_patcher)
        self.inner_set_conds({"positive": conditioning})
        self.guidance_factory = guidance_factory
        self._guidance = None
        self._host_sigmas: tuple = (None, [])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        denoised = super().predict_noise(x, timestep, model_options, seed)
        if self.guidance_factory is None:
            return denoised
        if self._guidance is None:
            self._guidance = self.guidance_factory()
        sigma = float(timestep.flatten()[0])
        rho = self._guidance.step_size(diffusion.timestep_from_sigma(sigma))
        if rho <= 0:
            return denoised
        sigma_next = self._next_sigma(model_options.get("transformer_options", {}).get("sample_sigmas"), sigma)
        g, _ = self._guidance.gradient(denoised)
        shrink = 1.0 - sigma_next / sigma if sigma > 0 else 1.0
        factor = rho * math.sqrt(1.0 + sigma_next ** 2) / max(shrink, 1e-3)
        return denoised - factor * g.to(denoised.dtype)

    def _next_sigma(self, sigmas, sigma: float) -> float:
        """The σ after ``sigma`` in the run's schedule (copied to the host once per run); 0 when unknown."""
        if sigmas is None:
            return 0.0
        if self._host_sigmas[0] is not sigmas:
            self._host_sigmas = (sigmas, [float(s) for s in sigmas.flatten().cpu()])
        values = self._host_sigmas[1]
        for a, b in zip(values, values[1:]):
            if abs(a - sigma) <= 1e-4 * max(1.0, a):
                return b
        return 0.0


def guided_ddim_sampler(run_loop: Callable) -> comfy.samplers.KSAMPLER:
    """Wrap ``run_loop(denoise, x, sigmas, callback)`` (the core σ-space loop) as a ComfyUI SAMPLER."""

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_sigma, sigma, t):
            with torch.inference_mode(False):
                s = (s_in * float(sigma)).clone()
            return model(x_sigma, s, **extra_args)

        def step_callback(info):
            if callback is not None:
                callback({"i": info["i"], "denoised": info["denoised"], "x": info["x"],
                          "sigma": info["sigma"], "sigma_hat": info["sigma"]})
        return run_loop(denoise, x, sigmas, step_callback)

    return comfy.samplers.KSAMPLER(sample)


def run_guider(guider, noise: torch.Tensor, latent_samples: torch.Tensor, sampler, sigmas: torch.Tensor,
               seed: int, preview_steps: int, denoise_mask=None) -> torch.Tensor:
    """``guider.sample`` with ComfyUI's latent preview + progress bar; returns unscaled latents."""
    callback = latent_preview.prepare_callback(guider.model_patcher, preview_steps)
    latent_samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_samples)
    out = guider.sample(noise, latent_samples, sampler, sigmas, denoise_mask=denoise_mask, callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(intermediate_device())


def _checkpointed(forward, *args, **kwargs):
    """Run a UNet block under activation checkpointing when a backward pass will follow."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class ComfyTextConditioner:
    """Stage-token conditioning through a private, differentiable copy of the CLIP-L text encoder."""

    def __init__(self, clip, device: torch.device):
        self.clip = clip
        encoder = CLIPTextEncoder.from_state_dict(hf_text_model_state(clip)).to(device)
        self.placeholder = PlaceholderConditioner(encoder, clip_prompt_ids(clip, "*"), position=1)

    def encode_stage_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.placeholder(tokens)

    def token_embedding(self, word: str) -> torch.Tensor:
        return self.placeholder.token_embedding(int(clip_prompt_ids(self.clip, word)[1]))


class ComfyVisionEncoder:
    """core.backend.VisionEncoder on ComfyUI's CLIP_VISION (CLIPVisionLoader)."""

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision
        self.device = clip_vision.load_device

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return clip_vision_hidden_states(self.clip_vision, pixel_values)


# ------------------------------------------------------------------------------------- backend
class ComfyBackend:
    """core.backend.DiffusionBackend on ComfyUI's MODEL, CLIP and VAE (SD1.x).

    ``predict_eps`` runs the UNet through ``BaseModel.apply_model`` in σ space: x_σ = z_t·√(1+σ²) and
    ε̂ = (x_σ − x̂₀)/σ. ``trainable=True`` routes UNet weights through clone wrappers so gradients reach the
    conditioning (MSI training); the text encoder and VAE decoder are private gradient-ready copies.
    """

    def __init__(self, model, clip, vae, *, trainable: bool = False):
        self.trainable = trainable
        self.model = grad_ready_model(model) if trainable else model
        self.clip = clip
        self.vae = vae
        load_models(self.model)
        self.device = torch_device()
        self.base = self.model.model
        # ComfyUI never trains the base model but leaves requires_grad on; with autograd on (MSI) that would
        # make every UNet weight a gradient target (and save the inference-mode conditioning for backward)
        self.base.requires_grad_(False)
        # the conditioning width is what the UNet's cross-attention keys read (768 for SD1.x)
        self.token_dim = next(int(m.weight.shape[1]) for name, m in self.base.diffusion_model.named_modules()
                              if name.endswith("attn2.to_k"))
        self._decoder = None
        self._text = None
        self.gradient_checkpointing = False
        self._null = None
        sig = diffusion.sigma_table().to(torch.float32)
        self._sigmas = sig.to(self.device)

    # diffusion
    def predict_eps(self, z_t, t, cond):
        if not self.trainable:  # plain inference: stay in the caller's (inference) mode
            return self._eps(z_t, t, cond)
        # loading the VAE/CLIP under memory pressure can unload the UNet, which drops the weight wrappers
        # (the weights would then reach autograd as inference tensors); reloading re-applies them
        load_models(self.model)
        with torch.inference_mode(False):
            return self._eps(z_t, t, cond)

    def _eps(self, z_t, t, cond):
        sigma = self._sigmas[t.long().to(self.device)].clone()
        scale = (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        x_sigma = z_t * scale
        x0 = self.base.apply_model(x_sigma, sigma, c_crossattn=cond)
        return ((x_sigma - x0.float()) / sigma.view(-1, 1, 1, 1)).float()

    # MSI backpropagates through the UNet: checkpointing its blocks trades ~30 % compute for most of the
    # activation memory (what makes 512 px MSI fit on 8 GB cards). The wrappers are removed afterwards, since
    # ComfyUI shares these modules with every other node.
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        unet = self.base.diffusion_model
        blocks = [*unet.input_blocks, getattr(unet, "middle_block", None), *unet.output_blocks]
        for block in (b for b in blocks if b is not None):
            if enabled and "_dp_plain_forward" not in block.__dict__:
                block._dp_plain_forward = block.forward
                block.forward = functools.partial(_checkpointed, block._dp_plain_forward)
            elif not enabled and "_dp_plain_forward" in block.__dict__:
                block.forward = block.__dict__.pop("_dp_plain_forward")
        self.gradient_checkpointing = enabled

    def encode_image(self, image):
        bhwc = ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        return encode_image(self.vae, self.model, bhwc.to(intermediate_device()))

    def decode_latent(self, z):
        if self._decoder is None:
            self._decoder = DifferentiableDecoder(self.vae, self.model)
        return self._decoder(z)

    # text
    def _text_encoder(self):
        if self._text is None:
            self._text = ComfyTextConditioner(self.clip, self.device)
        return self._text

    def encode_stage_tokens(self, tokens):
        return self._text_encoder().encode_stage_tokens(tokens)

    def null_conditioning(self):
        if self._null is None:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(""))
            with torch.inference_mode(False):
                self._null = cond.float().clone().to(self.device)
        return self._null

    def token_embedding(self, word):
        return self._text_encoder().token_embedding(word)

    def model_fingerprint(self):
        return model_fingerprint(self.model)


def model_fingerprint(model) -> str:
    """core.fingerprint of the MODEL's UNet (the same id the diffusers backend gives for the same file)."""
    return unet_fingerprint(model.model.diffusion_model.state_dict())
