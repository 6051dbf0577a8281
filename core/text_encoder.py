"""A small, differentiable CLIP text transformer (SD1.x's CLIP ViT-L/14 text tower) built from a state dict.

Why our own forward: MSI needs d(conditioning)/d(token) through the text encoder. ComfyUI's encoder adds
residuals in place (no autograd) and transformers' internals change between major versions; this module is
the same math in ~80 lines and loads either layout of the weights (Hugging Face names, with or without the
``text_model.`` prefix — ComfyUI keeps these names too).

Shapes: token ids [77] (long), token embeddings [S, 77, D], output [S, 77, D] after the final LayerNorm
(SD1.x uses the last layer, D = 768, 12 layers, 12 heads, quick-GELU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd import normal_tensors
from .errors import IncompatibleWeightsError


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layer_norm1(x))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: token embeddings → conditioning, with a causal mask and a final LayerNorm."""

    def __init__(self, vocab_size: int = 49408, dim: int = 768, layers: int = 12, heads: int = 12,
                 hidden: int = 3072, max_tokens: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        self.layers = nn.ModuleList(_Layer(dim, heads, hidden) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(dim)

    @property
    def dim(self) -> int:
        return self.token_embedding.embedding_dim

    def forward_embeddings(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """[S, N, D] input token embeddings (before positions) → [S, N, D] conditioning."""
        n = token_embeddings.shape[1]
        x = token_embeddings + self.position_embedding.weight[:n].to(token_embeddings.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[S, N] token ids → [S, N, D]."""
        return self.forward_embeddings(self.token_embedding(input_ids))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], heads: int | None = None) -> "CLIPTextEncoder":
        """Build from Hugging Face CLIPTextModel names (``text_model.`` prefix optional); sizes are read off
        the tensors. Raises IncompatibleWeightsError if a tensor is missing or misshaped."""
        sd = {k.removeprefix("text_model."): v for k, v in state.items()}
        try:
            vocab, dim = sd["embeddings.token_embedding.weight"].shape
            max_tokens = sd["embeddings.position_embedding.weight"].shape[0]
            hidden = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        except KeyError as missing:
            raise IncompatibleWeightsError(f"not a CLIP text encoder state dict (missing {missing})") from None
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        with normal_tensors():
            model = cls(vocab, dim, layers, heads or dim // 64, hidden, max_tokens)
        mapped = {}
        for name in model.state_dict():
            if name.startswith("layers."):
                _, i, leaf = name.split(".", 2)
                prefix = f"encoder.layers.{i}."
                src = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                       "out_proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
                head, tail = leaf.split(".", 1)
                key = prefix + src.get(head, head) + "." + tail
            elif name.startswith(("token_embedding", "position_embedding")):
                key = "embeddings." + name
            else:
                key = name
            if key not in sd:
                raise IncompatibleWeightsError(f"CLIP text encoder weights lack {key!r}")
            mapped[name] = sd[key]
        with normal_tensors():
            mapped = {k: v.detach().clone().float() for k, v in mapped.items()}
            model.load_state_dict(mapped, strict=True)
        return model.requires_grad_(False).eval()


class PlaceholderConditioner:
    """Conditioning of a fixed prompt (default ``"*"``) with one token's input embedding replaced by a vector.

    ``input_ids`` [77] are the prompt's ids as the model's tokenizer gives them; ``position`` is the index of the
    placeholder (1 for ``"*"``: [BOS, *, EOS, pad…]).
    """

    def __init__(self, encoder: CLIPTextEncoder, input_ids: torch.Tensor, position: int = 1):
        self.encoder = encoder
        self.input_ids = input_ids.long().view(1, -1)
        self.position = position
        self._constants: dict = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's ids and the placeholder's one-hot mask [1,77,1] on ``device``, made once per device and
        dtype: MSI encodes every step, and a host-to-device copy per step would make the host wait."""
        key = (device, dtype)
        if key not in self._constants:
            with normal_tensors():
                onehot = torch.zeros(1, self.input_ids.shape[1], 1, dtype=dtype)
                onehot[:, self.position] = 1.0
                self._constants[key] = (self.input_ids.to(device), onehot.to(device))
        return self._constants[key]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [S, D] → conditioning [S, 77, D] float32 (float64 for a float64 encoder), differentiable
        w.r.t. tokens."""
        device = self.encoder.token_embedding.weight.device
        dtype = self.encoder.token_embedding.weight.dtype
        ids, onehot = self._on(device, dtype)
        with normal_tensors():
            base = self.encoder.token_embedding(ids)  # [1, 77, D]
            embeds = base.expand(tokens.shape[0], -1, -1)
            embeds = embeds * (1 - onehot) + tokens.to(device, dtype)[:, None, :] * onehot
            out = self.encoder.forward_embeddings(embeds)
            return out if out.dtype == torch.float64 else out.float()

    def token_embedding(self, token_id: int) -> torch.Tensor:
        """Input embedding [D] of one token id."""
        with torch.no_grad():
            weight = self.encoder.token_embedding.weight
            return weight[int(token_id)].detach().float().clone()
