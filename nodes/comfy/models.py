"""ComfyUI's models as the core sees them: devices, memory, loading, fingerprints, VAE and latent scaling.

Latent scaling is done here and nowhere else. A ComfyUI LATENT dict holds *unscaled* VAE latents
(``{"samples": [B,4,h,w]}``); the core works on *scaled* SD latents (core/backend.py). The conversion is
the model's latent format (``process_in`` / ``process_out``, docs/comfyui-internals.md §2.1); nodes without
a MODEL input (the key nodes) use ComfyUI's SD1.x format, since keys belong to SD1.x checkpoints.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

import comfy.latent_formats
import comfy.lora
import comfy.model_management as mm
import comfy.model_sampling

from ...core.diffusion import LATENT_SCALE
from ...core.errors import IncompatibleWeightsError, UnsupportedModelError
from ...core.fingerprint import unet_fingerprint
from ...core.model_family import EDIT_CHANNELS, INPAINT_CHANNELS, TXT2IMG_CHANNELS, ModelFamily, check_supported


# ----------------------------------------------------------------------------------- devices, memory
def torch_device() -> torch.device:
    """ComfyUI's compute device (never a hard-coded "cuda")."""
    return mm.get_torch_device()


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, LATENT) are returned."""
    return mm.intermediate_device()


def load_models(*patchers) -> None:
    """Load ModelPatchers (MODEL, ``vae.patcher``, ``clip.patcher``…) onto the device; None entries are skipped.
    May evict other models."""
    mm.load_models_gpu([p for p in patchers if p is not None])


def free_memory(device: torch.device) -> int:
    """Bytes ComfyUI considers free on ``device`` (``model_management.get_free_memory``: the driver's free memory
    plus PyTorch's unused cache on CUDA, available RAM on a CPU)."""
    return int(mm.get_free_memory(device))


#: ComfyUI's Cancel: raised from inside model calls once the user pressed Cancel (it clears the flag)
InterruptProcessingException = mm.InterruptProcessingException


def compute_dtype(base) -> torch.dtype | None:
    """The dtype a ComfyUI ``BaseModel`` runs its UNet in: its manual-cast dtype when it has one, else its
    weights' dtype (None when the model says neither)."""
    cast = getattr(base, "manual_cast_dtype", None)
    if cast is not None:
        return cast
    get_dtype = getattr(base, "get_dtype", None)
    return get_dtype() if callable(get_dtype) else None


def release_memory() -> None:
    """Release cached device memory at the end of a heavy node."""
    mm.soft_empty_cache()


def to_compute_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move an auxiliary module (face recognizer, not a ModelPatcher) to the compute device, freeing memory for
    it first."""
    device = torch_device()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    mm.free_memory(size * 2, device)
    return module.to(device)


# --------------------------------------------------------------------------------------- model facts
def model_sampling(model):
    """The MODEL's ``model_sampling`` object (σ table, σ_max, noise scaling), honouring object patches."""
    return model.get_model_object("model_sampling")


def unet(model) -> torch.nn.Module:
    """The MODEL's UNet module (``BaseModel.diffusion_model``)."""
    return model.model.diffusion_model


# ------------------------------------------------------------------------------------- model family
#: ComfyUI's model configurations (class names in comfy/supported_models.py) → ``core.model_family`` keys. A
#: configuration not listed takes its nearest listed base class (SSD1B and the KOALA models → SDXL); one with none
#: is "dit" for transformer-based models and "unknown" otherwise.
COMFY_FAMILIES = {
    "SD15": "sd1", "SD15_instructpix2pix": "sd1-edit",
    "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SD_X4Upscaler": "sd2", "LotusD": "sd2",
    "SDXL": "sdxl", "SDXLRefiner": "sdxl-refiner", "SDXL_instructpix2pix": "sdxl",
    "SD3": "sd3", "Flux": "flux", "Chroma": "flux",
    "SVD_img2vid": "video", "Stable_Zero123": "sd1-other",
}
#: BaseModel attribute caching ``(family key, evidence)`` of its configuration (it never changes once loaded)
FAMILY_CACHE_ATTRIBUTE = "_diff_privacy_family"
#: what an SD 1.x VAE's latents have
SD1_LATENT_CHANNELS = 4


def _configuration_family(base) -> tuple[str, str]:
    """(family key, evidence) of a BaseModel from ComfyUI's own detection: its configuration class and UNet
    input channels."""
    config = getattr(base, "model_config", None)
    name = type(config).__name__
    key = next((COMFY_FAMILIES[c.__name__] for c in type(config).__mro__ if c.__name__ in COMFY_FAMILIES), None)
    unet_config = getattr(config, "unet_config", None) or {}
    if key is None:
        key = "unknown" if "model_channels" in unet_config else "dit"
    in_channels = unet_config.get("in_channels", TXT2IMG_CHANNELS)
    evidence = f"ComfyUI loaded it as {name}"
    if in_channels != TXT2IMG_CHANNELS and "model_channels" in unet_config:  # a UNet with extra input channels
        variant = {INPAINT_CHANNELS: " (inpainting)", EDIT_CHANNELS: " (instruct-pix2pix)"}.get(in_channels, "")
        evidence += f" with a UNet taking {in_channels} input channels{variant}"
        if key == "sd1":
            key = {INPAINT_CHANNELS: "sd1-inpaint", EDIT_CHANNELS: "sd1-edit"}.get(in_channels, "sd1-other")
    return key, evidence


def _prediction(sampling) -> str:
    """What the model's sampling object predicts: "eps", "v", "edm", "x0", "flow" or "other"."""
    ms = comfy.model_sampling
    for cls, name in ((ms.EDM, "edm"), (ms.V_PREDICTION, "v"), (ms.X0, "x0"), (ms.EPS, "eps"), (ms.CONST, "flow")):
        if isinstance(sampling, cls):
            return name
    return "other"


def model_family(model) -> ModelFamily:
    """The ``core.model_family`` family of a MODEL: ComfyUI's detected configuration (cached on the BaseModel) and,
    for SD 1.x, the prediction type it samples with now (a ModelSamplingDiscrete node can switch an SD 1.x MODEL to
    v-prediction, so that part is read on every call; it is an attribute lookup)."""
    base = model.model
    cached = base.__dict__.get(FAMILY_CACHE_ATTRIBUTE)
    if cached is None:
        cached = base.__dict__[FAMILY_CACHE_ATTRIBUTE] = _configuration_family(base)
    key, evidence = cached
    if key == "sd1":
        prediction = _prediction(model_sampling(model))
        if prediction != "eps":
            key, evidence = ("sd1-v" if prediction == "v" else "sd1-other"), f"it samples with {prediction} prediction"
    return ModelFamily(key, evidence)


def check_model(model, node: str, input_name: str = "model") -> None:
    """Refuse a MODEL that is not SD 1.x ε-prediction text-to-image, before any work (cheap).

    Raises:
        UnsupportedModelError: naming ``node``, its input, the family found and what to load instead.
    """
    check_supported(model_family(model), f"{node}: the MODEL at its '{input_name}' input")


def check_vae(vae, node: str, input_name: str = "vae") -> None:
    """Refuse a VAE without weights (what Load Checkpoint outputs for a checkpoint saved without one) or one that
    makes other than 4-channel latents (SD3/Flux VAEs), before any work.

    Raises:
        IncompatibleWeightsError: no weights. UnsupportedModelError: another latent width. Both name ``node``,
            the input and what to connect instead.
    """
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise IncompatibleWeightsError(
            f"{node}: the VAE at its '{input_name}' input holds no weights: the checkpoint was saved without a VAE. "
            f"Add a Load VAE node with an SD 1.x VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors) and connect "
            f"it to '{input_name}'.")
    channels = int(getattr(vae, "latent_channels", SD1_LATENT_CHANNELS))
    if channels != SD1_LATENT_CHANNELS:
        raise UnsupportedModelError(
            f"{node}: the VAE at its '{input_name}' input makes {channels}-channel latents (an SD3/Flux-style VAE); "
            f"SD 1.x uses {SD1_LATENT_CHANNELS}. Connect the VAE of the SD 1.x checkpoint (or an SD 1.x VAE from "
            f"Load VAE).", family="unknown")


def check_guidance_vae(vae, node: str, input_name: str = "guidance_vae") -> None:
    """:func:`check_vae`, and for a tiny autoencoder (ComfyUI's TAESD module, which carries the latent space it
    decodes as ``vae_scale``/``vae_shift``, set by Load VAE per model) that it is SD 1.x's: scale 0.18215,
    shift 0 — Load VAE's "taesd", not taesdxl (0.13025), taesd3 or taef1, which also make 4-channel latents.

    Raises:
        UnsupportedModelError: naming ``node``, the input, the scale found and what to pick instead.
    """
    check_vae(vae, node, input_name)
    module = vae.first_stage_model
    scale, shift = getattr(module, "vae_scale", None), getattr(module, "vae_shift", None)
    if isinstance(scale, torch.Tensor) and (abs(float(scale) - LATENT_SCALE) > 1e-4
                                            or (isinstance(shift, torch.Tensor) and abs(float(shift)) > 1e-4)):
        raise UnsupportedModelError(
            f"{node}: the VAE at its '{input_name}' input is a tiny autoencoder for other latents (scale "
            f"{float(scale):g}, e.g. taesdxl); SD 1.x needs 'taesd' (scale {LATENT_SCALE}). Pick 'taesd' in Load "
            f"VAE, or leave '{input_name}' unconnected.", family="unknown")


def check_clip(clip, node: str, input_name: str = "clip") -> None:
    """Refuse a missing text encoder (Load Checkpoint outputs none for a checkpoint saved without one).

    Raises:
        IncompatibleWeightsError: naming ``node``, the input and what to connect instead.
    """
    if clip is None:
        raise IncompatibleWeightsError(
            f"{node}: no text encoder reaches its '{input_name}' input: the checkpoint was saved without one. Add a "
            f"Load CLIP node (type stable_diffusion) with SD 1.x's CLIP ViT-L/14 text encoder and connect it to "
            f"'{input_name}'.")


#: BaseModel attribute holding ``{patches_uuid: fingerprint}`` (one entry per set of weight patches)
FINGERPRINT_CACHE_ATTRIBUTE = "_diff_privacy_fingerprints"
#: at most this many fingerprints are kept per loaded checkpoint (the oldest are dropped first)
FINGERPRINT_CACHE_SIZE = 32
#: how the BaseModel (and ModelPatcher.patches) name the UNet's weights
UNET_KEY_PREFIX = "diffusion_model."
#: the precision weight patches are applied in for the fingerprint (see EffectiveUNetWeights)
PATCH_DTYPE = torch.float64
_ROUNDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EffectiveUNetWeights(Mapping):
    """The MODEL's UNet weights as it runs with them, one tensor at a time, in LDM names (no prefix).

    Each weight is the checkpoint's own (the copy ModelPatcher backed up, when a patched clone of the same
    model is loaded right now, so what is in the module may be someone else's patched weight) with this
    patcher's weight patches (LoRA, LyCORIS, model merges: ``ModelPatcher.patches``) applied with ComfyUI's own
    ``comfy.lora.calculate_weight``, as ``ModelPatcher.patch_weight_to_device`` does when it loads the model,
    then rounded to the weight's own dtype. The patch arithmetic runs on the CPU in float64 (ComfyUI uses
    float32 on the model's device): a LoRA's up·down product in float32 can differ in the last bit between
    BLAS libraries, CPUs and GPUs, which would give the same checkpoint and LoRA another id on another machine;
    computed in float64 and rounded once, the weights are the correctly rounded ones everywhere (bit for bit
    ComfyUI's own for a 'diff' patch at strength 1). The result does not depend on whether, where or how
    (low-VRAM on-the-fly patching included) the model is loaded. Weight *wrappers* (``add_weight_wrapper``,
    e.g. the pack's own identity clones for autograd) and hook keyframes are not weight changes and are not
    applied.
    """

    def __init__(self, model):
        self._patcher = model
        self._current = unet(model).state_dict()

    def __len__(self) -> int:
        return len(self._current)

    def __iter__(self):
        return iter(self._current)

    def __getitem__(self, name: str) -> torch.Tensor:
        key = UNET_KEY_PREFIX + name
        weight = self._current[name]
        backup = getattr(self._patcher, "backup", {}).get(key)
        if backup is not None:
            weight = backup.weight
        hook_backup = getattr(self._patcher, "hook_backup", {}).get(key)
        if hook_backup is not None:
            weight = hook_backup[0]
        patches = self._patcher.patches.get(key)
        if not patches or not weight.is_floating_point():
            return weight
        work = weight.detach().to("cpu", PATCH_DTYPE, copy=True)
        patched = comfy.lora.calculate_weight(patches, work, key, intermediate_dtype=PATCH_DTYPE)
        return patched.to(weight.dtype if weight.dtype in _ROUNDING_DTYPES else torch.float32)


def model_fingerprint(model) -> str:
    """core.fingerprint's id of the UNet weights the MODEL runs with (:class:`EffectiveUNetWeights`): the
    checkpoint's weights with every weight patch (LoRA …) of this ModelPatcher applied, so a LoRA on any UNet
    layer gives another id, and an unpatched MODEL gives the id the diffusers backend gives for the same file.

    Hashing every weight is costly (~860 M parameters for SD1.5), so the id is computed once per checkpoint and
    set of patches: it is cached on the shared BaseModel under the patcher's ``patches_uuid``, which ComfyUI
    renews whenever patches are added (clones share it until then).

    Raises:
        IncompatibleWeightsError: the UNet has no floating-point weights.
    """
    base = model.model
    cache = base.__dict__.get(FINGERPRINT_CACHE_ATTRIBUTE)
    if cache is None:
        cache = base.__dict__[FINGERPRINT_CACHE_ATTRIBUTE] = {}
    key = str(model.patches_uuid)
    if key not in cache:
        fingerprint = unet_fingerprint(EffectiveUNetWeights(model))
        while len(cache) >= FINGERPRINT_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = fingerprint
    return cache[key]


# ---------------------------------------------------------------------------------- latent scaling
def latent_format(model=None):
    """The latent format that scales ``model``'s latents; ComfyUI's SD1.x format (``latent_formats.SD15``)
    when ``model`` is None (nodes without a MODEL input)."""
    if model is None:
        return comfy.latent_formats.SD15()
    return model.get_model_object("latent_format")


def scale_latent(model, samples: torch.Tensor) -> torch.Tensor:
    """Unscaled VAE latent [B,4,h,w] → scaled SD latent (same shape, device and dtype)."""
    return latent_format(model).process_in(samples)


def unscale_latent(model, z: torch.Tensor) -> torch.Tensor:
    """Scaled SD latent [B,4,h,w] → unscaled VAE latent (same shape, device and dtype); differentiable."""
    return latent_format(model).process_out(z)


def to_scaled_latent(model, latent: dict) -> torch.Tensor:
    """ComfyUI LATENT dict → scaled latent [B,4,h,w] float32 on the compute device.

    ``model`` None uses the SD1.x format (see :func:`latent_format`).
    """
    return scale_latent(model, latent["samples"].to(torch_device(), torch.float32))


def to_comfy_latent(model, z: torch.Tensor) -> dict:
    """Scaled latent [B,4,h,w] → ComfyUI LATENT dict (unscaled float32 samples on the intermediate device).

    ``model`` None uses the SD1.x format (see :func:`latent_format`).
    """
    return {"samples": unscale_latent(model, z.float()).to(intermediate_device())}


# ---------------------------------------------------------------------------------------------- VAE
def encode_image(vae, model, image_bhwc: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,3] in [0,1] → scaled latent [B,4,H/8,W/8] float32 on the compute device (ComfyUI's own
    VAE encode, no gradients)."""
    z = vae.encode(image_bhwc[..., :3])
    return scale_latent(model, z.to(torch_device(), torch.float32))


def decode_to_images(vae, latent_samples: torch.Tensor) -> torch.Tensor:
    """Unscaled latent ``LATENT["samples"]`` → IMAGE [B,H,W,3] in [0,1] (ComfyUI's own decode, no gradients)."""
    images = vae.decode(latent_samples)
    if images.dim() == 5:  # some VAEs return [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images
