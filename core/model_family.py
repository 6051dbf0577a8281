"""Which kind of Stable Diffusion model a checkpoint holds, and a clear refusal for every kind but SD 1.x.

Diff-Privacy's keys, schedules and guidance are made for Stable Diffusion 1.x text-to-image models: an
ε-predicting UNet with 4 latent input channels, conditioned on the 768-wide CLIP ViT-L/14 text encoder. Other
models either fail deep inside the method with a shape error or, worse, run and give meaningless results, so
they are refused up front, before anything expensive, with a message naming the family found and what to load
instead. The CLI classifies a single-file checkpoint from its tensor names and shapes
(:func:`classify_state_dict`, which needs no tensor data); the nodes classify ComfyUI's MODEL through the bridge
(``nodes/comfy/models.py``), which maps ComfyUI's own model detection onto the same :data:`FAMILIES`.

What the state-dict classifier reads (the LDM single-file layout: UNet under ``model.diffusion_model.``, VAE
under ``first_stage_model.``, text encoder under ``cond_stage_model.`` or ``conditioner.embedders.``):

* transformer models by their block names: ``double_blocks.*``/``single_blocks.*`` (Flux, Chroma),
  ``joint_blocks.*`` (SD3 MMDiT), other DiT layouts;
* an LDM UNet by ``input_blocks.0.0.weight`` [C, in_channels, 3, 3]; its cross-attention width from the first
  ``attn2.to_k.weight`` [C, context]: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 SDXL refiner; ``label_emb.*``
  (class/size conditioning: SDXL 2816, SDXL refiner 2560, SD 2.x unCLIP); ``time_stack`` blocks (video);
* in_channels 4 text-to-image, 9 inpainting (latent + mask + masked image), 8 instruct-pix2pix (latent + image),
  5 SD 2 depth, 7 SD 2 x4 upscaler; a ``v_pred`` marker tensor (ComfyUI writes it into v-prediction SD files);
* files that are no checkpoint at all: a UNet alone, a LoRA, a VAE, a text encoder, a textual-inversion
  embedding.

Missing parts of an SD 1.x checkpoint (no VAE, no text encoder) are not a family question: the loaders report
them after this check (``core.diffusers_backend``), so an SDXL file is never told it "has no CLIP text encoder".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
#: Cross-attention (text conditioning) width of each UNet family.
SD1_CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024
SDXL_CONTEXT_DIM = 2048
SDXL_REFINER_CONTEXT_DIM = 1280
#: ``label_emb`` input width (pooled text + size/crop embeddings) of SDXL base and refiner.
SDXL_ADM_CHANNELS = 2816
SDXL_REFINER_ADM_CHANNELS = 2560
#: UNet input channels of text-to-image (latent only), inpainting and instruct-pix2pix models.
TXT2IMG_CHANNELS = 4
INPAINT_CHANNELS = 9
EDIT_CHANNELS = 8
#: UNet input channels of SD 2's depth-conditioned and x4-upscaler models.
SD2_DEPTH_CHANNELS = 5
SD2_UPSCALER_CHANNELS = 7
#: What to load instead, in every refusal.
WHAT_WORKS = ("Diff-Privacy works with Stable Diffusion 1.x text-to-image checkpoints (ε-prediction, 4 latent input "
              "channels, the CLIP ViT-L/14 text encoder), such as v1-5-pruned-emaonly.safetensors or a fine-tune "
              "of SD 1.5")


@dataclass(frozen=True)
class FamilyInfo:
    """A model family: its display name (with article), whether the method supports it, and specific advice."""

    name: str
    supported: bool
    advice: str = ""


#: Every family the classifiers can report, keyed by a short id.
FAMILIES: dict[str, FamilyInfo] = {
    "sd1": FamilyInfo("a Stable Diffusion 1.x text-to-image model", True),
    "sd1-inpaint": FamilyInfo(
        "a Stable Diffusion 1.x inpainting model", False,
        "Inpainting UNets take the mask and the masked image as extra input channels, which the method does not "
        "provide. Load the plain text-to-image version of the model instead (fine-tunes usually come as a normal "
        "and an -inpainting file)."),
    "sd1-edit": FamilyInfo(
        "a Stable Diffusion 1.x instruct-pix2pix (image editing) model", False,
        "Its UNet takes the input image as extra channels. Load a plain SD 1.x text-to-image checkpoint instead."),
    "sd1-v": FamilyInfo(
        "a Stable Diffusion 1.x v-prediction fine-tune", False,
        "It predicts v instead of the noise ε that the method's DDIM inversion and guidance are written for. Load "
        "an ε-prediction SD 1.x checkpoint instead."),
    "sd1-other": FamilyInfo(
        "an unusual Stable Diffusion 1.x variant", False,
        "Load a plain SD 1.x text-to-image checkpoint instead."),
    "sd2": FamilyInfo(
        "a Stable Diffusion 2.x model", False,
        "SD 2.x uses the OpenCLIP ViT-H text encoder (1024-wide conditioning) and its 768 px models predict v; "
        "the method's stage tokens and keys are made for SD 1.x's CLIP ViT-L/14. Load an SD 1.x checkpoint "
        "instead."),
    "sdxl": FamilyInfo(
        "a Stable Diffusion XL model", False,
        "SDXL has two text encoders (2048-wide conditioning) and size conditioning the method does not provide. "
        "Load an SD 1.x checkpoint instead."),
    "sdxl-refiner": FamilyInfo(
        "a Stable Diffusion XL refiner model", False,
        "The refiner only polishes SDXL outputs. Load an SD 1.x checkpoint instead."),
    "sd3": FamilyInfo(
        "a Stable Diffusion 3 (MMDiT, rectified flow) model", False,
        "SD3 is a transformer trained for flow matching with 16 latent channels, not a UNet predicting noise. "
        "Load an SD 1.x checkpoint instead."),
    "flux": FamilyInfo(
        "a Flux (or Chroma) model", False,
        "Flux is a transformer trained for flow matching with 16 latent channels and T5 text, not an SD 1.x UNet. "
        "Load an SD 1.x checkpoint instead."),
    "video": FamilyInfo(
        "a video diffusion model (Stable Video Diffusion or similar)", False,
        "Load an SD 1.x image checkpoint instead."),
    "dit": FamilyInfo(
        "a diffusion-transformer model (not a Stable Diffusion UNet)", False,
        "Load an SD 1.x checkpoint instead."),
    "unet-only": FamilyInfo(
        "a UNet on its own (a 'diffusion model' file, without VAE and text encoder)", False,
        "Use the single-file checkpoint it belongs to (UNet, VAE and text encoder in one file; ComfyUI's Load "
        "Checkpoint reads the same files)."),
    "lora": FamilyInfo(
        "a LoRA (or LyCORIS) adapter, not a checkpoint", False,
        "Give the base SD 1.x checkpoint here; in ComfyUI apply the LoRA to its MODEL with Load LoRA. Keys are "
        "tied to the weights the MODEL runs with, so recovery needs the same LoRA."),
    "vae": FamilyInfo(
        "a VAE on its own, not a checkpoint", False,
        "Give a full SD 1.x checkpoint here (in ComfyUI, a separate VAE file goes into Load VAE)."),
    "text-encoder": FamilyInfo(
        "a text encoder on its own, not a checkpoint", False,
        "Give a full SD 1.x checkpoint here."),
    "embedding": FamilyInfo(
        "a textual-inversion embedding, not a checkpoint", False,
        "Give a full SD 1.x checkpoint here."),
    "unknown": FamilyInfo(
        "not a Stable Diffusion checkpoint this pack recognises", False,
        "Give a full SD 1.x single-file checkpoint here."),
}


@dataclass(frozen=True)
class ModelFamily:
    """The result of a classification: ``key`` into :data:`FAMILIES` and the ``evidence`` it rests on, in words
    (e.g. "its UNet takes 9 input channels")."""

    key: str
    evidence: str = ""

    def __post_init__(self):
        if self.key not in FAMILIES:
            raise ValueError(f"unknown model family {self.key!r}; known: {sorted(FAMILIES)}")

    @property
    def info(self) -> FamilyInfo:
        return FAMILIES[self.key]

    @property
    def supported(self) -> bool:
        return self.info.supported

    def describe(self) -> str:
        """"a Stable Diffusion XL model (its UNet …)"."""
        return f"{self.info.name} ({self.evidence})" if self.evidence else self.info.name


def check_supported(family: ModelFamily, where: str) -> None:
    """Refuse every family but SD 1.x ε-prediction text-to-image.

    ``where`` names the model in the caller's terms and starts the message, e.g. ``"--checkpoint 'x.safetensors'"``
    or ``"MSI Invert: the MODEL at its 'model' input"``.

    Raises:
        UnsupportedModelError: "<where> is <family> (<evidence>). <what works>. <advice>", with ``family`` set.
    """
    if family.supported:
        return
    message = f"{where} is {family.describe()}. {WHAT_WORKS}."
    if family.info.advice:
        message += f" {family.info.advice}"
    raise UnsupportedModelError(message, family=family.key)


# ------------------------------------------------------------------------------------------ state dicts
def _shape(value: Any) -> tuple[int, ...]:
    """A tensor's (or a shape's) dimensions as a tuple of ints."""
    shape = getattr(value, "shape", value)
    return tuple(int(d) for d in shape)


_LORA = re.compile(r"(^|[._])(lora_(up|down|A|B)|hada_w|lokr_w|lora_mid)([._]|$)")
_DIT_MARKERS = ("joint_transformer_blocks.", "double_layers.", "single_layers.", "transformer_blocks.0.attn.",
                "blocks.0.cross_attn.", "blocks.0.attn1.", "layers.0.attention.", "x_embedder.")


def _strip(keys: list[str], prefix: str) -> list[str]:
    return [k[len(prefix):] for k in keys if k.startswith(prefix)]


def _unet_family(unet: Mapping[str, Any], keys: list[str], all_keys: set[str]) -> ModelFamily:
    """Family of an LDM UNet (``unet`` holds its tensors without prefix; ``all_keys`` the whole file's names)."""
    in_channels = _shape(unet["input_blocks.0.0.weight"])[1]
    to_k = next((k for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    context = _shape(unet[to_k])[1] if to_k is not None else None
    label = next((k for k in sorted(keys) if k.startswith("label_emb.") and k.endswith("weight")), None)
    adm = _shape(unet[label])[-1] if label is not None else None
    channels = f"its UNet takes {in_channels} input channels"
    if any(".time_stack." in k or ".time_mixer." in k for k in keys):
        return ModelFamily("video", "its UNet has temporal layers")
    if adm == SDXL_REFINER_ADM_CHANNELS or context == SDXL_REFINER_CONTEXT_DIM:
        return ModelFamily("sdxl-refiner", f"{channels}, {context}-wide text conditioning")
    if adm == SDXL_ADM_CHANNELS or context == SDXL_CONTEXT_DIM or any(k.startswith("conditioner.embedders.1.")
                                                                       for k in all_keys):
        return ModelFamily("sdxl", f"{context}-wide text conditioning and size embeddings")
    if context == SD2_CONTEXT_DIM or any(k.startswith("cond_stage_model.model.") for k in all_keys):
        variant = {INPAINT_CHANNELS: "inpainting", SD2_DEPTH_CHANNELS: "depth", SD2_UPSCALER_CHANNELS: "x4 upscaler"}
        kind = variant.get(in_channels, "unCLIP" if label is not None else "")
        detail = f"{context}-wide OpenCLIP text conditioning"
        return ModelFamily("sd2", f"{kind} variant: {detail}" if kind else detail)
    if label is not None:
        return ModelFamily("unknown", "its UNet has class embeddings (label_emb)")
    if context != SD1_CONTEXT_DIM:
        return ModelFamily("unknown", f"its UNet's text conditioning is {context}-wide, not SD 1.x's "
                                      f"{SD1_CONTEXT_DIM}" if context else "its UNet has no cross-attention")
    if in_channels == INPAINT_CHANNELS:
        return ModelFamily("sd1-inpaint", f"{channels}: latent, mask and masked image")
    if in_channels == EDIT_CHANNELS:
        return ModelFamily("sd1-edit", f"{channels}: latent and input image")
    if in_channels != TXT2IMG_CHANNELS:
        return ModelFamily("sd1-other", channels)
    if "v_pred" in all_keys:
        return ModelFamily("sd1-v", "the file carries a 'v_pred' marker")
    return ModelFamily("sd1", f"{channels}, {context}-wide CLIP text conditioning")


def classify_state_dict(state_dict: Mapping[str, Any]) -> ModelFamily:
    """The family of a single-file checkpoint from its names and shapes alone.

    ``state_dict``: name → tensor (any device, ``meta`` included) or name → shape. Key names as stored (see the
    module docstring for what is read). Never raises for odd content: anything unrecognised is ``"unknown"``.
    """
    keys = [k for k in state_dict if isinstance(k, str)]
    key_set = set(keys)
    if not keys:
        return ModelFamily("unknown", "it holds no named tensors")
    unet_keys = _strip(keys, UNET_PREFIX)
    for inner, where in ((unet_keys, "in the checkpoint"), (keys, "on its own")):
        if any(k.startswith(("double_blocks.", "single_blocks.")) for k in inner):
            return ModelFamily("flux", f"double/single transformer blocks {where}")
        if any(k.startswith("joint_blocks.") for k in inner):
            return ModelFamily("sd3", f"MMDiT joint blocks {where}")
    if UNET_PREFIX + "input_blocks.0.0.weight" in key_set:
        unet = {k: state_dict[UNET_PREFIX + k] for k in unet_keys}
        return _unet_family(unet, unet_keys, key_set)
    if unet_keys:
        if any(k.startswith(_DIT_MARKERS) for k in unet_keys):
            return ModelFamily("dit", "transformer blocks instead of UNet input blocks")
        return ModelFamily("unknown", f"'{UNET_PREFIX}*' tensors without UNet input blocks")
    if any(_LORA.search(k) for k in keys):
        return ModelFamily("lora", "low-rank adapter tensors (lora_up/lora_down …)")
    if "input_blocks.0.0.weight" in key_set:
        inner = _unet_family(state_dict, keys, key_set)
        return ModelFamily("unet-only", f"no '{UNET_PREFIX}' prefix; {inner.describe()}")
    if "conv_in.weight" in key_set and any(k.startswith("down_blocks.") for k in keys) and \
            any(k.startswith("time_embedding.") for k in keys):
        return ModelFamily("unet-only", "a diffusers-layout UNet")
    if {"emb_params", "string_to_param", "clip_l", "clip_g"} & key_set or any(k.startswith("string_to_param.")
                                                                             for k in keys):
        return ModelFamily("embedding", "embedding vectors only")
    vae_names = ("encoder.conv_in.weight", "decoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight",
                 "first_stage_model.decoder.conv_in.weight", "taesd_decoder.1.weight", "decoder.layers.1.weight")
    text_prefixes = ("cond_stage_model.", "conditioner.embedders.", "text_model.", "transformer.text_model.",
                     "encoder.block.", "shared.weight")
    has_vae = any(k in key_set for k in vae_names) or any(k.startswith("first_stage_model.") for k in keys)
    has_text = any(k.startswith(text_prefixes) for k in keys)
    if has_vae and not has_text:
        return ModelFamily("vae", "autoencoder tensors only")
    if has_text and not has_vae:
        return ModelFamily("text-encoder", "text-encoder tensors only")
    if has_vae and has_text:
        return ModelFamily("unknown", f"a VAE and a text encoder but no '{UNET_PREFIX}*' UNet")
    return ModelFamily("unknown", f"none of the tensor names of a Stable Diffusion checkpoint (e.g. {keys[0]!r})")
