"""Stable Diffusion 1.x from a single-file checkpoint through diffusers + transformers (no hub, no ComfyUI).

``DiffusersBackend`` implements :class:`core.backend.DiffusionBackend` for an LDM/CompVis-layout checkpoint
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``): the file is read
with :func:`core.weights.read_state_dict`, split and its UNet and KL-VAE configs are read off the tensor shapes
by :mod:`core.checkpoint` (which also maps the TAESD layout onto diffusers' ``AutoencoderTiny``), the text
encoder is CLIP ViT-L/14 (or a caller-given config) and every module is built from those configs, so nothing
is fetched from anywhere. UNet and KL-VAE keys are converted with diffusers' public ``single_file_utils``
helpers.

``ClipVisionEncoder`` implements :class:`core.backend.VisionEncoder`: the CLIP ViT-L/14 vision tower from a
local HF-layout file (``vision_model.*``, the layout of ComfyUI's ``models/clip_vision`` ViT-L files).

Outputs are float32 whatever the compute dtype (float64 stays float64, for finite-difference checks).

Latent convention (see core/backend.py): latents are *scaled* latents z = 0.18215 · u, where u is the KL VAE's
posterior mean. For TAESD the same model-space z is produced, with ComfyUI's reading of a TAESD checkpoint:
u = taesd_encoder(x) / vae_scale + vae_shift (``vae_scale``/``vae_shift`` stored in the file). A genuine
SD1 TAESD stores vae_scale = 0.18215, vae_shift = 0, so z is exactly the TAESD encoder output (TAESD is
trained to emit scaled latents); that is also what we assume when a file carries no ``vae_scale``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .autograd import normal_tensors
from .cuda_graphs import CudaGraphSteps, live_weights
from .checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    check_sd1_checkpoint,
    kl_vae_config_from_ldm,
    split_checkpoint,
    taesd_to_diffusers,
    unet_config_from_ldm,
)
from .diffusion import LATENT_SCALE
from .errors import IncompatibleWeightsError, InvalidImageError, WeightsNotFoundError
from .fingerprint import text_encoder_fingerprint, unet_fingerprint
from .speed import GuardedCompile
from .text_encoder import CLIPTextEncoder, PlaceholderConditioner
from .weights import read_state_dict

SEQ_LEN = 77
PLACEHOLDER = "*"

#: CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14, vision side).
VIT_L14_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)


# ------------------------------------------------------------------------------------------- module loading
def _load_module(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict load that turns a mismatch into an IncompatibleWeightsError naming a few offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        raise IncompatibleWeightsError(
            f"The {what} weights do not match the expected architecture: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]} ({len(missing)}/{len(unexpected)}/{len(wrong)}).")
    module.load_state_dict(dict(sd), strict=True)


def _build(ctor, sd: Mapping[str, torch.Tensor], what: str, device, dtype) -> nn.Module:
    """Build a module (its random init skipped by building on the meta device), load weights, freeze it."""
    with torch.device("meta"):
        module = ctor()
    # nn.Module.to: diffusers' own .to() warns about fp32-pinned modules, which SD1 models do not have.
    nn.Module.to(module, dtype=dtype)
    module = module.to_empty(device=device)
    _reset_nonpersistent_buffers(module)
    # transformers 4.x nests CLIPVisionModel's tower under ``vision_model.``; 5.x does not
    prefixes = {k.split(".", 1)[0] for k in module.state_dict()}
    if prefixes == {"vision_model"} and not any(k.startswith("vision_model.") for k in sd):
        sd = {"vision_model." + k: v for k, v in sd.items()}
    _load_module(module, sd, what)  # copy_ casts the stored dtype to the module's
    module.requires_grad_(False)
    return module.eval()


def _reset_nonpersistent_buffers(module: nn.Module) -> None:
    """Recreate the buffers that ``to_empty`` left uninitialised and no checkpoint carries (CLIP position ids)."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if name in sub._non_persistent_buffers_set and buf is not None:
                if name == "position_ids":
                    sub._buffers[name] = torch.arange(buf.shape[-1], device=buf.device).expand(buf.shape).clone()
                else:
                    raise IncompatibleWeightsError(f"Cannot initialise buffer {name!r} of {type(sub).__name__}.")


# ------------------------------------------------------------------------------------------- text helpers
def load_clip_tokenizer(tokenizer_dir: str | os.PathLike):
    """``CLIPTokenizer`` from a local folder holding vocab.json + merges.txt (e.g. ComfyUI's comfy/sd1_tokenizer)."""
    from transformers import CLIPTokenizer

    tokenizer_dir = os.fspath(tokenizer_dir)
    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(tokenizer_dir, name)):
            raise WeightsNotFoundError(
                f"CLIP tokenizer file {name!r} not found in {tokenizer_dir!r}. Point tokenizer_dir at a folder with "
                "vocab.json and merges.txt, e.g. <ComfyUI>/comfy/sd1_tokenizer.")
    return CLIPTokenizer(os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt"))


# ------------------------------------------------------------------------------------------- backend
def _output(x: torch.Tensor) -> torch.Tensor:
    """Results leave the backend as float32, or float64 when computed in float64 (for gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


class DiffusersBackend:
    """SD1.x denoiser, VAE and CLIP text encoder behind the DiffusionBackend protocol (all weights frozen)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_model: CLIPTextEncoder, tokenizer, *, vae_kind: str,
                 device, dtype: torch.dtype, vae_dtype: torch.dtype, fingerprint: str, text_fingerprint: str,
                 taesd_scale: float = LATENT_SCALE, taesd_shift: float = 0.0, compile_unet: str = "off",
                 cuda_graphs: str = "auto"):
        self.unet, self.vae, self.text_model, self.tokenizer = unet, vae, text_model, tokenizer
        # the UNet call of predict_eps: compiled on CUDA when asked and when it works, eager otherwise...
        self._unet_call = GuardedCompile(unet, device, compile_unet)
        # ...and replayed as CUDA graphs inside each loop's scope (core/cuda_graphs.py), except while the compiled
        # step is active: it ("reduce-overhead") replays graphs of its own, so the two never stack
        self._graphs = CudaGraphSteps(self._unet_eps, device, cuda_graphs, weights=live_weights(unet))
        self.vae_kind = vae_kind
        self.device = torch.device(device)
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.token_dim = text_model.dim
        self._fingerprint, self._text_fingerprint = fingerprint, text_fingerprint
        self._taesd_scale, self._taesd_shift = float(taesd_scale), float(taesd_shift)
        self._null: torch.Tensor | None = None
        self._gradient_checkpointing = False
        star_ids = self._tokenize(PLACEHOLDER)
        if int((star_ids == self.tokenizer.eos_token_id).int().argmax()) != 2:
            raise IncompatibleWeightsError(f"The tokenizer splits {PLACEHOLDER!r} into several tokens.")
        self._placeholder = PlaceholderConditioner(text_model, star_ids[0], position=1)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_single_file(cls, checkpoint_path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike,
                         device="cpu", dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                         compile_unet: str = "off", cuda_graphs: str = "auto") -> "DiffusersBackend":
        """Load an SD1.x single-file checkpoint (LDM key layout) with KL or TAESD VAE.

        ``dtype`` is the UNet compute dtype, ``vae_dtype`` the VAE's (default ``dtype``); the text encoder runs
        in float32 (its sizes are read off the checkpoint). ``compile_unet`` "on"/"auto" compiles the UNet step
        on CUDA (:class:`core.speed.GuardedCompile`: off with one log line where it cannot), "off" never does.
        ``cuda_graphs`` "auto"/"on"/"off": the UNet step replayed as CUDA graphs inside each loop
        (:class:`core.cuda_graphs.CudaGraphSteps`; CUDA only, checked against the eager step).
        """
        tokenizer = load_clip_tokenizer(tokenizer_dir)
        sd = read_state_dict(checkpoint_path, what="SD1.x checkpoint")
        return cls.from_state_dict(sd, tokenizer=tokenizer, device=device, dtype=dtype, vae_dtype=vae_dtype,
                                   source=f"The checkpoint '{os.fspath(checkpoint_path)}'", compile_unet=compile_unet,
                                   cuda_graphs=cuda_graphs)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], *, tokenizer, device="cpu",
                        dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                        source: str = "state dict", compile_unet: str = "off",
                        cuda_graphs: str = "auto") -> "DiffusersBackend":
        """Same as :meth:`from_single_file` for an in-memory single-file state dict.

        The model family is checked first (:func:`core.model_family.classify_state_dict`), then the parts: an SDXL,
        SD 2.x, inpainting … file raises UnsupportedModelError naming its family, never a missing-part message.
        ``source`` starts the error messages (e.g. "The checkpoint 'x.safetensors'"); ``compile_unet`` and
        ``cuda_graphs`` as :meth:`from_single_file`.

        Raises:
            UnsupportedModelError: not an SD 1.x ε-prediction text-to-image model.
            IncompatibleWeightsError: an SD 1.x model without VAE or text encoder, or with tensors that do not fit.
        """
        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (
            convert_ldm_unet_checkpoint,
            convert_ldm_vae_checkpoint,
        )

        vae_dtype = dtype if vae_dtype is None else vae_dtype
        check_sd1_checkpoint(sd, source)  # family, then parts: names only, before any module is built
        unet_sd, vae_sd, text_sd = split_checkpoint(sd)

        unet_cfg = unet_config_from_ldm(unet_sd)
        if unet_cfg["in_channels"] != 4 or unet_cfg["out_channels"] != 4:
            raise IncompatibleWeightsError(
                f"{source}: UNet takes {unet_cfg['in_channels']} latent channels (an inpainting or edit model?); "
                "use a plain SD1.x text-to-image checkpoint.")
        unet_diff = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet_sd.items()}, unet_cfg)
        unet = _build(lambda: UNet2DConditionModel(**unet_cfg), unet_diff, "UNet", device, dtype)

        if "taesd_decoder.1.weight" in vae_sd:
            latent_ch = int(vae_sd["taesd_decoder.1.weight"].shape[1])
            vae = _build(lambda: AutoencoderTiny(latent_channels=latent_ch), taesd_to_diffusers(vae_sd),
                         "TAESD VAE", device, vae_dtype)
            vae_kind = "taesd"
            scale = float(vae_sd["vae_scale"]) if "vae_scale" in vae_sd else LATENT_SCALE
            shift = float(vae_sd["vae_shift"]) if "vae_shift" in vae_sd else 0.0
        elif "encoder.conv_in.weight" in vae_sd:
            try:
                vae_cfg = kl_vae_config_from_ldm(vae_sd)
            except KeyError as exc:
                raise IncompatibleWeightsError(f"{source}: incomplete KL VAE (missing {exc}).") from exc
            vae_diff = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_sd.items()}, vae_cfg)
            vae = _build(lambda: AutoencoderKL(**vae_cfg), vae_diff, "KL VAE", device, vae_dtype)
            vae_kind, scale, shift = "kl", LATENT_SCALE, 0.0
        else:
            raise IncompatibleWeightsError(f"{source}: the VAE is neither an LDM KL autoencoder nor TAESD.")

        # fp32 text encoder (cheap, and MSI differentiates through it); float64 only for gradient checks
        text = CLIPTextEncoder.from_state_dict(text_sd).to(device, torch.float64 if dtype == torch.float64 else None)
        if int(unet_cfg["cross_attention_dim"]) != text.dim:
            raise IncompatibleWeightsError(
                f"UNet context width {unet_cfg['cross_attention_dim']} != text width {text.dim}.")

        return cls(unet, vae, text, tokenizer, vae_kind=vae_kind, device=device, dtype=dtype, vae_dtype=vae_dtype,
                   fingerprint=unet_fingerprint(unet_sd), text_fingerprint=text_encoder_fingerprint(text_sd),
                   taesd_scale=scale, taesd_shift=shift, compile_unet=compile_unet, cuda_graphs=cuda_graphs)

    # ---------------------------------------------------------------- denoiser
    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ [B,4,h,w] float32 for VP latents z_t at integer timesteps t [B] under cond [B,77,D]; computed in
        ``self.dtype`` (or an enclosing autocast), differentiable w.r.t. z_t and cond."""
        if z_t.dim() != 4:
            raise InvalidImageError(f"z_t must be [B,4,h,w], got {tuple(z_t.shape)}")
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        if t.numel() == 1 and z_t.shape[0] > 1:
            t = t.expand(z_t.shape[0])
        if cond.shape[0] == 1 and z_t.shape[0] > 1:
            cond = cond.expand(z_t.shape[0], -1, -1)
        out = self._graphs(z_t.to(self.device, self.dtype), t, cond.to(self.device, self.dtype))
        return _output(out)

    def _unet_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet call itself (what a CUDA graph records): z_t [B,4,h,w], t [B] long, cond [B,77,D] on the
        device in the compute dtype → ε̂ [B,4,h,w] in that dtype."""
        return self._unet_call(z_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    _COMPILED = "the compiled UNet step replays CUDA graphs itself"

    def unet_graphs(self, enabled: bool = True, why: str = "", resident_bytes: int = 0):
        """The CUDA-graph scope of one loop (:meth:`core.cuda_graphs.CudaGraphSteps.scope`); kept eager while
        the compiled UNet step is active."""
        if self._unet_call.active:
            enabled, why = False, self._COMPILED
        return self._graphs.scope(enabled, why, resident_bytes)

    @property
    def cuda_graphs_enabled(self) -> bool:
        """Whether loops may replay the UNet step as CUDA graphs (CUDA, the setting, nothing failed, no
        compiled step)."""
        return self._graphs.enabled and not self._unet_call.active

    @property
    def cuda_graphs_status(self) -> str:
        """One line: whether the UNet step replays CUDA graphs, why, and what they did (reports, benchmark)."""
        if self._unet_call.active and self._graphs.enabled:
            return f"off: {self._COMPILED}"
        return self._graphs.reason

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Toggle activation checkpointing in the UNet (memory for compute when backpropagating into cond)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self._gradient_checkpointing = bool(enabled)

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    def model_fingerprint(self) -> str:
        """Hash of every UNet weight (see :func:`core.fingerprint.unet_fingerprint`)."""
        return self._fingerprint

    def text_encoder_fingerprint(self) -> str:
        """Hash of every text-encoder weight (see :func:`core.fingerprint.text_encoder_fingerprint`)."""
        return self._text_fingerprint

    # ---------------------------------------------------------------- VAE
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled latent z = 0.18215 · VAE posterior mean of image [B,3,H,W] in [−1,1] → [B,4,H/8,W/8] float32.

        TAESD: z = 0.18215 · (encoder(x) / vae_scale + vae_shift), i.e. the encoder output itself for a
        genuine TAESD (vae_scale = 0.18215, shift 0).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise InvalidImageError(f"image must be [B,3,H,W], got {tuple(image.shape)}")
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise InvalidImageError(f"image height and width must be multiples of 8, got {tuple(image.shape[-2:])}")
        x = image.to(self.device, self.vae_dtype)
        if self.vae_kind == "taesd":
            raw = _output(self.vae.encoder(x))
            return LATENT_SCALE * (raw / self._taesd_scale + self._taesd_shift)
        return _output(self.vae.encode(x).latent_dist.mean) * LATENT_SCALE

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of scaled latents [B,4,h,w] → image [B,3,8h,8w] float32, ≈[−1,1], unclamped."""
        u = _output(z.to(self.device)) / LATENT_SCALE
        if self.vae_kind == "taesd":
            raw = (u - self._taesd_shift) * self._taesd_scale
            return _output(self.vae.decoder(raw.to(self.vae_dtype)))
        return _output(self.vae.decode(u.to(self.vae_dtype), return_dict=False)[0])

    # ---------------------------------------------------------------- text
    def _tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, padding="max_length", max_length=SEQ_LEN, truncation=True,
                             return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def encode_text(self, text: str) -> torch.Tensor:
        """Conditioning [1,77,D] float32 of a plain prompt (no grad)."""
        with torch.no_grad():
            return _output(self.text_model(self._tokenize(text)))

    def encode_stage_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Conditioning of ``"*"`` with the ``*`` input embedding (position 1) replaced by each row of
        tokens [S,D] → [S,77,D] float32, differentiable w.r.t. tokens."""
        if tokens.dim() != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"tokens must be [S,{self.token_dim}], got {tuple(tokens.shape)}")
        return self._placeholder(tokens)

    def null_conditioning(self) -> torch.Tensor:
        """Conditioning of the empty prompt → [1,77,D] float32 (computed once)."""
        if self._null is None:
            self._null = self.encode_text("")
        return self._null

    def token_embedding(self, word: str) -> torch.Tensor:
        """Input embedding [D] float32 of the first token of ``word``."""
        ids = self.tokenizer(word)["input_ids"]
        if len(ids) < 3:
            raise ValueError(f"{word!r} produces no token")
        return self._placeholder.token_embedding(ids[1])


# ------------------------------------------------------------------------------------------- vision
class ClipVisionEncoder:
    """CLIP ViT vision tower (HF ``CLIPVisionModel``) behind the VisionEncoder protocol (frozen)."""

    def __init__(self, model: nn.Module, device, dtype: torch.dtype):
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_hidden_states = int(model.config.num_hidden_layers) + 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, *, device="cpu", dtype=torch.float32,
                    seed: int | None = None) -> "ClipVisionEncoder":
        """A randomly initialised tower (ViT-L/14 unless ``config`` overrides entries); for tests."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = dict(VIT_L14_VISION_CONFIG)
        cfg.update(config or {})
        vcfg = CLIPVisionConfig(**cfg)
        vcfg._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = CLIPVisionModel(vcfg)
        model.to(device=device, dtype=dtype).requires_grad_(False).eval()
        return cls(model, device, dtype)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                  config: Mapping[str, Any] | None = None) -> "ClipVisionEncoder":
        """Load ViT-L/14 vision weights in HF layout (``vision_model.*``; CLIPModel files are accepted too:
        text-tower and projection tensors are ignored)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        sd = read_state_dict(path, what="CLIP vision weight file")
        vision = {}
        for k, v in sd.items():
            if not k.startswith("vision_model."):
                continue
            name = k[len("vision_model."):]
            if not name.endswith("position_ids"):
                vision[name] = v
        if not vision:
            raise IncompatibleWeightsError(
                f"{os.fspath(path)!r} has no 'vision_model.*' tensors: expected an HF-layout CLIP ViT-L/14 vision "
                "file (e.g. ComfyUI's clip_vision ViT-L model.safetensors).")
        cfg = dict(VIT_L14_VISION_CONFIG)
        cfg.update(config or {})
        vcfg = CLIPVisionConfig(**cfg)
        vcfg._attn_implementation = "sdpa"
        model = _build(lambda: CLIPVisionModel(vcfg), vision, "CLIP vision", device, dtype)
        return cls(model, device, dtype)

    def hidden_states(self, pixel_values: torch.Tensor) -> Sequence[torch.Tensor]:
        """All hidden states (embedding output after pre-LN, then each layer) for CLIP-normalised pixels
        [B,3,224,224] → tuple of num_layers+1 tensors [B,257,width] in the model dtype."""
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states


# ------------------------------------------------------------------------------------ guidance decoder
class TinyGuidanceDecoder:
    """TAESD's decoder (madebyollin's tiny autoencoder for SD1, ~1.2 M parameters) as the *guidance* decoder:
    scaled latent [B,4,h,w] → image [B,3,8h,8w] in ≈[−1,1], float32, differentiable, unclamped — the
    contract of :meth:`DiffusionBackend.decode_latent`, so :class:`core.energies.IdentityGuidance` can take its
    gradient through it instead of through the checkpoint's VAE (issue 11: TAESD's decode forward + backward
    costs ~15× less than the full VAE's at batch 4 on an H200). Only the guidance gradient uses it: the results
    are decoded, judged by the identity gate and written through the checkpoint's VAE.

    An SD1 TAESD is trained to decode *scaled* latents directly (ComfyUI reads it with vae_scale = 0.18215 and
    shift 0 on unscaled latents, which is the same), so the scaled latent goes in unchanged.
    """

    name = "taesd"

    def __init__(self, decoder: nn.Module, device, dtype: torch.dtype = torch.float32):
        self.decoder = decoder
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_file(cls, path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32
                  ) -> "TinyGuidanceDecoder":
        """Read a TAESD decoder file: ComfyUI's ``models/vae_approx/taesd_decoder.safetensors`` (or ``.pth``; the
        layout of madebyollin/taesd: ``1.weight`` … with a parameter-free Clamp at index 0) or a diffusers
        ``AutoencoderTiny`` file (``decoder.layers.*``; its encoder tensors are ignored).

        Raises:
            WeightsNotFoundError: no such file. IncompatibleWeightsError: a damaged file, or tensors that are not
                an SD1 TAESD decoder (4 latent channels, 64 wide).
        """
        from diffusers import AutoencoderTiny

        what = "TAESD decoder (guidance decoder)"
        source = f"{what} '{os.fspath(path)}'"
        sd = read_state_dict(path, what=what)
        scale = sd.get("vae_scale")  # present in a VAE saved from ComfyUI: SD1's TAESD says 0.18215
        if scale is not None and abs(float(scale) - LATENT_SCALE) > 1e-4:
            raise IncompatibleWeightsError(
                f"The {source} has vae_scale {float(scale):g}, not SD 1.x's {LATENT_SCALE} (a TAESD for another "
                f"model, e.g. taesdxl): give SD 1.x's taesd_decoder.")
        if any(k.startswith("decoder.layers.") for k in sd):  # diffusers' AutoencoderTiny
            sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}
        elif any(k.startswith("taesd_decoder.") for k in sd):  # a whole TAESD VAE as ComfyUI holds it
            sd = taesd_to_diffusers(sd)
        else:  # madebyollin's / ComfyUI's vae_approx file
            sd = taesd_to_diffusers({f"taesd_decoder.{k}": v for k, v in sd.items()})  # → decoder.layers.*
        sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}
        with normal_tensors():  # weights autograd can save, also when called inside inference mode
            with torch.device("meta"):
                decoder = AutoencoderTiny(latent_channels=4).decoder  # SD1 TAESD: 4 latent channels, 64 wide
            nn.Module.to(decoder, dtype=dtype)
            decoder = decoder.to_empty(device=device)
            _load_module(decoder, {k[len("decoder."):]: v for k, v in sd.items()}, source)
        return cls(decoder.requires_grad_(False).eval(), device, dtype)

    def __call__(self, z_scaled: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_scaled.to(self.device, self.dtype)).float()
