"""The core's model protocols on ComfyUI's objects: ``core.backend.DiffusionBackend`` on MODEL, CLIP and VAE
(SD1.x), ``core.backend.VisionEncoder`` on CLIP_VISION."""
from __future__ import annotations

import torch

from ...core import diffusion
from ...core.autograd import as_normal, normal_tensors
from ...core.cuda_graphs import CudaGraphSteps, live_weights
from ...core.fingerprint import text_encoder_fingerprint
from ...core.text_encoder import CLIPTextEncoder, PlaceholderConditioner
from .autograd import DifferentiableDecoder, grad_ready_model, set_unet_checkpointing
from .models import (InterruptProcessingException, compute_dtype, encode_image, free_memory, intermediate_device,
                     load_models, model_fingerprint, torch_device, unet)

#: the placeholder prompt whose token MSI's stage tokens replace (docs/method.md §2.2)
PLACEHOLDER = "*"


# ------------------------------------------------------------------------------------------ text
def clip_prompt_ids(clip, text: str) -> torch.Tensor:
    """Token ids [77] (long) of ``text`` exactly as ComfyUI's SD1 tokenizer produces them (BOS, tokens, EOS,
    padding)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return torch.tensor([int(t[0]) for t in tokens[key][0]], dtype=torch.long)


def hf_text_model_state(clip) -> dict[str, torch.Tensor]:
    """The SD1 CLIP-L text encoder's state dict in Hugging Face names (ComfyUI keeps the HF layout)."""
    load_models(clip.patcher)
    encoder = clip.cond_stage_model
    inner = getattr(encoder, "clip_l", encoder)
    return dict(inner.transformer.state_dict())


class ComfyTextConditioner:
    """Stage-token conditioning through a private, differentiable copy of the checkpoint's CLIP-L text encoder
    (ComfyUI's own adds residuals in place, which autograd cannot go through)."""

    def __init__(self, clip, device: torch.device):
        self.clip = clip
        encoder = CLIPTextEncoder.from_state_dict(hf_text_model_state(clip)).to(device)
        self.placeholder = PlaceholderConditioner(encoder, clip_prompt_ids(clip, PLACEHOLDER), position=1)

    def encode_stage_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [S,D] → conditionings [S,77,D] of the placeholder prompt, differentiable w.r.t. tokens."""
        return self.placeholder(tokens)

    def token_embedding(self, word: str) -> torch.Tensor:
        """Input embedding [D] of the first token of ``word``."""
        return self.placeholder.token_embedding(int(clip_prompt_ids(self.clip, word)[1]))


# ---------------------------------------------------------------------------------------- vision
def clip_vision_hidden_states(clip_vision, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """HF-convention hidden states of ComfyUI's CLIP_VISION for CLIP-normalised pixels [B,3,224,224]: 25
    float32 tensors [B,257,1024] for ViT-L/14, index 0 = embeddings (after the pre-LayerNorm), i = after
    layer i (docs/comfyui-internals.md §2.7)."""
    load_models(clip_vision.patcher)
    vision = clip_vision.model.vision_model if hasattr(clip_vision.model, "vision_model") else clip_vision.model
    pixels = pixel_values.to(clip_vision.load_device, clip_vision.dtype)
    embeds = vision.pre_layrnorm(vision.embeddings(pixels))
    _, stacked, _ = vision(pixels, intermediate_output="all")
    return [embeds.float()] + [stacked[:, i].float() for i in range(stacked.shape[1])]


class ComfyVisionEncoder:
    """core.backend.VisionEncoder on ComfyUI's CLIP_VISION (CLIPVisionLoader)."""

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision
        self.device = clip_vision.load_device

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return clip_vision_hidden_states(self.clip_vision, pixel_values)


# --------------------------------------------------------------------------------------- backend
class ComfyBackend:
    """core.backend.DiffusionBackend on ComfyUI's MODEL, CLIP and VAE (SD1.x).

    ``predict_eps`` runs the UNet through ``BaseModel.apply_model`` in σ space: x_σ = z_t·√(1+σ²) and
    ε̂ = (x_σ − x̂₀)/σ. ``trainable=True`` routes UNet weights through clone wrappers so gradients reach the
    conditioning (MSI training), for calls with autograd on; calls without it (inversion) use the MODEL as
    given. The text encoder and VAE decoder are private gradient-ready copies.

    Inside each loop (MSI, inversion, and the quick node's sampling and recovery) the step may replay as CUDA
    graphs (``core.cuda_graphs``; ``cuda_graphs`` "auto" by default, ``DP_CUDA_GRAPHS=0`` turns it off): only
    while every UNet weight sits on the GPU at the address it was captured with (ComfyUI's low-VRAM loading
    keeps the step eager), against ComfyUI's view of free memory, checked with the tolerance of the model's
    compute dtype, with Cancel passed through, and released when the loop ends, so ComfyUI stays free to move
    the model between runs.
    """

    def __init__(self, model, clip, vae, *, trainable: bool = False, cuda_graphs: str = "auto"):
        self.trainable = trainable
        self._given_model = model  # the id of the weights: the grad-ready clone's wrappers change no weight
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
        self.token_dim = next(int(m.weight.shape[1]) for name, m in unet(self.model).named_modules()
                              if name.endswith("attn2.to_k"))
        self._decoder = None
        self._text = None
        self._null = None
        self._text_fingerprint = None
        self.gradient_checkpointing = False
        self._sigmas = diffusion.sigma_table().to(torch.float32).to(self.device)
        self._graphs = CudaGraphSteps(self._eps, self.device, cuda_graphs, weights=live_weights(self.base),
                                      free_bytes=self.free_memory_bytes, compute_dtype=compute_dtype(self.base),
                                      passthrough=(InterruptProcessingException,))

    # diffusion
    def predict_eps(self, z_t, t, cond):
        if not self.trainable:  # plain inference: stay in the caller's (inference) mode
            return self._graphs(z_t, t, cond)
        if not torch.is_grad_enabled():
            # no backward follows (DDIM inversion after MSI, objective checks): the MODEL as given, without the
            # grad-ready clone's weight wrappers, so no weight is copied for the forward
            load_models(self._given_model)
            return self._graphs(z_t, t, cond)
        # loading the VAE/CLIP under memory pressure can unload the UNet, which drops the weight wrappers
        # (the weights would then reach autograd as inference tensors); reloading re-applies them
        load_models(self.model)
        with normal_tensors():
            return self._graphs(z_t, t, cond)

    def unet_graphs(self, enabled: bool = True, why: str = "", resident_bytes: int = 0):
        """The CUDA-graph scope of one loop (:meth:`core.cuda_graphs.CudaGraphSteps.scope`)."""
        return self._graphs.scope(enabled, why, resident_bytes)

    @property
    def cuda_graphs_status(self) -> str:
        """One line: whether the UNet step replays CUDA graphs, why, and what they did."""
        return self._graphs.reason

    def free_memory_bytes(self) -> int:
        """Memory free on the compute device now by ComfyUI's count (``get_free_memory``: the driver's free
        memory plus PyTorch's unused cache), for MSI's checkpointing choice and the CUDA-graph check."""
        return free_memory(self.device)

    def _eps(self, z_t, t, cond):
        sigma = self._sigmas[t.long().to(self.device)].clone()
        scale = (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        x_sigma = z_t * scale
        x0 = self.base.apply_model(x_sigma, sigma, c_crossattn=cond)
        return ((x_sigma - x0.float()) / sigma.view(-1, 1, 1, 1)).float()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """UNet activation checkpointing for MSI (:func:`~.autograd.set_unet_checkpointing`); MSI turns it off
        again afterwards, since ComfyUI shares the UNet's modules with every other node."""
        set_unet_checkpointing(self.model, enabled)
        self.gradient_checkpointing = enabled

    def encode_image(self, image):
        bhwc = ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        return encode_image(self.vae, self.model, bhwc.to(intermediate_device()))

    def decode_latent(self, z):
        if self._decoder is None:
            self._decoder = DifferentiableDecoder(self.vae, self.model)
        return self._decoder(z)

    # text
    def _text_encoder(self) -> ComfyTextConditioner:
        if self._text is None:
            self._text = ComfyTextConditioner(self.clip, self.device)
        return self._text

    def encode_stage_tokens(self, tokens):
        return self._text_encoder().encode_stage_tokens(tokens)

    def null_conditioning(self):
        if self._null is None:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(""))
            self._null = as_normal(cond.float().to(self.device))
        return self._null

    def token_embedding(self, word):
        return self._text_encoder().token_embedding(word)

    def model_fingerprint(self):
        # the MODEL as given, not the grad-ready clone: same weights, but the clone's fresh patches_uuid
        # would miss the fingerprint cache on every MSI run
        return model_fingerprint(self._given_model)

    def text_encoder_fingerprint(self):
        """core.fingerprint of the CLIP text encoder's weights as loaded (for the privacy report)."""
        if self._text_fingerprint is None:
            self._text_fingerprint = text_encoder_fingerprint(hf_text_model_state(self.clip))
        return self._text_fingerprint
