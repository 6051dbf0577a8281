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
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backend import DiffusionBackend, VisionEncoder
from .diffusion import NUM_STAGES, NUM_TRAIN_TIMESTEPS, q_sample, stage_of_timestep
from .errors import InvalidImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
#: CLIP hidden-state indices feeding MSI levels 0..4 (stage s uses level ⌊s/2⌋); −1 is the last layer (24).
FEATURE_LAYERS = (3, 7, 11, 15, -1)
NUM_LEVELS = len(FEATURE_LAYERS)

MODES = ("faithful", "lite")
#: Optimisation steps and AdamW learning rate per mode. faithful: the release's v1-finetune.yaml
#: (max_steps 6100, base_learning_rate 1e-4); lite: textual-inversion practice (docs/method.md §8.1 item 7).
FAITHFUL_STEPS, LITE_STEPS = 6100, 1500
FAITHFUL_LR, LITE_LR = 1e-4, 5e-3
DEFAULT_STEPS = {"faithful": FAITHFUL_STEPS, "lite": LITE_STEPS}
DEFAULT_LR = {"faithful": FAITHFUL_LR, "lite": LITE_LR}
LITE_INIT_WORD = "face"

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
        self.head_dropout = nn.Sequential(nn.Dropout(dropout), nn.Dropout(dropout))
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
@dataclass(frozen=True)
class MSIOptions:
    """How :func:`train_msi` fits MSI to one image. Defaults are the release's (faithful mode).

    Attributes:
        mode: "faithful" (the released network on CLIP-vision features) or "lite" (ten raw tokens).
        steps: optimisation steps ≥ 0 (release: 6100; lite default 1500). 0 returns the initial tokens.
        lr: AdamW learning rate > 0 (release: 1e-4; lite default 5e-3).
        weight_decay: AdamW weight decay ≥ 0 (PyTorch's AdamW default 0.01, used by the release).
        seed: seeds timesteps, flips, ε and dropout (release: 23, the default of its main.py).
        timesteps_per_step: (t, ε) pairs per optimisation step, ≥ 1; one UNet call on that batch with the same
            expected gradient as batch 1 (release: 1).
        uint8_quirk: reproduce the release's uint8 cast of [−1, 1] pixels before CLIP (faithful only).
        hflip: random horizontal flips, as the release's data loader (p = 0.5).
        grad_checkpointing: UNet activation checkpointing during training (release: on).
        autocast_dtype: autocast the UNet call to this dtype (e.g. torch.bfloat16); None = no autocast.
        loss_sync_every: read the loss back to the host every this many steps; None = 1 on CPU, 25 elsewhere.

    Raises:
        ValueError: on a value outside those ranges (when constructed).
    """

    mode: str = "faithful"
    steps: int = FAITHFUL_STEPS
    lr: float = FAITHFUL_LR
    weight_decay: float = 0.01
    seed: int = 23
    timesteps_per_step: int = 1
    uint8_quirk: bool = False
    hflip: bool = True
    grad_checkpointing: bool = True
    autocast_dtype: Optional[torch.dtype] = None
    loss_sync_every: Optional[int] = None

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

    @classmethod
    def preset(cls, mode: str = "faithful", **overrides: Any) -> "MSIOptions":
        """The defaults of ``mode`` (its steps and learning rate) with ``overrides`` applied."""
        if mode not in MODES:
            raise ValueError(f"mode must be 'faithful' or 'lite', got {mode!r}")
        fields = {"mode": mode, "steps": DEFAULT_STEPS[mode], "lr": DEFAULT_LR[mode]}
        fields.update(overrides)
        return cls(**fields)


@dataclass
class MSIResult:
    """Outcome of :func:`train_msi`, all tensors float32 on the backend's device.

    ``stage_tokens`` [10,D] are computed in eval mode (dropout off); ``stage_conds`` [10,77,D] are their text
    conditionings (key-E). ``losses`` holds every step's ε-MSE.
    """

    stage_tokens: torch.Tensor
    stage_conds: torch.Tensor
    losses: list[float]
    mode: str
    steps: int
    config: dict[str, Any] = field(default_factory=dict)
    module: Optional[nn.Module] = None


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InvalidImageError(f"MSI trains on one RGB image [1,3,H,W] in [−1,1]; got {shape}.")
    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise InvalidImageError(f"Image height and width must be multiples of 8 (got {tuple(image.shape[-2:])}); "
                                "resize it (SD1.x works best at 512×512).")
    if not torch.isfinite(image).all():
        raise InvalidImageError("The image contains NaN or infinite values.")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.001 or hi > 1.001:
        raise InvalidImageError(f"Image values must lie in [−1,1] (got [{lo:.3g}, {hi:.3g}]); map [0,1] with x·2−1.")


@contextlib.contextmanager
def _seeded_dropout(seed: int, device: torch.device):
    """Dropout draws from the global RNG: seed it for the run and restore the caller's state afterwards."""
    with contextlib.ExitStack() as stack:
        try:
            if device.type == "cpu":
                stack.enter_context(torch.random.fork_rng(devices=[]))
            else:
                index = device.index if device.index is not None else 0
                stack.enter_context(torch.random.fork_rng(devices=[index], device_type=device.type))
        except (AttributeError, RuntimeError):  # no per-device RNG state API: keep the CPU state only
            stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(int(seed))
        yield


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


def _stage_cond_batch(backend: DiffusionBackend, msi: nn.Module, feats: Optional[torch.Tensor], stages: list[int],
                      views: list[int]) -> torch.Tensor:
    """Conditionings [k,77,D] for samples with stages/views, encoding each distinct (view, stage) once."""
    keyed = [(v if feats is not None else 0, s) for v, s in zip(views, stages)]
    by_view: dict[int, list[int]] = {}
    for v, s in dict.fromkeys(keyed):
        by_view.setdefault(v, []).append(s)
    rows, order = [], []
    for v, view_stages in by_view.items():
        rows.append(msi.tokens_for_stages(feats[v] if feats is not None else None, view_stages))
        order += [(v, s) for s in view_stages]
    conds = backend.encode_stage_tokens(torch.cat(rows))
    index = {key: i for i, key in enumerate(order)}
    return torch.stack([conds[index[key]] for key in keyed])


def train_msi(backend: DiffusionBackend, image: torch.Tensor, options: MSIOptions = MSIOptions(), *,
              vision: Optional[VisionEncoder] = None, progress: Optional[ProgressFn] = None,
              cancel: Optional[Callable[[], None]] = None) -> MSIResult:
    """Fit MSI to one image [1,3,H,W] in [−1,1] against a frozen backend; returns the 10 stage conditionings.

    Each step draws ``options.timesteps_per_step`` pairs t ~ U{0..999}, ε ~ N(0,I) (one UNet call on that batch;
    the expected gradient is the batch-1 one), a horizontal flip per pair when ``options.hflip`` (features and
    latents of both flips are computed once up front), builds c_{⌊t/100⌋} for the distinct stages only, and
    takes an AdamW step on the MSI parameters alone. Timesteps and flips come from a CPU generator seeded with
    ``options.seed`` and ε from a generator on the backend's device, so a run is reproducible per seed and device.

    ``options.autocast_dtype`` autocasts the UNet call; MSI parameters and the loss stay fp32.
    ``progress(done, total, info)`` runs after every step (done = 1 … total) with ``info = {"loss": float,
    "loss_step": int, "loss_tensor": 0-d tensor}``: ``loss`` is the mean loss of the steps since the previous
    sync, which happens every ``options.loss_sync_every`` steps, so the loop does not wait for the device each
    step; ``loss_step`` is the step it was synced at; ``loss_tensor`` is this step's loss, unsynced.
    ``cancel()`` runs before every step and aborts by raising.

    Raises:
        InvalidImageError: for an image that is not one finite RGB image in [−1, 1] with sides divisible by 8.
        ValueError: faithful mode without ``vision``.
    """
    _check_image(image)
    mode = options.mode
    faithful = mode == "faithful"
    if faithful and vision is None:
        raise ValueError("Faithful MSI needs the CLIP ViT-L/14 vision encoder (vision=...): load one from "
                         "models/clip_vision, or use mode='lite', which needs none.")
    steps, lr, k, seed = int(options.steps), float(options.lr), int(options.timesteps_per_step), int(options.seed)
    hflip, uint8_quirk, autocast_dtype = options.hflip, options.uint8_quirk, options.autocast_dtype
    device = torch.device(backend.device)
    sync_every = options.loss_sync_every or (1 if device.type == "cpu" else 25)

    views_img = torch.cat([image, image.flip(-1)]) if hflip else image
    with torch.no_grad():
        z0_views = backend.encode_image(views_img.to(device)).float()  # [V,4,h,w]
        feats = pooled_clip_features(vision, views_img, uint8_quirk=uint8_quirk).to(device) if faithful else None

    if faithful:
        msi: nn.Module = MSIFaithful(vision_dim=feats.shape[-1], token_dim=backend.token_dim, seed=seed)
    else:
        msi = MSILite(backend.token_embedding(LITE_INIT_WORD))
    msi = msi.to(device)
    opt = torch.optim.AdamW(msi.parameters(), lr=lr, weight_decay=options.weight_decay)

    cpu_gen = torch.Generator().manual_seed(int(seed))
    t_table = torch.randint(0, NUM_TRAIN_TIMESTEPS, (steps, k), generator=cpu_gen)
    view_table = torch.randint(0, z0_views.shape[0], (steps, k), generator=cpu_gen)
    t_host, view_host = t_table.tolist(), view_table.tolist()
    t_dev = t_table.to(device)  # one transfer for the whole run
    noise_gen = torch.Generator(device=device).manual_seed(int(seed))
    loss_buf = torch.zeros(steps, device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    msi.train()
    synced_loss, synced_step, last_sync = float("nan"), -1, 0
    with _frozen(backend), _gradient_checkpointing(backend, options.grad_checkpointing), \
            _seeded_dropout(seed, device), torch.enable_grad():
        for step in range(steps):
            if cancel is not None:
                cancel()
            stages = [stage_of_timestep(t) for t in t_host[step]]
            views = view_host[step]
            cond = _stage_cond_batch(backend, msi, feats, stages, views)
            z0 = torch.stack([z0_views[v] for v in views])
            eps = torch.randn(z0.shape, generator=noise_gen, device=device)
            t = t_dev[step]
            z_t = q_sample(z0, eps, t)
            with autocast:
                pred = backend.predict_eps(z_t, t, cond)
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_buf[step].copy_(loss.detach())
            if (step + 1) % sync_every == 0 or step == steps - 1:
                synced_loss = float(loss_buf[last_sync:step + 1].mean())
                synced_step, last_sync = step, step + 1
            if progress is not None:
                progress(step + 1, steps, {"loss": synced_loss, "loss_step": synced_step, "loss_tensor": loss.detach()})

    msi.eval()
    with torch.no_grad():
        tokens = msi(feats[0]) if faithful else msi()
        tokens = tokens.float()
        conds = backend.encode_stage_tokens(tokens).float()
    fingerprint = backend.model_fingerprint() if hasattr(backend, "model_fingerprint") else None
    config = dict(seed=seed, lr=lr, weight_decay=options.weight_decay, timesteps_per_step=k, uint8_quirk=uint8_quirk,
                  hflip=hflip, autocast_dtype=str(autocast_dtype) if autocast_dtype else None,
                  model_fingerprint=fingerprint)
    return MSIResult(stage_tokens=tokens.detach(), stage_conds=conds.detach(), losses=loss_buf.tolist(), mode=mode,
                     steps=steps, config=config, module=msi)


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
