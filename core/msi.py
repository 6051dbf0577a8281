"""MSI: the Multi-Scale image Inversion of Diff-Privacy (docs/method.md §2.2, §2.3, §8.1).

Per image, a small network is fitted against a frozen SD1.x so that ten stage tokens (one per band of 100
DDPM steps, s = ⌊t/100⌋) reproduce the image under the plain ε-MSE objective

    L = E_{t, ε} ‖ε − ε_θ(√ᾱ_t·z₀ + √(1−ᾱ_t)·ε, t, c_{s(t)})‖²,

where c_s is the text conditioning of the prompt ``"*"`` with the ``*`` input embedding replaced by token s.

* ``MSIFaithful``: the released module as its functional equivalent. Five CLIP-ViT-L/14 depths
  (hidden states 3, 7, 11, 15, 24), each mean-pooled over its 257 tokens, pass a bias-free two-layer
  projection and are L2-normalised; stage s uses depth ⌊s/2⌋, is modulated by a learned stage vector T[s]
  and goes through the head. The released head is two single-token "cross-attentions"; with one key, softmax
  is 1, the first block's output is ignored by the second, so the head reduces to
  to_v (768→512, no bias) → to_out (512→768) → Dropout → Dropout → Linear(768→768).
* ``MSILite``: ten raw tokens learned directly, initialised from the embedding of "face" (docs/method.md §8.1 item 7).

Deliberate deviations from the release (both toggleable where behaviour matters): CLIP preprocessing is
correct by default (``uint8_quirk=True`` reproduces the released uint8 cast), and the final tokens are
computed in eval mode (dropout off) where the release left dropout on.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import normal_tensors
from .backend import DiffusionBackend, VisionEncoder
from .cuda_graphs import graph_scope
from .diffusion import NUM_STAGES, NUM_TRAIN_TIMESTEPS, q_sample, stage_of_timestep
from .errors import InvalidImageError
from .keys import LATENT_CHANNELS
from .speed import (CHECKPOINTING_SETTINGS, backend_free_bytes, decide_checkpointing, faces_that_fit,
                    resolve_autocast_dtype, saved_activation_bytes)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
#: CLIP hidden-state indices feeding MSI levels 0..4 (stage s uses level ⌊s/2⌋); −1 is the last layer (24).
FEATURE_LAYERS = (3, 7, 11, 15, -1)
NUM_LEVELS = len(FEATURE_LAYERS)

MODES = ("faithful", "lite")
#: Recipes (docs/method.md §8.8): "paper" the release's batch-1 steps in fp32; "default" the same number of
#: timesteps seen in batches of DEFAULT_TIMESTEPS_PER_STEP; "fast" fewer timesteps with a cosine learning rate.
SPEEDS = ("paper", "default", "fast")
#: Timesteps MSI sees (optimisation steps × timesteps per step) and the AdamW learning rate at one timestep per
#: step. faithful: the release's v1-finetune.yaml (max_steps 6100 at batch 1, base_learning_rate 1e-4); lite:
#: textual-inversion practice (docs/method.md §8.1 item 7).
FAITHFUL_TIMESTEPS, LITE_TIMESTEPS = 6100, 1500
FAITHFUL_LR, LITE_LR = 1e-4, 5e-3
#: the release's step counts (batch 1), kept under their old names
FAITHFUL_STEPS, LITE_STEPS = FAITHFUL_TIMESTEPS, LITE_TIMESTEPS
PAPER_TIMESTEPS = {"faithful": FAITHFUL_TIMESTEPS, "lite": LITE_TIMESTEPS}
BASE_LR = {"faithful": FAITHFUL_LR, "lite": LITE_LR}
#: timesteps per optimisation step of the "default" recipe: on a CPU (full-size SD1.5, 64 px) one step on 4
#: timesteps costs 1.36× less per timestep than 4 steps on 1 (issue 11); on a GPU batch 1 is launch-bound.
DEFAULT_TIMESTEPS_PER_STEP = 4
#: the "fast" recipe: timesteps seen, timesteps per step, extra learning-rate factor (our choice; see
#: docs/method.md §8.8 for what is and is not known about its quality)
FAST_TIMESTEPS = {"faithful": 1600, "lite": 480}
FAST_TIMESTEPS_PER_STEP = 8
FAST_LR_FACTOR = 2.0
LR_SCHEDULES = ("constant", "cosine")
#: the cosine schedule decays from lr to this fraction of it over the run
COSINE_FLOOR = 0.1
LITE_INIT_WORD = "face"
#: tokens of an SD1.x conditioning (core/backend.py)
TEXT_TOKENS = 77

ProgressFn = Callable[[int, int, dict], None]


# ------------------------------------------------------------------------------------------- CLIP input
def uint8_cast_quirk(images: torch.Tensor) -> torch.Tensor:
    """The released code's ``tensor.to(uint8)`` on a [−1,1] image, as float values in [0,255].

    numpy semantics made explicit (truncate toward zero, then wrap modulo 256), so the result does not
    depend on the platform's float→uint8 cast: −1.0 → 255, (−1, 1) → 0, 1.0 → 1.
    """
    return torch.remainder(torch.trunc(images.float()), 256.0)


def resize_center_crop(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """Bicubic (antialiased) resize of the shorter side to ``size``, then a centred size×size crop."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, max(size, int(size * w / h))
    else:
        new_h, new_w = max(size, int(size * h / w)), size
    x = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]


def clip_normalize(images01: torch.Tensor) -> torch.Tensor:
    """(x − CLIP mean)/CLIP std per channel for x in [0,1]."""
    mean = torch.tensor(CLIP_MEAN, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01 - mean) / std


def clip_preprocess(images: torch.Tensor, *, uint8_quirk: bool = False) -> torch.Tensor:
    """CLIP ViT-L/14 input [B,3,224,224] float32 for images [B,3,H,W] in [−1,1].

    Default: [−1,1] → [0,1], resize + centre crop, CLIP mean/std. ``uint8_quirk``: the released pipeline —
    :func:`uint8_cast_quirk` (almost every pixel becomes 0), then what CLIPProcessor does to a uint8 image
    (resize with uint8 rounding/clipping, crop, /255, mean/std).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise InvalidImageError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    x = images.float()
    if uint8_quirk:
        x = resize_center_crop(uint8_cast_quirk(x)).round().clamp(0, 255) / 255.0
    else:
        x = resize_center_crop((x + 1) / 2).clamp(0, 1)
    return clip_normalize(x)


def pooled_clip_features(vision: VisionEncoder, images: torch.Tensor, *, uint8_quirk: bool = False) -> torch.Tensor:
    """Token-mean of CLIP hidden states 3/7/11/15/last for images [B,3,H,W] in [−1,1] → [B,5,width] float32."""
    pixels = clip_preprocess(images, uint8_quirk=uint8_quirk).to(vision.device)
    with torch.no_grad():
        hidden = vision.hidden_states(pixels)
    if len(hidden) <= max(FEATURE_LAYERS):
        raise ValueError(f"The vision encoder gives {len(hidden)} hidden states; MSI needs CLIP ViT-L/14's 25 "
                         f"(levels {FEATURE_LAYERS}).")
    return torch.stack([hidden[i].float().mean(dim=1) for i in FEATURE_LAYERS], dim=1)


# ------------------------------------------------------------------------------------------- modules
def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound)


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init, U(±1/√fan_in) for weight and bias, drawn from ``gen``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    _uniform_(layer.weight, bound, gen)
    if layer.bias is not None:
        _uniform_(layer.bias, bound, gen)


class SeededDropout(nn.Module):
    """Dropout (p ∈ [0, 1)) whose mask comes from ``self.generator`` when one is set (else the global RNG), so
    several MSI modules trained in one batch draw exactly the masks each would draw alone. Scales kept units
    by 1/(1 − p) as :class:`torch.nn.Dropout`; the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.generator: Optional[torch.Generator] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, training=True)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class MSIFaithful(nn.Module):
    """The released MSI as its functional equivalent. ``forward(pooled [5,V]) → tokens [10,D]``.

    token_s = head(T[s] ⊙ normalize(P_{⌊s/2⌋}(f_{⌊s/2⌋}))), P_l = Linear(V→D, no bias) → Linear(D→D, no bias),
    head = Linear(D→H, no bias) → Linear(H→D) → Dropout → Dropout → Linear(D→D). The two dropouts are the
    released ``to_out`` and ``net`` dropouts (p = 0.05 each).
    """

    def __init__(self, vision_dim: int = 1024, token_dim: int = 768, head_dim: int = 512,
                 num_stages: int = NUM_STAGES, dropout: float = 0.05, seed: int = 23):
        super().__init__()
        self.vision_dim, self.token_dim, self.head_dim, self.num_stages = vision_dim, token_dim, head_dim, num_stages
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(vision_dim, token_dim, bias=False), nn.Linear(token_dim, token_dim, bias=False))
            for _ in range(NUM_LEVELS))
        self.stage_modulation = nn.Embedding(num_stages, token_dim)
        self.head_value = nn.Linear(token_dim, head_dim, bias=False)
        self.head_out = nn.Linear(head_dim, token_dim)
        self.head_dropout = nn.Sequential(SeededDropout(dropout), SeededDropout(dropout))
        self.head_net = nn.Linear(token_dim, token_dim)
        self.reset_parameters(torch.Generator().manual_seed(int(seed)))

    def reset_parameters(self, gen: torch.Generator) -> None:
        """PyTorch default inits (Linear U(±1/√fan_in), Embedding N(0,1)), reproducible from ``gen``."""
        for proj in self.projections:
            for layer in proj:
                _init_linear(layer, gen)
        with torch.no_grad():
            self.stage_modulation.weight.copy_(torch.randn(self.stage_modulation.weight.shape, generator=gen))
        for layer in (self.head_value, self.head_out, self.head_net):
            _init_linear(layer, gen)

    def seed_dropout(self, generator: Optional[torch.Generator]) -> None:
        """Draw both dropout masks from ``generator`` (on the module's device; None = the global RNG)."""
        for layer in self.head_dropout:
            layer.generator = generator

    def level_directions(self, pooled: torch.Tensor, levels: Sequence[int]) -> dict[int, torch.Tensor]:
        """normalize(P_l(f_l)) [D] for each distinct level l."""
        return {l: F.normalize(self.projections[l](pooled[l]), dim=-1) for l in sorted(set(levels))}

    def tokens_for_stages(self, pooled: torch.Tensor, stages: Sequence[int]) -> torch.Tensor:
        """Tokens [len(stages), D] for pooled CLIP features [5, V] (only the needed projections run)."""
        if pooled.shape != (NUM_LEVELS, self.vision_dim):
            raise ValueError(f"pooled features must be [{NUM_LEVELS},{self.vision_dim}], got {tuple(pooled.shape)}")
        dirs = self.level_directions(pooled, [s // 2 for s in stages])
        # Python-int indexing keeps the stage lookup free of host→device copies.
        e = torch.stack([self.stage_modulation.weight[s] * dirs[s // 2] for s in stages])
        return self.head_net(self.head_dropout(self.head_out(self.head_value(e))))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.tokens_for_stages(pooled, range(self.num_stages))


class MSILite(nn.Module):
    """Ten stage tokens [10, D] learned directly (textual-inversion style). ``forward() → tokens [10,D]``."""

    def __init__(self, init_token: torch.Tensor, num_stages: int = NUM_STAGES):
        super().__init__()
        self.num_stages = num_stages
        self.tokens = nn.Parameter(init_token.detach().float().reshape(1, -1).repeat(num_stages, 1).clone())

    def tokens_for_stages(self, pooled: Optional[torch.Tensor], stages: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.tokens[s] for s in stages])

    def forward(self, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.tokens


# ------------------------------------------------------------------------------------------- training
def batch_lr(base_lr: float, timesteps_per_step: int) -> float:
    """AdamW learning rate for ``timesteps_per_step`` timesteps per step from the batch-1 rate: base·√k, the
    square-root scaling rule for adaptive optimisers (Malladi et al., "On the SDEs and Scaling Rules for
    Adaptive Gradient Algorithms", NeurIPS 2022). A rule of thumb, not an identity: see docs/method.md §8.8."""
    return float(base_lr) * math.sqrt(int(timesteps_per_step))


def recipe(mode: str, speed: str = "default", timesteps_per_step: Optional[int] = None) -> dict[str, Any]:
    """The option values of a (mode, speed) recipe: steps, lr, timesteps_per_step, lr_schedule, autocast_dtype.

    ``steps`` = ⌈timesteps seen / timesteps_per_step⌉ and ``lr`` = :func:`batch_lr`, so a given
    ``timesteps_per_step`` keeps the recipe's number of timesteps seen (paper: 6100 faithful / 1500 lite;
    fast: :data:`FAST_TIMESTEPS`).

    Raises:
        ValueError: for an unknown mode or speed, or timesteps_per_step < 1.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'faithful' or 'lite', got {mode!r}")
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {SPEEDS}, got {speed!r}")
    default_k = {"paper": 1, "default": DEFAULT_TIMESTEPS_PER_STEP, "fast": FAST_TIMESTEPS_PER_STEP}[speed]
    k = default_k if timesteps_per_step is None else timesteps_per_step
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"timesteps_per_step must be an integer ≥ 1, got {k}")
    k = int(k)
    seen = FAST_TIMESTEPS[mode] if speed == "fast" else PAPER_TIMESTEPS[mode]
    lr = batch_lr(BASE_LR[mode], k) * (FAST_LR_FACTOR if speed == "fast" else 1.0)
    return {"mode": mode, "steps": math.ceil(seen / k), "lr": lr, "timesteps_per_step": k,
            "lr_schedule": "cosine" if speed == "fast" else "constant",
            "autocast_dtype": None if speed == "paper" else "auto"}


_DEFAULT = recipe("faithful", "default")


@dataclass(frozen=True)
class MSIOptions:
    """How :func:`train_msi` fits MSI to one image. Defaults: the faithful mode's "default" recipe.

    The "default" recipe sees the release's 6100 timesteps (lite: 1500) in batches of 4: 1525 steps at
    lr 1e-4·√4 = 2e-4 (lite: 375 steps at 1e-2); ``MSIOptions.preset(mode, "paper")`` is the release's
    batch-1 recipe (6100 steps at 1e-4, fp32). See :func:`recipe` and docs/method.md §8.8.

    Attributes:
        mode: "faithful" (the released network on CLIP-vision features) or "lite" (ten raw tokens).
        steps: optimisation steps ≥ 0. 0 returns the initial tokens.
        lr: AdamW learning rate > 0 (peak rate for the cosine schedule).
        weight_decay: AdamW weight decay ≥ 0 (PyTorch's AdamW default 0.01, used by the release).
        seed: seeds timesteps, flips, ε and dropout (release: 23, the default of its main.py).
        timesteps_per_step: (t, ε) pairs per optimisation step, ≥ 1; one UNet call on that batch whose loss is
            the mean of the pairs' losses, so its gradient is the mean of their batch-1 gradients (release: 1).
        uint8_quirk: reproduce the release's uint8 cast of [−1, 1] pixels before CLIP (faithful only).
        hflip: random horizontal flips, as the release's data loader (p = 0.5).
        grad_checkpointing: UNet activation checkpointing during training: True, False or "auto" (on only when
            one step's measured activations do not fit into free memory, :func:`core.speed.decide_checkpointing`;
            the release: always on). It changes memory and time, not the gradients.
        autocast_dtype: autocast the UNet call to this dtype (e.g. torch.bfloat16); None = no autocast; "auto" =
            bfloat16 on a CUDA device with bf16 support for a float32 backend, else none
            (:func:`core.speed.resolve_autocast_dtype`). MSI parameters and the loss stay float32.
        loss_sync_every: read the loss back to the host every this many steps; None = 1 on CPU, 25 elsewhere.
        lr_schedule: "constant" (release) or "cosine" (from ``lr`` down to COSINE_FLOOR·lr at the last step).

    Raises:
        ValueError: on a value outside those ranges (when constructed).
    """

    mode: str = "faithful"
    steps: int = _DEFAULT["steps"]
    lr: float = _DEFAULT["lr"]
    weight_decay: float = 0.01
    seed: int = 23
    timesteps_per_step: int = _DEFAULT["timesteps_per_step"]
    uint8_quirk: bool = False
    hflip: bool = True
    grad_checkpointing: Union[bool, str] = "auto"
    autocast_dtype: Optional[Union[torch.dtype, str]] = _DEFAULT["autocast_dtype"]
    loss_sync_every: Optional[int] = None
    lr_schedule: str = _DEFAULT["lr_schedule"]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'faithful' or 'lite', got {self.mode!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be an integer ≥ 0, got {self.steps}")
        if int(self.timesteps_per_step) != self.timesteps_per_step or self.timesteps_per_step < 1:
            raise ValueError(f"timesteps_per_step must be an integer ≥ 1, got {self.timesteps_per_step}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.weight_decay)
                                                               and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay ≥ 0, got {self.lr}, {self.weight_decay}")
        if self.loss_sync_every is not None and self.loss_sync_every < 1:
            raise ValueError(f"loss_sync_every must be ≥ 1 or None, got {self.loss_sync_every}")
        if self.grad_checkpointing not in CHECKPOINTING_SETTINGS:
            raise ValueError(f"grad_checkpointing must be True, False or 'auto', got {self.grad_checkpointing!r}")
        if not (self.autocast_dtype is None or isinstance(self.autocast_dtype, torch.dtype)
                or self.autocast_dtype == "auto"):
            raise ValueError(f"autocast_dtype must be a torch dtype, None or 'auto', got {self.autocast_dtype!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    @property
    def timesteps_seen(self) -> int:
        """steps × timesteps_per_step: how many (t, ε) pairs the run draws."""
        return int(self.steps) * int(self.timesteps_per_step)

    @classmethod
    def preset(cls, mode: str = "faithful", speed: str = "default", **overrides: Any) -> "MSIOptions":
        """The (mode, speed) recipe (:func:`recipe`) with ``overrides`` applied. An overridden
        ``timesteps_per_step`` re-derives steps and lr so the recipe's timesteps seen stay, unless those are
        overridden too."""
        fields = recipe(mode, speed, overrides.get("timesteps_per_step"))
        fields.update(overrides)
        return cls(**fields)

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimisation step ``step`` (0-based) under ``lr_schedule``."""
        if self.lr_schedule == "constant" or self.steps <= 1:
            return float(self.lr)
        progress = step / (self.steps - 1)
        return float(self.lr) * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class MSIResult:
    """Outcome of :func:`train_msi`, all tensors float32 on the backend's device.

    ``stage_tokens`` [10,D] are computed in eval mode (dropout off); ``stage_conds`` [10,77,D] are their text
    conditionings (key-E). ``losses`` holds every step's ε-MSE. ``source_latent`` [1,4,h,w] is the scaled
    latent of the image as given (not flipped), encoded once for training: callers reuse it for inversion and
    sampling instead of encoding the image again. ``config`` records the settings, including what the speed
    switches decided (grad_checkpointing and its reason, the autocast dtype, timesteps seen).
    """

    stage_tokens: torch.Tensor
    stage_conds: torch.Tensor
    losses: list[float]
    mode: str
    steps: int
    config: dict[str, Any] = field(default_factory=dict)
    module: Optional[nn.Module] = None
    source_latent: Optional[torch.Tensor] = None


def _check_images(images: torch.Tensor, single: bool) -> None:
    batch_ok = isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3 and (
        images.shape[0] == 1 if single else images.shape[0] >= 1)
    if not batch_ok:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        what = "one RGB image [1,3,H,W]" if single else "RGB images [N,3,H,W] (one per face)"
        raise InvalidImageError(f"MSI trains on {what} in [−1,1]; got {shape}.")
    if images.shape[-1] % 8 or images.shape[-2] % 8:
        raise InvalidImageError(f"Image height and width must be multiples of 8 (got {tuple(images.shape[-2:])}); "
                                "resize it (SD1.x works best at 512×512).")
    if not torch.isfinite(images).all():
        raise InvalidImageError("The image contains NaN or infinite values.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise InvalidImageError(f"Image values must lie in [−1,1] (got [{lo:.3g}, {hi:.3g}]); map [0,1] with x·2−1.")


@contextlib.contextmanager
def _frozen(backend):
    """Backends that are nn.Modules (test doubles, bridges) get requires_grad off for the duration."""
    params = list(backend.parameters()) if isinstance(backend, nn.Module) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _gradient_checkpointing(backend, enabled: bool):
    """Turn the backend's UNet checkpointing on for the duration, restoring its previous state."""
    toggle = getattr(backend, "enable_gradient_checkpointing", None)
    before = bool(getattr(backend, "gradient_checkpointing", False))
    if not enabled or toggle is None or before:
        yield
        return
    toggle(True)
    try:
        yield
    finally:
        toggle(False)


def _stage_cond_batch(backend: DiffusionBackend, modules: Sequence[nn.Module], feats: Optional[torch.Tensor],
                      stages: list[int], views: list[int]) -> torch.Tensor:
    """Conditionings [N·k,77,D] (face-major: the k samples of face 0, then face 1, …) for samples with
    stages/views, encoding each face's distinct (view, stage) pairs once, every face in one text-encoder call.
    ``feats`` [N,V,5,F] holds each face's pooled CLIP features per view (faithful) or is None (lite)."""
    keyed = [(v if feats is not None else 0, s) for v, s in zip(views, stages)]
    by_view: dict[int, list[int]] = {}
    for v, s in dict.fromkeys(keyed):
        by_view.setdefault(v, []).append(s)
    rows, order = [], []
    for face, module in enumerate(modules):
        for v, view_stages in by_view.items():
            rows.append(module.tokens_for_stages(feats[face, v] if feats is not None else None, view_stages))
    for v, view_stages in by_view.items():
        order += [(v, s) for s in view_stages]
    conds = backend.encode_stage_tokens(torch.cat(rows))
    index = {key: i for i, key in enumerate(order)}
    per_face = len(order)
    return torch.stack([conds[face * per_face + index[key]] for face in range(len(modules)) for key in keyed])


def checkpointing_choice(backend: DiffusionBackend, setting, probe: Callable[[], Any]) -> tuple[bool, str, int]:
    """(checkpoint?, reason, measured activation bytes) for an MSI run on ``backend``.

    "auto" measures the activations one step keeps for backward (:func:`core.speed.saved_activation_bytes`
    on ``probe``, a forward pass of the step's shape) against the backend's free memory (its
    ``free_memory_bytes()`` when it has one, e.g. ComfyUI's view, else :func:`core.speed.free_memory_bytes`).
    Backends without ``enable_gradient_checkpointing``, or with it already on, are left as they are.
    """
    if getattr(backend, "enable_gradient_checkpointing", None) is None:
        return False, "unavailable (the backend cannot checkpoint)", 0
    if bool(getattr(backend, "gradient_checkpointing", False)):
        return True, "on (already on in the backend)", 0
    if setting is not True and setting is not False and setting == "auto":
        activations = saved_activation_bytes(probe)
        free = backend_free_bytes(backend)
        on, reason = decide_checkpointing(setting, free_bytes=free, activation_bytes=activations)
        return on, reason, activations
    on, reason = decide_checkpointing(setting, free_bytes=0, activation_bytes=0)
    return on, reason, 0


def face_activation_bytes(backend: DiffusionBackend, latent_shape: Sequence[int], options: MSIOptions) -> int:
    """Bytes autograd keeps for one face in an MSI step: one UNet forward at batch 1 on a latent of
    ``latent_shape`` [1,4,h,w] with a conditioning that needs its gradient (measured,
    :func:`core.speed.saved_activation_bytes`; activation sizes depend on shapes only, so the inputs are zeros)
    × ``options.timesteps_per_step``. Measured outside inference mode with autograd on, wherever it is called
    from; without autocast, so an upper bound where bf16 autocast runs. UNet checkpointing is not assumed (the
    batch that fits without it; :func:`train_msi_faces` still turns it on for its batch when needed). The text
    encoder's activations are left out (77 tokens per distinct stage: small next to the UNet's)."""
    device = torch.device(backend.device)
    with normal_tensors(grad=True), _frozen(backend):
        z = torch.zeros(tuple(latent_shape), device=device)
        t = torch.full((1,), NUM_TRAIN_TIMESTEPS // 2, dtype=torch.long, device=device)
        cond = torch.zeros(1, TEXT_TOKENS, backend.token_dim, device=device, requires_grad=True)
        return int(options.timesteps_per_step) * saved_activation_bytes(lambda: backend.predict_eps(z, t, cond))


def latent_shape_of(images: torch.Tensor) -> tuple[int, int, int, int]:
    """The SD latent shape [1,4,H/8,W/8] of one image of ``images`` [N,3,H,W]."""
    return (1, LATENT_CHANNELS, int(images.shape[-2]) // 8, int(images.shape[-1]) // 8)


def msi_faces_per_batch(backend: DiffusionBackend, images: torch.Tensor, options: MSIOptions) -> tuple[int, str]:
    """How many of the N faces [N,3,H,W] :func:`train_msi_faces` should fit at once, and why: as many as
    :func:`face_activation_bytes` lets fit into the backend's free memory (:func:`core.speed.faces_that_fit`)."""
    count = int(images.shape[0])
    if count == 1:
        return 1, "one face"
    per_face = face_activation_bytes(backend, latent_shape_of(images), options)
    return faces_that_fit(count, per_face, backend_free_bytes(backend))


def _optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused implementation (one kernel for all parameters, no per-step host reads)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def train_msi(backend: DiffusionBackend, image: torch.Tensor, options: MSIOptions = MSIOptions(), *,
              vision: Optional[VisionEncoder] = None, progress: Optional[ProgressFn] = None,
              cancel: Optional[Callable[[], None]] = None) -> MSIResult:
    """Fit MSI to one image [1,3,H,W] in [−1,1] against a frozen backend: :func:`train_msi_faces` for one face.

    Raises:
        InvalidImageError: for an image that is not one finite RGB image in [−1, 1] with sides divisible by 8.
        ValueError: faithful mode without ``vision``.
    """
    _check_images(image, single=True)
    return train_msi_faces(backend, image, options, vision=vision, progress=progress, cancel=cancel)[0]


def train_msi_faces(backend: DiffusionBackend, images: torch.Tensor, options: MSIOptions = MSIOptions(), *,
                    vision: Optional[VisionEncoder] = None, progress: Optional[ProgressFn] = None,
                    cancel: Optional[Callable[[], None]] = None) -> list[MSIResult]:
    """Fit MSI to each of N images [N,3,H,W] in [−1,1] (one face each) against a frozen backend, all faces in one
    batch: N independent fits, each returning that face's 10 stage conditionings.

    Each step draws ``options.timesteps_per_step`` = k pairs t ~ U{0..999}, ε ~ N(0,I) and a horizontal flip per
    pair when ``options.hflip`` (features and latents of both flips are computed once up front); every face uses
    the same draws, so face i's fit is the one :func:`train_msi` makes of image i alone with the same seed (to
    floating-point tolerance: batched kernels may round differently). One UNet call on the N·k batch, one
    text-encoder call for every face's distinct (flip, stage) tokens, and the loss Σ_i mean_k ‖ε − ε̂‖² (the sum
    of the faces' own losses, so face i's gradient is its own batch-k gradient: the mean of k batch-1 gradients);
    then one AdamW step (element-wise, so each face's parameters move exactly as alone). Timesteps and flips
    come from a CPU generator seeded with ``options.seed``, ε from a generator on the backend's device, and each
    faithful module's dropout from its own generator with the same seed, so a run is reproducible per seed and
    device. Every timestep, flip and index is drawn on the host before the loop, so the loop never waits for
    the device except for the loss reads below.

    ``options.autocast_dtype`` autocasts the UNet call; MSI parameters and the loss stay fp32.
    ``options.grad_checkpointing`` "auto" decides once, before the first step, for the N·k batch
    (:func:`checkpointing_choice`). ``progress(done, total, info)`` runs after every step (done = 1 … total)
    with ``info = {"loss": float, "loss_step": int, "loss_tensor": 0-d tensor}``: ``loss`` is the mean loss
    (over faces) of the steps since the previous sync, which happens every ``options.loss_sync_every`` steps,
    so the loop does not wait for the device each step; ``loss_step`` is the step it was synced at;
    ``loss_tensor`` is this step's mean loss over faces, unsynced. ``cancel()`` runs before every step and
    aborts by raising.

    Returns:
        one :class:`MSIResult` per image, in order (``losses``: that face's ε-MSE per step).

    Raises:
        InvalidImageError: for images that are not finite RGB images in [−1, 1] with sides divisible by 8.
        ValueError: faithful mode without ``vision``.
    """
    _check_images(images, single=False)
    mode = options.mode
    faithful = mode == "faithful"
    if faithful and vision is None:
        raise ValueError("Faithful MSI needs the CLIP ViT-L/14 vision encoder (vision=...): load one from "
                         "models/clip_vision, or use mode='lite', which needs none.")
    steps, lr, k, seed = int(options.steps), float(options.lr), int(options.timesteps_per_step), int(options.seed)
    hflip, uint8_quirk = options.hflip, options.uint8_quirk
    device = torch.device(backend.device)
    n = int(images.shape[0])
    sync_every = options.loss_sync_every or (1 if device.type == "cpu" else 25)
    if options.autocast_dtype == "auto":
        # a backend that already computes in half precision (or does not say) is left alone
        float32_backend = getattr(backend, "dtype", None) == torch.float32
        autocast_dtype = resolve_autocast_dtype("auto", device) if float32_backend else None
    else:
        autocast_dtype = options.autocast_dtype

    # views of every face, face-major: [face 0, face 0 mirrored, face 1, …]
    views_img = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1) if hflip else images
    num_views = 2 if hflip else 1
    with torch.no_grad():
        z0_views = backend.encode_image(views_img.to(device)).float()  # the one VAE encode, every face and view
        z0_views = z0_views.view(n, num_views, *z0_views.shape[1:])  # [N,V,4,h,w]
        feats = None
        if faithful:
            feats = pooled_clip_features(vision, views_img, uint8_quirk=uint8_quirk).to(device)
            feats = feats.view(n, num_views, *feats.shape[1:])  # [N,V,5,F]

    if faithful:
        modules = [MSIFaithful(vision_dim=feats.shape[-1], token_dim=backend.token_dim, seed=seed).to(device)
                   for _ in range(n)]
        for module in modules:  # each face's dropout masks as it would draw them alone
            module.seed_dropout(torch.Generator(device=device).manual_seed(seed))
    else:
        init = backend.token_embedding(LITE_INIT_WORD)
        modules = [MSILite(init).to(device) for _ in range(n)]
    opt = _optimizer([p for module in modules for p in module.parameters()], lr, options.weight_decay, device)

    # every random draw of the host side, made once: timesteps, flips, their stages and the distinct
    # (flip, stage) pairs each step encodes
    cpu_gen = torch.Generator().manual_seed(int(seed))
    t_table = torch.randint(0, NUM_TRAIN_TIMESTEPS, (steps, k), generator=cpu_gen)
    view_table = torch.randint(0, num_views, (steps, k), generator=cpu_gen)
    t_host, view_host = t_table.tolist(), view_table.tolist()
    stage_host = [[stage_of_timestep(t) for t in row] for row in t_host]
    lr_host = [options.learning_rate(i) for i in range(steps)]
    t_dev = t_table.to(device).repeat(1, n)  # [steps, N·k] face-major; one transfer each for the whole run
    view_dev = view_table.to(device)
    noise_gen = torch.Generator(device=device).manual_seed(int(seed))
    loss_buf = torch.zeros(steps, n, device=device)
    # no autocast weight cache: the UNet's weights are frozen (never cached anyway), and a CUDA-graphed step
    # (core/cuda_graphs.py) refuses a caching autocast
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype, cache_enabled=False)
                if autocast_dtype is not None else contextlib.nullcontext())

    for module in modules:
        module.train()
    synced_loss, synced_step, last_sync = float("nan"), -1, 0
    with _frozen(backend), torch.enable_grad():
        def probe():  # the UNet call of a step (its shape and precision), for the activation measurement
            cond = torch.zeros(n * k, TEXT_TOKENS, backend.token_dim, device=device, requires_grad=True)
            with autocast:
                backend.predict_eps(z0_views[:1, 0].expand(n * k, -1, -1, -1), t_dev[0], cond)

        checkpointing, why, activation_bytes = (checkpointing_choice(backend, options.grad_checkpointing, probe)
                                                if steps else (False, "no steps", 0))
        with _gradient_checkpointing(backend, checkpointing), \
                graph_scope(backend, enabled=not checkpointing, why="UNet gradient checkpointing is on",
                            resident_bytes=activation_bytes):
            for step in range(steps):
                if cancel is not None:
                    cancel()
                cond = _stage_cond_batch(backend, modules, feats, stage_host[step], view_host[step])
                z0 = z0_views.index_select(1, view_dev[step]).flatten(0, 1)  # [N·k,4,h,w] face-major
                eps = torch.randn((k, *z0.shape[1:]), generator=noise_gen, device=device)  # the same ε for every face
                eps = eps.repeat(n, 1, 1, 1)
                t = t_dev[step]
                z_t = q_sample(z0, eps, t)
                with autocast:
                    pred = backend.predict_eps(z_t, t, cond)
                face_losses = (pred.float() - eps).pow(2).flatten(1).mean(1).view(n, k).mean(1)  # [N]
                opt.zero_grad(set_to_none=True)
                face_losses.sum().backward()
                if options.lr_schedule != "constant":
                    for group in opt.param_groups:
                        group["lr"] = lr_host[step]
                opt.step()
                loss_buf[step].copy_(face_losses.detach())
                if (step + 1) % sync_every == 0 or step == steps - 1:
                    synced_loss = float(loss_buf[last_sync:step + 1].mean())
                    synced_step, last_sync = step, step + 1
                if progress is not None:
                    progress(step + 1, steps, {"loss": synced_loss, "loss_step": synced_step,
                                               "loss_tensor": face_losses.detach().mean()})

    with torch.no_grad():
        for module in modules:
            module.eval()
        tokens = torch.stack([(module(feats[i, 0]) if faithful else module()).float()
                              for i, module in enumerate(modules)])  # [N,10,D]
        conds = backend.encode_stage_tokens(tokens.flatten(0, 1)).float()
        conds = conds.view(n, -1, *conds.shape[1:])  # [N,10,77,D]
    fingerprint = backend.model_fingerprint() if hasattr(backend, "model_fingerprint") else None
    config = dict(seed=seed, lr=lr, weight_decay=options.weight_decay, timesteps_per_step=k, uint8_quirk=uint8_quirk,
                  hflip=hflip, autocast_dtype=str(autocast_dtype) if autocast_dtype else None,
                  model_fingerprint=fingerprint, lr_schedule=options.lr_schedule, timesteps_seen=steps * k,
                  grad_checkpointing=checkpointing, grad_checkpointing_reason=why,
                  activation_bytes=activation_bytes, faces_in_batch=n)
    losses = loss_buf.t().tolist()
    return [MSIResult(stage_tokens=tokens[i].detach(), stage_conds=conds[i].detach(), losses=losses[i], mode=mode,
                      steps=steps, config=dict(config), module=modules[i], source_latent=z0_views[i, :1].detach())
            for i in range(n)]


def msi_objective(backend: DiffusionBackend, z0: torch.Tensor, stage_conds: torch.Tensor, *,
                  num_timesteps: int = 32, seed: int = 0, batch_size: int = 8) -> float:
    """Mean ε-MSE of stage conditionings [10,77,D] on latent z0 [1,4,h,w] over a fixed set of (t, ε) pairs.

    The pairs (t ~ U{0..999}, ε ~ N(0,I)) come from a CPU generator seeded with ``seed``, so two calls with
    the same seed score different conditionings on exactly the same noise.
    """
    if z0.dim() != 4 or z0.shape[0] != 1:
        raise ValueError(f"z0 must be one latent [1,C,h,w], got {tuple(z0.shape)}")
    if stage_conds.dim() != 3 or stage_conds.shape[0] != NUM_STAGES:
        raise ValueError(f"stage_conds must be [{NUM_STAGES},77,D], got {tuple(stage_conds.shape)}")
    device = torch.device(backend.device)
    gen = torch.Generator().manual_seed(int(seed))
    ts = torch.randint(0, NUM_TRAIN_TIMESTEPS, (num_timesteps,), generator=gen)
    eps_all = torch.randn((num_timesteps, *z0.shape[1:]), generator=gen)
    z0 = z0.to(device).float()
    conds = stage_conds.to(device)
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for start in range(0, num_timesteps, batch_size):
            t = ts[start:start + batch_size]
            eps = eps_all[start:start + batch_size].to(device)
            cond = torch.stack([conds[stage_of_timestep(int(v))] for v in t])
            t = t.to(device)
            z_t = q_sample(z0.expand(len(t), -1, -1, -1), eps, t)
            pred = backend.predict_eps(z_t, t, cond)
            total = total + F.mse_loss(pred.float(), eps, reduction="sum")
    return float(total) / (num_timesteps * z0[0].numel())
